"""Ray and Tune: connect to Ray, size the trial, train a DAPOConfig under Tune with checkpoints,
resume from the newest complete one, and export the final policy. The pieces the cluster launcher
(:mod:`dapo_rl.reproduce.cluster`) shares with the pipeline.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune

from dapo_rl.jobs import cluster
from dapo_rl.jobs.run_folder import TUNE_EXPERIMENT, experiment_folder, iteration_results
from dapo_rl.rllib.checkpoints import (
    CheckpointRecord,
    export_checkpoint,
    newest_complete_checkpoint,
)
from dapo_rl.rllib.dapo import DAPO as DAPOAlgorithm
from dapo_rl.rllib.dapo import DAPOConfig


def start_ray(address: str | None = None, *, min_cpus: int = 1) -> cluster.ClusterChoice:
    """Connect this process to Ray once, the way ``dapo-rl train`` does; returns the cluster chosen.

    ``address`` (HOST:PORT), else ``RAY_ADDRESS``, names a running cluster, which must answer
    (:func:`dapo_rl.jobs.cluster.choose_cluster` refuses Ray's "auto" guess and client addresses);
    with neither, a new quiet local instance offering at least ``min_cpus`` logical CPUs, whatever
    address an old ``ray start`` left behind (:func:`dapo_rl.jobs.cluster.connect`). A no-op when this
    process is already connected to that cluster.
    """
    choice = cluster.choose_cluster(address)
    cluster.connect(choice, min_cpus=min_cpus)
    return choice


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
    spare = min(spare, cluster.largest_node_cpus())  # the trial's process is on one node
    cpus = max(1, min(os.cpu_count() or 1, spare))
    return config.copy(copy_frozen=False).learners(num_cpus_per_learner=cpus)


def trial_cpus(config: DAPOConfig) -> int:
    """Logical CPUs a Tune trial of ``config`` asks for (its main process, learners, env runners)."""
    bundles = DAPOAlgorithm.default_resource_request(config).bundles
    return math.ceil(sum(bundle.get("CPU", 0) for bundle in bundles))


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


def export_final_policy(result: FitResult, output: str | os.PathLike[str]) -> Path:
    """The policy of a fit's last checkpoint, as a Hugging Face folder ``<output>/model``."""
    folder = Path(output) / "model"
    export_checkpoint(result.checkpoint, folder)
    return folder
