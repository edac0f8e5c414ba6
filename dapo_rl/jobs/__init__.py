"""The ``dapo-rl`` command's work as a library.

    spec         jobs as settings: DEFAULT_JOB, load_job (YAML + key=value), build_config, RunSettings
    driver       Ray and Tune: start_ray, fit (checkpoints, resume), export_final_policy
    pipeline     train / train_config: warm-start -> evaluate -> DAPO -> export -> evaluate; evaluate_policy
    run_folder   a run's output folder: job.json, results.jsonl, summary.json, what --resume reads
    evaluation   avg@k / pass@k / cons@k of a model
    tracking     the progress bar, samples.jsonl, results.jsonl, wandb and MLflow
    warmstart    the supervised warm-start of a randomly initialised model

The names below are the public interface (``from dapo_rl.jobs import load_job, train``).
"""

from dapo_rl.jobs.driver import FitResult, export_final_policy, fit, resumed_trainable, start_ray, with_trial_threads
from dapo_rl.jobs.pipeline import RunStoppedError, evaluate_policy, train, train_config
from dapo_rl.jobs.run_folder import (
    JOB_FILE,
    RESULTS_FILE,
    RESUME_KEYS,
    RUN_STATE_FILE,
    experiment_folder,
    iteration_results,
    resume_job,
    write_summary,
)
from dapo_rl.jobs.spec import (
    DEFAULT_JOB,
    JOB_KEYS,
    JobError,
    RunSettings,
    build_config,
    load_job,
    make_env,
    parse_assignment,
    quoting_hint,
    validated,
)

__all__ = [
    "DEFAULT_JOB",
    "JOB_FILE",
    "JOB_KEYS",
    "RESULTS_FILE",
    "RESUME_KEYS",
    "RUN_STATE_FILE",
    "FitResult",
    "JobError",
    "RunSettings",
    "RunStoppedError",
    "build_config",
    "evaluate_policy",
    "experiment_folder",
    "export_final_policy",
    "fit",
    "iteration_results",
    "load_job",
    "make_env",
    "parse_assignment",
    "quoting_hint",
    "resume_job",
    "resumed_trainable",
    "start_ray",
    "train",
    "train_config",
    "validated",
    "with_trial_threads",
    "write_summary",
]
