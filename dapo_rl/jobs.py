"""Jobs: one DAPO run from its settings to a trained, exported and evaluated policy.

The library behind ``dapo-rl train`` / ``dapo-rl eval`` and ``reproduce/``:

- :data:`DEFAULT_JOB`: the main job (the embedded tiny model on ``dapo/Arithmetic-v0``, on the CPU);
- :func:`load_job`: the default job overridden by a YAML file, then by ``key=value`` assignments;
- :func:`build_config`: a job's validated :class:`~dapo_rl.dapo.DAPOConfig`;
- :func:`train` (a job) and :func:`train_config` (a ``DAPOConfig`` and its :class:`RunSettings`):
  THE pipeline: warm-start (optional), held-out accuracy, DAPO under Tune (checkpointing every
  ``checkpoint_every`` iterations), export, held-out accuracy again, ``summary.json``;
- :func:`resume_job` and ``train(..., resume=True)``: continue a stopped run from its newest
  complete checkpoint (``dapo-rl train --resume DIR``);
- :func:`start_ray`, :func:`fit`, :func:`export_final_policy`: the pieces that the cluster launcher
  (:mod:`reproduce.cluster`) shares with the pipeline;
- :func:`evaluate_policy`: avg@k of a model folder or of a training checkpoint.

Bad input (an unknown key, a wrong type, a missing model, an unknown environment id, an invalid
setting) raises :class:`JobError`, one line naming the offending value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import ray
import yaml
from ray import tune
from tqdm import tqdm

import dapo_envs
from dapo_envs.base import printable
from dapo_rl.checkpoints import CheckpointRecord, export_checkpoint, is_rllib_checkpoint, newest_complete_checkpoint
from dapo_rl.dapo import DAPO as DAPOAlgorithm
from dapo_rl.dapo import DAPOConfig, InvalidConfigError
from dapo_rl.env_runner import unknown_env_config_keys
from dapo_rl.evaluation import EvalResult, evaluate_model, evaluate_runner
from dapo_rl.models import TINY_PRESET, ModelNotFoundError, load_policy, load_tokenizer, save_policy
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend, generation_device
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.settings import SETTINGS
from dapo_rl.tracking import LOGGERS, ProgressCallback, logger_callbacks, missing_logger_package
from dapo_rl.versions import package_versions
from dapo_rl.warmstart import WarmStartSettings, supervised_warmstart

#: The main job. Keys: the job's own (below) and, under "training", any DAPOConfig training setting.
DEFAULT_JOB: dict[str, Any] = {
    "env": "dapo/Arithmetic-v0",
    "env_config": {"operators": "+"},
    "model": TINY_PRESET,
    "dtype": None,  # torch dtype name for a checkpoint's weights (None: as saved; the preset: float32)
    "seed": 0,
    "iterations": 150,
    "num_learners": 0,
    "num_gpus_per_learner": 0,  # > 0 with num_learners 0: the local learner trains on the GPU
    # CPUs (torch threads) of each learner; None: automatic (see fit: a local learner's trial takes
    # the cores the Ray cluster has to spare, not RLlib's 1, which would leave torch one thread)
    "num_cpus_per_learner": None,
    "num_env_runners": 0,
    "num_gpus_per_env_runner": 0,
    "warmstart_steps": 1200,
    "warmstart_batch_size": 64,
    "warmstart_lr": 1e-3,
    "warmstart_noise": 0.5,
    "eval_env": None,  # environment id for held-out evaluation (None: the training env's held-out split)
    "eval_problems": 200,
    "eval_samples": 4,
    "checkpoint_every": 10,  # iterations between checkpoints (0: only at the end); a resume loses fewer
    "keep_checkpoints": 2,  # newest checkpoints kept (>= 2: a crash while writing one leaves the one before)
    "loggers": [],  # experiment trackers besides Tune's TensorBoard files: "wandb", "mlflow" (offline)
    # Only the settings where this CPU job genuinely differs from the paper's 32B run (the defaults,
    # dapo_rl.settings): a 3-layer model on 2-digit addition, on 2 cores in minutes.
    "training": {
        "group_size": 8,  # 8 responses per prompt already mix right and wrong answers after the warm-start
        "prompts_per_step": 32,
        "minibatch_prompts": 8,
        "lr": 3e-4,  # a randomly initialised tiny model, not a pretrained 32B one
        "lr_warmup_steps": 0,
        "weight_decay": 0.0,
        "max_prompt_length": 64,  # "What is 12 + 7?" and the model's 512 positions
        "max_response_length": 16,  # "Answer: 198" and EOS take 12 tokens
        "overlong_cache_len": 4,
        "generation_batch_prompts": 48,  # 1.5x: most prompts are informative after the warm-start
        "on_sampling_limit": "train",  # a short CPU run trains on what it kept rather than stopping
    },
}

JOB_KEYS = set(DEFAULT_JOB) - {"training"}


#: The Tune experiment's folder name inside ``<output>/tune``.
TUNE_EXPERIMENT = "dapo"

#: Files of a run's output folder that ``--resume`` reads: the job as it started, and what DAPO
#: needs besides a checkpoint (the model it started from, the accuracy before).
JOB_FILE = "job.json"
RUN_STATE_FILE = "run_state.json"
#: Every iteration's metrics, a JSON line each, written as they arrive (dapo_rl.tracking.ProgressCallback).
RESULTS_FILE = "results.jsonl"

#: Job keys a resume may change: how long to train, how often to checkpoint, what to log and how
#: much to evaluate. Anything else would make the resumed run differ from the one its checkpoints
#: come from.
RESUME_KEYS = ("iterations", "checkpoint_every", "keep_checkpoints", "loggers", "eval_problems", "eval_samples")


class JobError(ValueError):
    """Bad input to a job (settings, files, models, environment ids): one line, no traceback needed."""


class RunStoppedError(RuntimeError):
    """Training stopped part-way (a learner died, too many non-finite updates, ...); the message says
    why and how to continue from the newest complete checkpoint."""


# -- settings --------------------------------------------------------------------------------------


def load_job(config_file: str | None, assignments: Sequence[str]) -> dict[str, Any]:
    """The default job, overridden by a YAML file, then by ``key=value`` assignments.

    Keys are job keys (``iterations``, ``model``, ...), ``env_config.NAME``, or DAPOConfig training
    settings (``group_size``, ``lr``, ...) written flat or under ``training:``.
    """
    job = copy.deepcopy(DEFAULT_JOB)
    overrides = _file_overrides(config_file, job) if config_file else []
    return _overridden(job, overrides + _assignment_overrides(assignments))


def resume_job(folder: str | os.PathLike[str], assignments: Sequence[str] = ()) -> dict[str, Any]:
    """The job a run in ``folder`` was started with (its ``job.json``), with ``key=value`` assignments
    of :data:`RESUME_KEYS` applied (e.g. ``iterations=300`` to train on)."""
    job_file = Path(folder) / JOB_FILE
    try:
        job = json.loads(job_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(
            f"cannot resume {folder}: it has no {JOB_FILE}, so it is not the output folder of a `dapo-rl train` run"
        ) from None
    except (OSError, ValueError) as error:
        raise JobError(f"cannot resume {folder}: {job_file} is unreadable ({error})") from None
    job = {**copy.deepcopy(DEFAULT_JOB), **job}  # keys added to dapo-rl since the run started
    overrides = _assignment_overrides(assignments)
    for key, _, origin in overrides:
        if key not in RESUME_KEYS:
            raise JobError(
                f"{origin}: a resume can change only {', '.join(RESUME_KEYS)}; {key!r} would make the run "
                "differ from the one its checkpoints come from (start a new run with --config instead)"
            )
    return _overridden(job, overrides)


def _assignment_overrides(assignments: Sequence[str]) -> list[tuple[str, Any, str]]:
    return [(*parse_assignment(assignment, "--set"), f"--set {printable(assignment)}") for assignment in assignments]


def _overridden(job: dict[str, Any], overrides: list[tuple[str, Any, str]]) -> dict[str, Any]:
    for key, value, origin in overrides:
        if key.startswith("env_config."):
            job["env_config"][key.split(".", 1)[1]] = value
        elif key in JOB_KEYS:
            job[key] = _checked(key, value, DEFAULT_JOB[key], origin)
        elif key in SETTINGS:
            setting = SETTINGS[key]
            value = setting.coerce(value)
            if (problem := setting.problem(value)) is not None:
                raise JobError(f"{origin}: {problem}")
            job["training"][key] = value
        else:
            known = sorted(JOB_KEYS | set(SETTINGS))
            raise JobError(f"unknown setting {key!r} ({origin}); known settings: {', '.join(known)}, env_config.NAME")
    return job


def _file_overrides(config_file: str, job: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, origin) of each setting in a YAML job file; its ``env_config`` replaces the default's."""
    try:
        loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise JobError(f"cannot read config file {config_file}: {error.strerror}") from None
    except yaml.YAMLError as error:  # one line: where, and what the parser expected
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise JobError(f"config file {config_file} is not valid YAML: {where}{what}") from None
    if not isinstance(loaded, dict):
        raise JobError(f"config file {config_file} must hold a mapping of settings, got {type(loaded).__name__}")
    overrides = []
    for key, value in loaded.items():
        if key in ("training", "env_config") and isinstance(value, dict):
            if key == "env_config":
                job["env_config"] = {}
            prefix = "" if key == "training" else "env_config."
            overrides += [(f"{prefix}{name}", inner, f"{config_file}: {key}.{name}") for name, inner in value.items()]
        else:
            overrides.append((key, value, f"{config_file}: {key}"))
    return overrides


