"""A run's output folder: what ``dapo-rl train`` writes there and what ``--resume`` reads back.

    job.json          the job as it started (what a resume restarts from)
    run_state.json    what DAPO starts from besides a checkpoint (the model, the accuracy before)
    results.jsonl     every iteration's metrics, a JSON line each
    samples.jsonl     a few responses of each iteration
    tune/dapo/        the Tune experiment: trials and their checkpoints
    model/            the final policy, a Hugging Face folder
    summary.json      accuracy before and after, timings, the job, package versions

Files are written whole or not at all (:func:`write_json`): a run killed mid-write leaves the old file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapo_rl.jobs.spec import DEFAULT_JOB, JobError, RunSettings, assignment_overrides, overridden
from dapo_rl.rllib.dapo import DAPOConfig
from dapo_rl.settings import SETTINGS
from dapo_rl.versions import package_versions

#: The Tune experiment's folder name inside ``<output>/tune``.
TUNE_EXPERIMENT = "dapo"


#: Files of a run's output folder that ``--resume`` reads: the job as it started, and what DAPO
#: needs besides a checkpoint (the model it started from, the accuracy before).
JOB_FILE = "job.json"


RUN_STATE_FILE = "run_state.json"


#: Every iteration's metrics, a JSON line each, written as they arrive (dapo_rl.jobs.tracking.ProgressCallback).
RESULTS_FILE = "results.jsonl"


#: Job keys a resume may change: how long to train, how often to checkpoint, what to log, how much
#: to evaluate, and which Ray nodes hold the learners and env runners (a run whose learner's node was
#: lost goes on on the nodes left, whose custom resources may differ). Anything else would make the
#: resumed run differ from the one its checkpoints come from.
RESUME_KEYS = (
    "iterations",
    "checkpoint_every",
    "keep_checkpoints",
    "loggers",
    "eval_problems",
    "eval_samples",
    "learner_resources",
    "env_runner_resources",
)


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
    overrides = assignment_overrides(assignments)
    for key, _, origin in overrides:
        if key not in RESUME_KEYS:
            raise JobError(
                f"{origin}: a resume can change only {', '.join(RESUME_KEYS)}; {key!r} would make the run "
                "differ from the one its checkpoints come from (start a new run with --config instead)"
            )
    return overridden(job, overrides)


def experiment_folder(output: str | os.PathLike[str]) -> Path:
    """Where :func:`fit` keeps a run's Tune experiment (trials, their ``result.json``, checkpoints)."""
    return Path(output) / "tune" / TUNE_EXPERIMENT


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


def read_run_state(output: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output / RUN_STATE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # DAPO had not started (the file is written whole, see write_json)
        return None


def write_json(target: Path, value: Any) -> None:
    """Write ``target`` whole or not at all (a kill mid-write leaves the old file or none)."""
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    os.replace(temporary, target)


def drop_lines_after(log: Path, iteration: int) -> None:
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


def run_record(config: DAPOConfig, run: RunSettings) -> dict[str, Any]:
    """What a run from a DAPOConfig trained, for its summary: the run settings and the config's settings."""
    return {
        **dataclasses.asdict(run),
        "env": config.env,
        "env_config": dict(config.env_config or {}),
        "model_config": dict(config.model_config or {}),
        "seed": config.seed,
        "training": {key: getattr(config, key) for key in SETTINGS},
    }


def plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("dapo", "learners", "timers", "training_iteration", "time_total_s")
    return json.loads(json.dumps({k: metrics[k] for k in keep if k in metrics}, default=float))


def write_summary(output: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write ``<output>/summary.json``; ``summary`` gains ``versions`` (dapo-rl, Python, torch, Ray,
    transformers, vLLM), unless it has them, so that its figures can be traced to the code that made them."""
    summary.setdefault("versions", package_versions())
    target = Path(output) / "summary.json"
    write_json(target, summary)
    return target
