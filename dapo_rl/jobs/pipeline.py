"""The pipeline behind ``dapo-rl train``: one DAPO run from its settings to a trained, exported and
evaluated policy.

- :func:`train` (a job) and :func:`train_config` (a ``DAPOConfig`` and its
  :class:`~dapo_rl.jobs.spec.RunSettings`): warm-start (optional), held-out accuracy, DAPO under Tune
  (checkpointing every ``checkpoint_every`` iterations), export, held-out accuracy again, ``summary.json``;
  ``resume=True`` continues a stopped run from its newest complete checkpoint (``dapo-rl train --resume DIR``);
- :func:`evaluate_policy`: avg@k of a model folder or of a training checkpoint (``dapo-rl eval``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dapo_rl.jobs import cluster
from dapo_rl.jobs.driver import export_final_policy, fit, start_ray, trial_cpus
from dapo_rl.jobs.eval_problems import EvalProblems, choose_eval_problems
from dapo_rl.jobs.evaluation import EvalResult, evaluate_model, evaluate_runner
from dapo_rl.jobs.run_folder import (
    JOB_FILE,
    RESULTS_FILE,
    RUN_STATE_FILE,
    drop_lines_after,
    experiment_folder,
    plain_metrics,
    read_run_state,
    run_record,
    write_json,
    write_summary,
)
from dapo_rl.jobs.spec import JobError, RunSettings, absolute_if_local, build_config, make_env, validated
from dapo_rl.jobs.tracking import ProgressCallback, logger_callbacks
from dapo_rl.jobs.warmstart import supervised_warmstart
from dapo_rl.models.loading import TINY_PRESET, ModelNotFoundError, load_policy, load_tokenizer, save_policy
from dapo_rl.rllib.checkpoints import (
    export_checkpoint,
    is_rllib_checkpoint,
    newest_complete_checkpoint,
)
from dapo_rl.rllib.dapo import DAPO as DAPOAlgorithm
from dapo_rl.rllib.dapo import DAPOConfig
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend, generation_device
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings


class RunStoppedError(RuntimeError):
    """Training stopped part-way (a learner died, too many non-finite updates, ...); the message says
    why and how to continue from the newest complete checkpoint."""


def train(
    job: dict[str, Any], output: str | os.PathLike[str], *, resume: bool = False, address: str | None = None
) -> dict[str, Any]:
    """Run a job (see :func:`load_job`) into the folder ``output``; see :func:`train_config`.

    ``resume``: ``output`` holds a run stopped part-way (``job`` from :func:`resume_job`). ``address``:
    the Ray cluster to run on (HOST:PORT; default ``RAY_ADDRESS``, else a new local instance).
    """
    return train_config(build_config(job), output, RunSettings.from_job(job), job=job, resume=resume, address=address)


def train_config(
    config: DAPOConfig,
    output: str | os.PathLike[str],
    run: RunSettings,
    *,
    job: dict[str, Any] | None = None,
    resume: bool = False,
    address: str | None = None,
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

    ``address``: the Ray cluster (see :func:`dapo_rl.jobs.cluster.choose_cluster`), connected to and checked
    (reachable, able to hold the trial, seeing the model and ``output``) before any work.

    Raises:
        JobError: invalid settings, an unknown environment id, a model that cannot be loaded, a
            logger whose package is missing.
    """
    start = time.perf_counter()
    output = Path(output).resolve()  # Tune runs the trial in its own working directory
    model_config = dict(config.model_config or {})
    model_config["model"] = absolute_if_local(str(model_config.get("model") or ""))
    config = validated(config.copy(copy_frozen=False).rl_module(model_config=model_config))
    ray_cluster = cluster.prepare(address, DAPOAlgorithm.default_resource_request(config).bundles, model_config)
    train_env, test_env, evaluated = _environments(config, run)
    prompt_settings = PromptSettings(config.max_prompt_length, config.apply_chat_template, config.prompt_truncation)
    count = min(run.eval_problems, test_env.num_problems)
    held_out = [test_env.problem(i) for i in range(count)]
    if not resume:  # a resumed run's prompts were checked when it started
        _check_prompt_lengths(config, train_env, held_out, prompt_settings)
    # Every check passed: from here on the run writes into its folder.
    output.mkdir(parents=True, exist_ok=True)
    if not ray_cluster.local:  # Tune's storage and the checkpoints: every node must write the same folder
        cluster.check_storage_shared(output)
    if job is not None and not resume:
        write_json(output / JOB_FILE, job)  # what --resume restarts from

    def accuracy(policy: Any, tokenizer: Any) -> EvalResult:
        return _held_out_accuracy(policy, tokenizer, test_env, held_out, prompt_settings, config, run.eval_samples)

    state = read_run_state(output) if resume else None
    if state is None:
        if resume and (output / JOB_FILE).is_file():
            print(f"{output} has no DAPO state yet (stopped before DAPO started): starting the run over", flush=True)
        state = _prepare_dapo(config, model_config, run, output, train_env, prompt_settings, accuracy)
        write_json(output / RUN_STATE_FILE, state)
    else:
        resumed = newest_complete_checkpoint(experiment_folder(output))
        where = (
            f"from iteration {resumed.iteration} ({resumed.path})" if resumed else "from iteration 0 (no checkpoint)"
        )
        print(f"resuming {output} {where}", flush=True)
        for log in (output / "samples.jsonl", output / RESULTS_FILE):  # the resume logs those iterations again
            drop_lines_after(log, resumed.iteration if resumed else 0)
    print(f"{evaluated.accuracy} before DAPO: {state['accuracy_before']:.3f}", flush=True)
    if state.get("environment_turn_frac_before") is not None:
        print(
            f"{evaluated.episodes} with an environment turn (a tool call, a retry) before DAPO: "
            f"{state['environment_turn_frac_before']:.3f}",
            flush=True,
        )

    rl_config = config.copy(copy_frozen=False).rl_module(model_config=state["model_config"])
    cluster.connect(ray_cluster, min_cpus=trial_cpus(rl_config))
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
    print(f"{evaluated.accuracy} after DAPO:  {accuracy_after:.3f}", flush=True)
    if evaluation_after.environment_turn_frac is not None:
        print(
            f"{evaluated.episodes} with an environment turn after DAPO: {evaluation_after.environment_turn_frac:.3f}",
            flush=True,
        )
    summary = {
        "eval_accuracy_before": state["accuracy_before"],
        "eval_accuracy_after": accuracy_after,
        # Multi-turn environments: held-out episodes with an environment turn (None: one-turn environments).
        "eval_environment_turn_frac_before": state.get("environment_turn_frac_before"),
        "eval_environment_turn_frac_after": evaluation_after.environment_turn_frac,
        "eval_metric": f"avg@{run.eval_samples} on the first {count} problems of "
        f"{evaluated.name(dict(config.env_config or {}))}, temperature {config.temperature}",
        "evaluated_on": evaluated.record(count),  # which problems: env, env_config, split, count
        "iterations": int(result.metrics["training_iteration"]),
        "wall_seconds": time.perf_counter() - start,
        "warmstart_seconds": state["warmstart_seconds"],
        "rl_seconds": rl_seconds,
        "resumed": resume,
        "final_metrics": plain_metrics(result.metrics),
        "checkpoint": str(result.checkpoint),
        "model": str(output / "model"),
        "job": job if job is not None else run_record(config, run),
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


def _environments(config: DAPOConfig, run: RunSettings) -> tuple[Any, Any, EvalProblems]:
    """(training env, evaluation env, which problems those are): each environment declares its own
    held-out split; one without is refused unless told (``dapo_rl.jobs.eval_problems``)."""
    env_config = dict(config.env_config or {})
    try:
        evaluated = choose_eval_problems(
            config.env, env_config, eval_env=run.eval_env, on_training_problems=run.eval_on_training_problems
        )
    except ValueError as error:
        raise JobError(str(error)) from None
    return make_env(config.env, env_config), make_env(evaluated.env_id, evaluated.env_config), evaluated


def _warm_start(
    model: Any, tokenizer: Any, env: Any, prompt_settings: PromptSettings, run: RunSettings, *, seed: int
) -> None:
    encoder = GenerationRunner(env, tokenizer, None, prompt_settings)
    settings = run.warmstart_settings(seed=seed)
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


def evaluate_policy(model: str | os.PathLike[str], env_id: str, **settings: Any) -> EvalResult:
    """avg@k / pass@k / cons@k of a model folder, a preset, or a DAPO training checkpoint (whose policy
    is exported to a temporary folder first). ``settings``: those of :func:`dapo_rl.jobs.evaluation.evaluate_model`.
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
