"""What a Tune run of DAPO reports while it trains: the terminal, samples.jsonl, and experiment trackers.

- :class:`ProgressCallback`: a progress bar, one summary line per iteration, and each iteration's
  sampled responses (``result["samples"]``) appended to a JSON-lines file.
- :func:`logger_callbacks`: Tune's Weights & Biases and MLflow logger callbacks, writing offline
  under the run's output folder (``--logger wandb`` / ``--logger mlflow``). Tune writes
  TensorBoard event files into every trial folder already.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.utils.util import SafeFallbackEncoder
from tqdm import tqdm

#: Experiment trackers by logger name: (import name, pip package). The ``tracking`` extra installs both.
LOGGERS: dict[str, tuple[str, str]] = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}
TRACKING_EXTRA = "tracking"


def missing_logger_package(name: str) -> str | None:
    """One line naming the pip command when a logger's package is not installed, else None."""
    module, package = LOGGERS[name]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"logger {name!r} needs the {package} package: pip install {package} (or pip install 'dapo-rl[{TRACKING_EXTRA}]')"


def logger_callbacks(names: Sequence[str], output: Path) -> list[tune.Callback]:
    """Tune callbacks of the named loggers, writing under ``output`` and sending nothing anywhere."""
    callbacks: list[tune.Callback] = []
    if "wandb" in names:
        from ray.air.integrations.wandb import WandbLoggerCallback

        # Offline unless WANDB_MODE says otherwise (`wandb sync <output>/wandb/offline-run-*` uploads
        # later). Tune's callback reads WANDB_MODE in this process; its logging actor gets the mode
        # and the folder as wandb.init arguments, since a running Ray's workers keep their old env.
        os.environ.setdefault("WANDB_MODE", "offline")
        callbacks.append(
            WandbLoggerCallback(
                project="dapo-rl",
                mode=os.environ["WANDB_MODE"],
                dir=str(output),
                excludes=["samples"],  # the responses go to samples.jsonl; W&B's history wants numbers
            )
        )
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        # A file: store under the output folder, readable with `mlflow ui --backend-store-uri <it>`.
        # MLflow 3 keeps that store in maintenance mode and refuses it unless this is set; its
        # database stores need SQLAlchemy, which mlflow-skinny leaves out.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        callbacks.append(MLflowLoggerCallback(tracking_uri=(output / "mlruns").as_uri(), experiment_name="dapo-rl"))
    return callbacks


#: Sections of a Tune result that ``results.jsonl`` keeps (the rest is config and bookkeeping).
RESULT_SECTIONS = (
    "training_iteration",
    "time_total_s",
    "time_this_iter_s",
    "timestamp",
    "dapo",
    "learners",
    "env_runners",
    "timers",
    "num_env_steps_sampled_lifetime",
    "num_training_step_calls_per_iteration",
)


class ProgressCallback(tune.Callback):
    """A progress bar over iterations, a one-line summary per iteration, and, as each iteration's
    result arrives:

    - its samples (``result["samples"]``: prompt, response, reward, acc...) appended to
      ``samples_file`` as JSON lines, each with its ``iteration``;
    - its metrics appended to ``results_file`` as one JSON line. Tune's own ``result.json`` reaches
      the output folder only when Tune syncs its staging folder (every few checkpoints), so a
      killed run would lose the last iterations' metrics from it; this file has every one.
    """

    def __init__(self, iterations: int, samples_file: Path | None = None, results_file: Path | None = None) -> None:
        self.iterations = iterations
        self.samples_file = samples_file
        self.results_file = results_file
        self.bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; a live bar (and its stream) cannot be.
        return {**self.__dict__, "bar": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.bar is None:  # a resumed run's first result is past iteration 1
            self.bar = tqdm(
                total=self.iterations,
                initial=result["training_iteration"] - 1,
                desc="DAPO",
                unit="iter",
                file=sys.stderr,
            )
        self.bar.update(1)
        self.bar.write(summary_line(result))
        if self.samples_file is not None and result.get("samples"):
            with open(self.samples_file, "a", encoding="utf-8") as file:
                for sample in result["samples"]:
                    file.write(json.dumps({"iteration": result["training_iteration"], **sample}, default=str) + "\n")
        if self.results_file is not None:
            row = {key: result[key] for key in RESULT_SECTIONS if key in result}
            with open(self.results_file, "a", encoding="utf-8") as file:
                file.write(json.dumps(row, cls=SafeFallbackEncoder) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_line(result: dict[str, Any]) -> str:
    """One iteration in one line: training accuracy, reward, length, sampling, loss, entropy, clipping, time;
    then, on lines of their own, what made the step train on little or nothing (result["warnings"])."""
    dapo = result.get("dapo", {})
    learner = result.get("learners", {}).get("default_policy", {})
    nan = float("nan")
    return (
        f"iter {result['training_iteration']:4d}  acc {dapo.get('generated_accuracy', nan):.3f}  "
        f"reward {dapo.get('reward_mean', nan):+.3f}  len {dapo.get('response_length_mean', nan):.1f}  "
        f"rounds {dapo.get('sampling_rounds', 0):.0f}  kept {dapo.get('kept_group_ratio', nan):.2f}  "
        f"loss {learner.get('policy_loss', nan):+.4f}  entropy {learner.get('entropy', nan):.3f}  "
        f"clip_hi {learner.get('clip_frac_high', nan):.3f}  {dapo.get('step_seconds', nan):.1f}s"
        + "".join(f"\n  warning: {warning}" for warning in result.get("warnings", []))
    )
