"""Launch one Table-1 row at the paper's scale on a running Ray cluster, then evaluate it on AIME 2024.

``python -m dapo_rl.reproduce.table1 --scale paper --run --address HOST:PORT ...`` calls
:func:`run_row_on_cluster` for each row: connect to the cluster the way ``dapo-rl train --address`` does
(``address``, else ``RAY_ADDRESS``; :func:`dapo_rl.jobs.cluster.prepare`: it must answer, hold every
actor of the trial on some node and see the model on every node), check it has the GPUs the row's
placement asks for and that every node sees the row's folder, train with Tune (checkpoints every
``checkpoint_every`` rollout steps; a re-run resumes the experiment), consolidate the last sharded
checkpoint into a Hugging Face folder, and evaluate that with the engine generation used (vLLM on
the GPUs of one engine at the paper's scale: avg@32, temperature 1.0, top_p 0.7). Writes
``summary.json`` in the same shape as the CPU runs, so ``table1.md`` is built the same way.
Connecting, training, exporting and the summary file are :mod:`dapo_rl.jobs`' (the CPU pipeline's);
the evaluation as Ray tasks is this module's own.

What has run: the whole path with a tiny config on a 3-node CPU cluster on one machine
(``tests/test_multinode.py``: train, export, evaluate as Ray tasks, summary.json), and the paper's rows
as far as the cluster check, which refuses a cluster without their 128 GPUs. Never run on GPUs or
with vLLM: no such cluster has been available to this project.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray

from dapo_rl.jobs import RESULTS_FILE, cluster, export_final_policy, fit, write_summary
from dapo_rl.jobs.evaluation import evaluate_model
from dapo_rl.jobs.tracking import ProgressCallback
from dapo_rl.reproduce.scales import resource_plan
from dapo_rl.reproduce.settings import EvalSettings
from dapo_rl.rllib.dapo import DAPO, DAPOConfig


class ClusterTooSmallError(RuntimeError):
    """The connected Ray cluster has fewer GPUs than the row's placement asks for."""


def check_cluster(resources: dict[str, float], config: DAPOConfig, where: str = "the connected Ray cluster") -> None:
    """Raise ClusterTooSmallError unless ``resources`` (``ray.cluster_resources()`` of ``where``) hold the row."""
    plan = resource_plan(config)
    needed, available = plan["gpus"], int(resources.get("GPU", 0))
    if available < needed:
        raise ClusterTooSmallError(
            f"this row needs {needed} GPUs ({plan['generation']['engines']} vLLM engines x "
            f"{config.num_gpus_per_env_runner} + {plan['learners']['learners']} learners x "
            f"{config.num_gpus_per_learner}); {where} has {available}"
        )


def run_row_on_cluster(
    config: DAPOConfig,
    folder: Path,
    *,
    iterations: int,
    evaluation: EvalSettings,
    checkpoint_every: int = 10,
    address: str | None = None,
) -> dict[str, Any]:
    """Train ``config`` for ``iterations`` rollout steps on the Ray cluster at ``address`` (HOST:PORT; default
    ``RAY_ADDRESS``), evaluate, write summary.json.

    Raises:
        dapo_rl.jobs.cluster.ClusterError: no cluster named, or one that does not answer, cannot place
            the trial, or has a node that does not see the model or ``folder``.
        ClusterTooSmallError: the cluster has fewer GPUs than the row asks for.
    """
    started = time.perf_counter()
    folder = folder.resolve()
    choice = cluster.choose_cluster(address)
    if choice.local:
        raise cluster.ClusterError(
            "a paper-scale row trains on a running Ray cluster: give its address (--address HOST:PORT, or "
            f"{cluster.ADDRESS_VARIABLE}=HOST:PORT; what `ray start --head` printed)"
        )
    cluster.connect(choice)  # once: one connection for all the rows and seeds of a table
    check_cluster(ray.cluster_resources(), config, choice.describe())
    # Every actor of the trial placeable on some node, the model seen by every node (as dapo-rl train --address).
    cluster.prepare(choice.address, DAPO.default_resource_request(config).bundles, dict(config.model_config or {}))
    folder.mkdir(parents=True, exist_ok=True)
    cluster.check_storage_shared(folder)  # Tune's storage, the checkpoints and the shards below
    # Learners on every node write their checkpoint shards here (folder is on shared storage).
    config = config.copy(copy_frozen=False).training(sharded_checkpoint_dir=str(folder / "sharded_checkpoints"))
    progress = ProgressCallback(iterations, folder / "samples.jsonl", folder / RESULTS_FILE)
    try:
        result = fit(
            config, folder, iterations=iterations, callbacks=[progress], checkpoint_every=checkpoint_every, resume=True
        )
    finally:
        progress.close()
    model_folder = export_final_policy(result, folder)
    # Evaluations run as Ray tasks holding what one env runner holds (one engine's GPUs at the paper's
    # scale, free again once training has ended), with the engine generation used.
    evaluate_remote = ray.remote(num_gpus=float(config.num_gpus_per_env_runner or 0))(evaluate_model)
    evaluation_kwargs = dict(
        samples=evaluation.samples,
        num_problems=evaluation.problems,
        max_new_tokens=evaluation.max_new_tokens,
        temperature=evaluation.temperature,
        top_p=evaluation.top_p,
        max_prompt_length=config.max_prompt_length,
        backend=config.generation_backend,
        tensor_parallel_size=config.vllm_tensor_parallel_size,
    )
    before_file = folder / "eval_before.json"
    if not before_file.is_file():  # the base model's score, once per row folder
        base = ray.get(evaluate_remote.remote(config.policy_model, evaluation.env, **evaluation_kwargs))
        before_file.write_text(json.dumps(base.as_dict(), indent=2), encoding="utf-8")
    before = json.loads(before_file.read_text(encoding="utf-8"))
    scores = ray.get(evaluate_remote.remote(str(model_folder), evaluation.env, **evaluation_kwargs))
    summary = {
        "eval_accuracy_before": before["avg_at_k"],
        "eval_accuracy_after": scores.avg_at_k,
        "eval_metric": f"{evaluation.metric} on {evaluation.env}",
        "eval": scores.as_dict(),
        "iterations": int(result.metrics.get("training_iteration", iterations)),
        "wall_seconds": time.perf_counter() - started,
        "checkpoint": str(result.checkpoint),
        "model": str(model_folder),
    }
    write_summary(folder, summary)
    return summary


__all__ = ["ClusterTooSmallError", "check_cluster", "run_row_on_cluster"]