def parse_assignment(assignment: str, option: str) -> tuple[str, Any]:
    """``key=value`` from the command line (``option`` names it in errors): the value read as YAML
    (``3``, ``1e-4``, ``true``, ``[a, b]``, ``"a quoted\\n string"``), else as the text. Text is kept
    exactly as given: YAML would strip a prompt template's trailing newline or spaces."""
    if "=" not in assignment:
        raise JobError(f"{option} takes key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return key.strip(), raw
    quoted = raw.strip()[:1] in ("'", '"')
    return key.strip(), raw if isinstance(value, str) and not quoted else value


def _checked(key: str, value: Any, default: Any, origin: str) -> Any:
    """Check a job key's value against the type of its default (a default of None accepts anything).
    Training settings are checked by their declarations instead (dapo_rl.settings.SETTINGS)."""
    if default is None:
        return value
    expected = type(default)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is list and isinstance(value, str):  # --set loggers=wandb: a list of one
        value, ok = [value], True
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise JobError(f"setting {key!r} ({origin}) must be {expected.__name__}, got {value!r}")
    return value


def build_config(job: dict[str, Any], model: str | None = None) -> DAPOConfig:
    """The validated DAPOConfig of a job, training ``model`` (default: the job's)."""
    _check_env_id(job["env"])
    model = _absolute_if_local(model or job["model"])
    try:
        config = (
            DAPOConfig()
            .environment(job["env"], env_config=dict(job["env_config"]))
            .rl_module(model_config={"model": model, **({"dtype": job["dtype"]} if job.get("dtype") else {})})
            .training(**job["training"])
            .learners(
                num_learners=job["num_learners"],
                num_gpus_per_learner=job["num_gpus_per_learner"],
                num_cpus_per_learner=_learner_cpus(job),
            )
            .env_runners(num_env_runners=job["num_env_runners"], num_gpus_per_env_runner=job["num_gpus_per_env_runner"])
            .debugging(seed=job["seed"], log_level="ERROR")
        )
    except (TypeError, ValueError) as error:  # RLlib's setters check some values (grad_clip_by) as they are set
        raise JobError(f"invalid settings: {_one_line(str(error))}") from None
    return validated(config)


def _one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces (a library's multi-line message)."""
    return " ".join(text.split())


def _learner_cpus(job: dict[str, Any]) -> int | str:
    """The ``num_cpus_per_learner`` of a job: the given number, or "auto" (resolved by :func:`fit`)."""
    cpus = job["num_cpus_per_learner"]
    if cpus is None:
        return "auto"
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise JobError(f"num_cpus_per_learner must be an integer >= 1 or null (automatic), got {cpus!r}")
    return cpus


def with_trial_threads(config: DAPOConfig) -> DAPOConfig:
    """``config`` with its local learner's CPUs set to the Ray cluster's spare cores (at most this
    machine's), when it has a local CPU learner and leaves ``num_cpus_per_learner`` on "auto".

    With ``num_learners=0`` the learner (and, with ``num_env_runners=0``, the generating runner) runs
    in the Tune trial's own process. Ray gives an actor as many threads as CPUs it holds, and RLlib's
    "auto" sizes that process at 1 CPU: torch would run one thread on a machine with more.
    """
    if int(config.num_learners or 0) > 0 or config.num_cpus_per_learner != "auto" or config.num_gpus_per_learner:
        return config
    others = int(config.num_env_runners or 0) * float(config.num_cpus_per_env_runner or 0)
    spare = int(ray.cluster_resources().get("CPU", 1) - others) if ray.is_initialized() else 1
    cpus = max(1, min(os.cpu_count() or 1, spare))
    return config.copy(copy_frozen=False).learners(num_cpus_per_learner=cpus)


def validated(config: DAPOConfig) -> DAPOConfig:
    """``config`` once ``validate()`` passes; else a JobError with every problem on one line."""
    try:
        config.validate()
    except InvalidConfigError as error:
        raise JobError("invalid settings: " + "; ".join(map(_one_line, error.problems))) from None
    except ValueError as error:  # RLlib's own checks, and a model that cannot be found
        raise JobError(_one_line(str(error))) from None
    return config


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run needs besides its DAPOConfig: length, warm-start, evaluation, trackers.

    No defaults here: :data:`DEFAULT_JOB` holds them (``RunSettings.from_job(DEFAULT_JOB)``).
    """

    iterations: int
    warmstart_steps: int  # 0: no warm-start (a pretrained model)
    warmstart_batch_size: int
    warmstart_lr: float
    warmstart_noise: float
    eval_env: str | None  # None: the training environment's held-out split
    eval_problems: int
    eval_samples: int
    checkpoint_every: int  # 0: at the end only
    keep_checkpoints: int
    loggers: tuple[str, ...]  # "wandb", "mlflow"

    @classmethod
    def from_job(cls, job: dict[str, Any], **changes: Any) -> RunSettings:
        """The run settings of a job (its keys of the same names), with ``changes`` applied."""
        values = {field.name: job[field.name] for field in dataclasses.fields(cls)}
        values["loggers"] = tuple(values["loggers"])
        return dataclasses.replace(cls(**values), **changes)


def _check_env_id(env_id: str, role: str = "environment") -> None:
    if env_id not in gym.registry:
        registered = sorted(i for i in gym.registry if i.startswith("dapo/"))
        raise JobError(f"unknown {role} id {env_id!r}; registered dapo/ ids: {registered}")


def _absolute_if_local(model: str) -> str:
    # Tune runs the trial in its own working directory: a relative model folder must be made absolute.
    return os.path.abspath(model) if model != TINY_PRESET and os.path.exists(model) else model


# -- Ray and Tune ----------------------------------------------------------------------------------


def start_ray(address: str | None = None, *, min_cpus: int = 1) -> None:
    """Connect this process to Ray once: to the cluster at ``address``, or to a new local instance.

    A local instance is quiet (no dashboard, workers' logs kept off the terminal, whose output is the
    progress bar) and offers at least ``min_cpus`` logical CPUs even on a smaller machine (a trial
    with 2 learners asks for 3 on a 2-core laptop: it runs, sharing the cores, instead of waiting
    forever). Ray 2.60 asks for an auth token unless RAY_AUTH_MODE says otherwise; a
    single-machine job has no token to give.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    if address is None:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, min_cpus),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    else:
        ray.init(address=address)


def experiment_folder(output: str | os.PathLike[str]) -> Path:
    """Where :func:`fit` keeps a run's Tune experiment (trials, their ``result.json``, checkpoints)."""
    return Path(output) / "tune" / TUNE_EXPERIMENT


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` leaves: the last iteration's Tune result and the checkpoint saved after it."""

    metrics: dict[str, Any]
    checkpoint: Path


def fit(
    config: DAPOConfig,
    output: str | os.PathLike[str],
    *,
    iterations: int,
    callbacks: Sequence[tune.Callback] = (),
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = False,
) -> FitResult:
    """Train ``config`` under Tune until ``iterations`` rollout steps are done.

    A local learner's trial gets the cluster's spare cores as torch threads (:func:`with_trial_threads`).
    Checkpoints every ``checkpoint_every`` steps (0: never) and at the end, keeping the newest
    ``keep_checkpoints``. ``resume``: continue from the newest complete checkpoint under ``output``
    (every state it saved: weights, optimizer, lr schedule, prompt order, RNGs, iteration count) in a
    new trial of the same experiment; without one, start afresh.
    """
    experiment = experiment_folder(Path(output).resolve())
    config = with_trial_threads(config)
    if config.sharded_checkpoint_dir:
        # Every checkpoint Tune keeps must keep its shards.
        config = config.copy(copy_frozen=False).training(
            sharded_checkpoints_kept=max(config.sharded_checkpoints_kept, keep_checkpoints)
        )
    trainable: str | type = "DAPO"
    if resume and (record := newest_complete_checkpoint(experiment)) is not None:
        if record.iteration >= iterations:  # done: only the export and evaluation were left
            row = {"training_iteration": record.iteration}
            row = next((r for r in iteration_results(output) if r["training_iteration"] == record.iteration), row)
            return FitResult(row, record.path)
        trainable = resumed_trainable(record)
    tuner = tune.Tuner(
        trainable,
        param_space=config,
        run_config=tune.RunConfig(
            name=TUNE_EXPERIMENT,
            storage_path=str(experiment.parent),
            stop={"training_iteration": iterations},
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_frequency=checkpoint_every, checkpoint_at_end=True, num_to_keep=keep_checkpoints
            ),
            callbacks=list(callbacks),
            verbose=0,
        ),
    )
    result = tuner.fit()[0]
    if result.error is not None:
        cause = result.error  # a RayTaskError's text is the worker's traceback: name the error it wraps
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        raise RuntimeError(f"the Tune trial failed: {type(cause).__name__}: {cause}") from result.error
    return FitResult(result.metrics, Path(result.checkpoint.path))


def resumed_trainable(record: CheckpointRecord) -> type[DAPOAlgorithm]:
    """A DAPO trainable that starts from ``record``'s checkpoint instead of from scratch."""

    class DAPO(DAPOAlgorithm):  # Tune names trial folders after the class: they stay DAPO_<id>_...
        def setup(self, config: Any) -> None:
            super().setup(config)
            self.restore_from_path(os.fspath(record.path))
            self._time_total = record.time_total_s  # Tune's time_total_s goes on from the checkpoint's

    return DAPO


def iteration_results(output: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every iteration's metrics of the run in ``output`` (its ``results.jsonl``), in iteration order.

    An iteration trained again after a resume is taken from its last line; a partly written last
    line (a killed run) is skipped. A folder from before ``results.jsonl`` existed falls back on
    Tune's ``result.json`` files.
    """
    files = [Path(output) / RESULTS_FILE]
    if not files[0].is_file():
        files = sorted(experiment_folder(output).glob("*/result.json"), key=lambda path: path.stat().st_mtime)
    by_iteration: dict[int, dict[str, Any]] = {}
    for results in files:
        for line in results.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                by_iteration[int(row["training_iteration"])] = row
            except (ValueError, KeyError, TypeError):
                continue
    return [by_iteration[iteration] for iteration in sorted(by_iteration)]


def export_final_policy(result: FitResult, output: str | os.PathLike[str]) -> Path:
    """The policy of a fit's last checkpoint, as a Hugging Face folder ``<output>/model``."""
    folder = Path(output) / "model"
    export_checkpoint(result.checkpoint, folder)
    return folder


# -- the pipeline ----------------------------------------------------------------------------------


def train(job: dict[str, Any], output: str | os.PathLike[str], *, resume: bool = False) -> dict[str, Any]:
    """Run a job (see :func:`load_job`) into the folder ``output``; see :func:`train_config`.

    ``resume``: ``output`` holds a run stopped part-way (``job`` from :func:`resume_job`).
    """
    return train_config(build_config(job), output, RunSettings.from_job(job), job=job, resume=resume)


def train_config(
    config: DAPOConfig,
    output: str | os.PathLike[str],
    run: RunSettings,
    *,
    job: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``config`` with DAPO and measure held-out accuracy before and after; returns the summary.

    Steps: an optional supervised warm-start of the config's model (``run.warmstart_steps``; the
    warm-started model is what DAPO then trains), avg@k on the held-out problems, ``run.iterations``
    DAPO iterations under Tune (progress bar, ``samples.jsonl``, ``run.loggers``, a checkpoint every
    ``run.checkpoint_every``), export of the final policy to ``<output>/model``, avg@k again. Writes
    ``<output>/summary.json``. ``job``, when the run comes from a job, is recorded in the summary.

    ``resume``: ``output`` holds this run stopped part-way. Once DAPO had started (``run_state.json``
    is there), the warm-start and the first evaluation are not redone, and DAPO continues from the
    newest complete checkpoint (from its start when there is none yet); before that, the run starts over.

    Raises:
        JobError: invalid settings, an unknown environment id, a model that cannot be loaded, a
            logger whose package is missing.
    """
    start = time.perf_counter()
    output = Path(output).resolve()  # Tune runs the trial in its own working directory
    model_config = dict(config.model_config or {})
    model_config["model"] = _absolute_if_local(str(model_config.get("model") or ""))
    config = validated(config.copy(copy_frozen=False).rl_module(model_config=model_config))
    _check_run(config, run)
    train_env, test_env, test_name = _environments(config, run)
    prompt_settings = PromptSettings(config.max_prompt_length, config.apply_chat_template, config.prompt_truncation)
    count = min(run.eval_problems, test_env.num_problems)
    held_out = [test_env.problem(i) for i in range(count)]
    if not resume:  # a resumed run's prompts were checked when it started
        _check_prompt_lengths(config, train_env, held_out, prompt_settings)
    # Every check passed: from here on the run writes into its folder.
    output.mkdir(parents=True, exist_ok=True)
    if job is not None and not resume:
        _write_json(output / JOB_FILE, job)  # what --resume restarts from

    def accuracy(policy: Any, tokenizer: Any) -> EvalResult:
        return _held_out_accuracy(policy, tokenizer, test_env, held_out, prompt_settings, config, run.eval_samples)

    state = _read_run_state(output) if resume else None
    if state is None:
        if resume and (output / JOB_FILE).is_file():
            print(f"{output} has no DAPO state yet (stopped before DAPO started): starting the run over", flush=True)
        state = _prepare_dapo(config, model_config, run, output, train_env, prompt_settings, accuracy)
        _write_json(output / RUN_STATE_FILE, state)
    else:
        resumed = newest_complete_checkpoint(experiment_folder(output))
        where = (
            f"from iteration {resumed.iteration} ({resumed.path})" if resumed else "from iteration 0 (no checkpoint)"
        )
        print(f"resuming {output} {where}", flush=True)
        for log in (output / "samples.jsonl", output / RESULTS_FILE):  # the resume logs those iterations again
            _drop_lines_after(log, resumed.iteration if resumed else 0)
    print(f"held-out accuracy before DAPO: {state['accuracy_before']:.3f}", flush=True)
    if state.get("environment_turn_frac_before") is not None:
        print(
            f"held-out episodes with an environment turn (a tool call, a retry) before DAPO: "
            f"{state['environment_turn_frac_before']:.3f}",
            flush=True,
        )

    rl_config = config.copy(copy_frozen=False).rl_module(model_config=state["model_config"])
    start_ray(min_cpus=_trial_cpus(rl_config))
    progress = ProgressCallback(run.iterations, output / "samples.jsonl", output / RESULTS_FILE)
    rl_start = time.perf_counter()
    try:
        result = fit(
            rl_config,
            output,
            iterations=run.iterations,
            checkpoint_every=run.checkpoint_every,
            keep_checkpoints=run.keep_checkpoints,
            resume=resume,
            callbacks=[progress, *logger_callbacks(run.loggers, output)],
        )
    except RuntimeError as error:
        newest = newest_complete_checkpoint(experiment_folder(output))
        where = (
            f"its newest complete checkpoint is iteration {newest.iteration}" if newest else "it has no checkpoint yet"
        )
        raise RunStoppedError(f"{error}\n{output}: {where}; continue with: dapo-rl train --resume {output}") from error
    finally:
        progress.close()
    rl_seconds = time.perf_counter() - rl_start
    model, tokenizer = load_policy(export_final_policy(result, output))
    evaluation_after = accuracy(model, tokenizer)
    accuracy_after = evaluation_after.avg_at_k
    print(f"held-out accuracy after DAPO:  {accuracy_after:.3f}", flush=True)
    if evaluation_after.environment_turn_frac is not None:
        print(
            f"held-out episodes with an environment turn after DAPO: {evaluation_after.environment_turn_frac:.3f}",
            flush=True,
        )
    summary = {
        "eval_accuracy_before": state["accuracy_before"],
        "eval_accuracy_after": accuracy_after,
        # Multi-turn environments: held-out episodes with an environment turn (None: one-turn environments).
        "eval_environment_turn_frac_before": state.get("environment_turn_frac_before"),
        "eval_environment_turn_frac_after": evaluation_after.environment_turn_frac,
        "eval_metric": f"avg@{run.eval_samples} on the first {count} problems of {test_name}, temperature {config.temperature}",
        "iterations": int(result.metrics["training_iteration"]),
        "wall_seconds": time.perf_counter() - start,
        "warmstart_seconds": state["warmstart_seconds"],
        "rl_seconds": rl_seconds,
        "resumed": resume,
        "final_metrics": _plain(result.metrics),
        "checkpoint": str(result.checkpoint),
        "model": str(output / "model"),
        "job": job if job is not None else _run_record(config, run),
    }
    write_summary(output, summary)
    return summary


#: Training prompts whose length is checked before a run starts (all of them in a smaller data set).
PROMPTS_CHECKED = 20_000


def _check_prompt_lengths(
    config: DAPOConfig, train_env: Any, held_out: list[Any], prompt_settings: PromptSettings
) -> None:
    """With ``prompt_truncation="error"``: fail now, naming the problem, if a training prompt (all of
    them, or ``PROMPTS_CHECKED`` spread over a larger set) or a held-out one is over max_prompt_length."""
    if prompt_settings.truncation != "error":
        return
    try:
        runner = GenerationRunner(train_env, load_tokenizer(config.policy_model), None, prompt_settings)
        count = train_env.num_problems
        indices = range(count) if count <= PROMPTS_CHECKED else np.linspace(0, count - 1, PROMPTS_CHECKED).astype(int)
        runner.check_prompt_lengths([train_env.problem(int(i)) for i in indices])
        runner.check_prompt_lengths(held_out)
    except ValueError as error:  # PromptTooLongError, a tokenizer without a chat template, a missing model
        raise JobError(str(error)) from None


def _trial_cpus(config: DAPOConfig) -> int:
    """Logical CPUs a Tune trial of ``config`` asks for (its main process, learners, env runners)."""
    bundles = DAPOAlgorithm.default_resource_request(config).bundles
    return math.ceil(sum(bundle.get("CPU", 0) for bundle in bundles))


def _prepare_dapo(
    config: DAPOConfig,
    model_config: dict[str, Any],
    run: RunSettings,
    output: Path,
    train_env: Any,
    prompt_settings: PromptSettings,
    accuracy: Any,
) -> dict[str, Any]:
    """Load the model, warm-start it (``run.warmstart_steps`` > 0) and measure its held-out accuracy.

    Returns the run state DAPO starts from: the ``model_config`` to train (the warm-started folder,
    or the preset with the seed that initialised it), ``accuracy_before`` and ``warmstart_seconds``.
    """
    model_config = dict(model_config)
    try:
        # The preset's random init follows the run's seed (each seed of a table starts elsewhere).
        init_seed = int(model_config.get("init_seed", config.seed or 0))
        model, tokenizer = load_policy(
            model_config["model"],
            seed=init_seed,
            dtype=model_config.get("dtype"),
            tiny_spec=model_config.get("tiny_spec"),
        )
    except ValueError as error:  # a missing model folder, a bad dtype name
        raise JobError(str(error)) from None
    warmstart_seconds = 0.0
    if run.warmstart_steps > 0:
        warm_start = time.perf_counter()
        _warm_start(model, tokenizer, train_env, prompt_settings, run, seed=int(config.seed or 0))
        model_config["model"] = str(output / "warmstart")
        save_policy(model, tokenizer, model_config["model"])
        warmstart_seconds = time.perf_counter() - warm_start
    elif model_config["model"] == TINY_PRESET:
        model_config["init_seed"] = init_seed  # DAPO starts from the weights just evaluated
    before = accuracy(model, tokenizer)
    return {
        "model_config": model_config,
        "accuracy_before": before.avg_at_k,
        "environment_turn_frac_before": before.environment_turn_frac,
        "warmstart_seconds": warmstart_seconds,
    }


def _read_run_state(output: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output / RUN_STATE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # DAPO had not started (the file is written whole, see _write_json)
        return None


def _write_json(target: Path, value: Any) -> None:
    """Write ``target`` whole or not at all (a kill mid-write leaves the old file or none)."""
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    os.replace(temporary, target)


def _drop_lines_after(log: Path, iteration: int) -> None:
    """Drop the JSON lines of a log (samples.jsonl, results.jsonl) about iterations after ``iteration``,
    and a partly written last line."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("iteration", row.get("training_iteration", 0)) <= iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    temporary = log.with_name(log.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, log)


def _check_run(config: DAPOConfig, run: RunSettings) -> None:
    """Fail on a run's bad settings before any work: an unknown evaluation env, a missing logger package."""
    if run.eval_env is not None:
        _check_env_id(run.eval_env, "evaluation environment")
    unknown = sorted(set(run.loggers) - set(LOGGERS))
    if unknown:
        raise JobError(f"unknown logger(s) {unknown}; loggers: {', '.join(LOGGERS)}")
    for name in run.loggers:
        missing = missing_logger_package(name)
        if missing:
            raise JobError(missing)
    if not (isinstance(run.checkpoint_every, int) and run.checkpoint_every >= 0):
        raise JobError(f"checkpoint_every must be an integer >= 0 (0: only at the end), got {run.checkpoint_every!r}")
    if not (isinstance(run.keep_checkpoints, int) and run.keep_checkpoints >= 1):
        raise JobError(f"keep_checkpoints must be an integer >= 1, got {run.keep_checkpoints!r}")
    try:
        WarmStartSettings(
            steps=run.warmstart_steps,
            batch_size=run.warmstart_batch_size,
            lr=run.warmstart_lr,
            noise=run.warmstart_noise,
        )
    except ValueError as error:
        raise JobError(str(error)) from None


def _environments(config: DAPOConfig, run: RunSettings) -> tuple[Any, Any, str]:
    """(training env, held-out env, a name for the held-out problems): each environment declares its
    own held-out split (``dapo_envs.held_out_env_config``)."""
    env_config = dict(config.env_config or {})
    test_id, base = (config.env, env_config) if run.eval_env is None else (run.eval_env, {})
    test_config = dapo_envs.held_out_env_config(test_id, base)
    split = [f"{key}={value}" for key, value in test_config.items() if base.get(key) != value]
    test_name = test_id + (f" ({', '.join(split)})" if split else "")
    return make_env(config.env, env_config), make_env(test_id, test_config), test_name


def make_env(env_id: str, env_config: dict[str, Any]) -> Any:
    """``gymnasium.make(env_id, **env_config).unwrapped``; a bad setting raises a one-line JobError.

    The environment's constructor checks its arguments (naming the bad one); this adds which
    environment and settings, and drops what Gymnasium appends to a constructor's TypeError (its
    kwargs again, and "was raised from the environment creator").
    """
    _check_env_id(env_id)
    _check_env_config_keys(env_id, env_config)
    render_mode = env_config.get("render_mode")
    if render_mode is not None and not isinstance(render_mode, str):  # gymnasium.make itself would fail on it
        raise JobError(f"cannot make environment {env_id!r}: render_mode must be a string or null, got {render_mode!r}")
    try:
        return gym.make(env_id, **env_config).unwrapped
    except (TypeError, ValueError) as error:
        reason = str(error).split(" was raised from the environment creator")[0]
        raise JobError(f"cannot make environment {env_id!r} with env_config {env_config}: {reason}") from None


def quoting_hint(message: str, option: str, assignments: Sequence[str]) -> str:
    """How to quote a command-line value that YAML read as something other than text, when ``message``
    (an error) names its setting; else "". E.g. ``--env-config operators=-`` is ``[None]`` in YAML
    (a list holding null): the hint says to write ``--env-config operators="'-'"``."""
    for assignment in assignments:
        try:
            key, value = parse_assignment(assignment, option)
        except JobError:
            continue
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, str) or not name or not re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message):
            continue
        raw = printable(assignment.split("=", 1)[1])
        quoted = "'" + raw.replace("'", "''") + "'"  # YAML's single-quoted scalar: '' is one quote
        return (
            f"; {option} values are read as YAML ({key}={raw} gave {value!r}): to pass text, quote it, "
            f'e.g. {option} {key}="{quoted}"'
        )
    return ""


def _check_env_config_keys(env_id: str, env_config: dict[str, Any]) -> None:
    """An env_config key the environment does not take fails here, named with the ones it takes."""
    if (problem := unknown_env_config_keys(env_id, env_config)) is not None:
        raise JobError(problem)


def _warm_start(
    model: Any, tokenizer: Any, env: Any, prompt_settings: PromptSettings, run: RunSettings, *, seed: int
) -> None:
    encoder = GenerationRunner(env, tokenizer, None, prompt_settings)
    settings = WarmStartSettings(
        steps=run.warmstart_steps,
        batch_size=run.warmstart_batch_size,
        lr=run.warmstart_lr,
        noise=run.warmstart_noise,
        seed=seed,
    )
    with tqdm(total=settings.steps, desc="warm-start", unit="step", file=sys.stderr) as bar:
        supervised_warmstart(
            model,
            tokenizer,
            env,
            encoder.encode_prompt,
            settings,
            encode_environment_turn=encoder.encode_environment_turn,
            on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
        )


def _held_out_accuracy(
    model: Any,
    tokenizer: Any,
    env: Any,
    problems: list[Any],
    prompt_settings: PromptSettings,
    config: DAPOConfig,
    samples: int,
) -> EvalResult:
    """avg@``samples`` of an in-memory model, sampling as the config trains (temperature, top_p, top_k)."""
    # On the GPU when there is one, and back to the CPU after: training needs that memory.
    model.to(generation_device())
    try:
        backend = HFGenerationBackend(
            model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id]
        )
        runner = GenerationRunner(env, tokenizer, backend, prompt_settings)
        sampling = SamplingSettings(
            n=samples,
            max_new_tokens=config.max_response_length,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
        )
        return evaluate_runner(runner, problems, sampling, seed=int(config.seed or 0))
    finally:
        model.to("cpu")


def _run_record(config: DAPOConfig, run: RunSettings) -> dict[str, Any]:
    """What a run from a DAPOConfig trained, for its summary: the run settings and the config's settings."""
    return {
        **dataclasses.asdict(run),
        "env": config.env,
        "env_config": dict(config.env_config or {}),
        "model_config": dict(config.model_config or {}),
        "seed": config.seed,
        "training": {key: getattr(config, key) for key in SETTINGS},
    }


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("dapo", "learners", "timers", "training_iteration", "time_total_s")
    return json.loads(json.dumps({k: metrics[k] for k in keep if k in metrics}, default=float))


def write_summary(output: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write ``<output>/summary.json``; ``summary`` gains ``versions`` (dapo-rl, Python, torch, Ray,
    transformers, vLLM), unless it has them, so that its figures can be traced to the code that made them."""
    summary.setdefault("versions", package_versions())
    target = Path(output) / "summary.json"
    _write_json(target, summary)
    return target


# -- evaluation ------------------------------------------------------------------------------------


def evaluate_policy(model: str | os.PathLike[str], env_id: str, **settings: Any) -> EvalResult:
    """avg@k / pass@k / cons@k of a model folder, a preset, or a DAPO training checkpoint (whose policy
    is exported to a temporary folder first). ``settings``: those of :func:`dapo_rl.evaluation.evaluate_model`.
    """
    # The environment is made once here, so that a bad env_config fails in one line before any model loads.
    make_env(env_id, dict(settings.get("env_config") or {})).close()
    try:
        if not is_rllib_checkpoint(model):
            return evaluate_model(model, env_id, **settings)
        start_ray()  # restoring the checkpoint's Algorithm starts its workers
        with tempfile.TemporaryDirectory(prefix="dapo-eval-") as folder:
            export_checkpoint(model, folder)
            return evaluate_model(folder, env_id, **settings)
    except (ModelNotFoundError, ImportError) as error:  # ImportError: the vllm backend without vLLM
        raise JobError(str(error)) from None


__all__ = [
    "DEFAULT_JOB",
    "JOB_FILE",
    "JOB_KEYS",
    "RESULTS_FILE",
    "RESUME_KEYS",
    "RUN_STATE_FILE",
    "RunStoppedError",
    "FitResult",
    "JobError",
    "RunSettings",
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
