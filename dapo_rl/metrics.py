"""What one DAPO step reports, as pure functions of its batch and rounds (Ray-free, testable alone).

The algorithm logs these under ``dapo/`` through RLlib's MetricsLogger, with the run's counters
(``dapo_rl.rllib.run_state``) and what sampling did (``dapo_rl.rllib.sampling``) beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dapo_rl.core import shaped_rewards
from dapo_rl.training import CollectionStats


def step_metrics(
    batch: dict[str, torch.Tensor], stats: CollectionStats, rounds: list[dict[str, Any]]
) -> dict[str, float]:
    """Rewards, advantages and accuracy of the trained groups; lengths and accuracy of everything
    generated; what dynamic sampling kept; timings of generation and scoring.

    Args:
        batch: the step's learner batch (``build_train_batch``); rows with ``group_index < 0`` were not trained on.
        stats: what ``collect_groups`` did.
        rounds: the step's generation rounds, as the runners returned them.
    """
    generated_acc = np.concatenate([r["acc"] for r in rounds]).astype(np.float64)
    generated_lengths = np.concatenate([r["response_length"] for r in rounds])
    generated_truncated = np.concatenate([r["truncated"] for r in rounds])
    generate_seconds = sum(r["generate_seconds"] for r in rounds)
    trained = batch["group_index"] >= 0

    def over_trained(column: str, reduce: str) -> float:
        # NaN when no group was trained on (a step cut short by the sampling round limit).
        values = batch[column][trained].float()
        return float(getattr(values, reduce)()) if values.numel() else float("nan")

    advantages = batch["advantages"][trained]
    selection = selection_metrics(rounds, stats.kept_per_round) if stats.kept_per_round else {}
    return selection | {
        "reward_mean": over_trained("rewards", "mean"),
        "reward_max": over_trained("rewards", "max"),
        "reward_min": over_trained("rewards", "min"),
        "train_accuracy": over_trained("acc", "mean"),
        "advantage_mean": over_trained("advantages", "mean"),
        "advantage_max": over_trained("advantages", "max"),
        "advantage_min": over_trained("advantages", "min"),
        "generated_accuracy": float(generated_acc.mean()),
        "response_length_mean": float(generated_lengths.mean()),
        "response_length_max": float(generated_lengths.max()),
        "response_length_min": float(generated_lengths.min()),
        "response_clip_ratio": float(generated_truncated.mean()),
        # Of the trained responses: the share of their tokens that carry loss, and of them whose
        # advantage is 0 (both NaN when none was trained).
        "loss_token_frac": float(batch["token_mask"][trained].sum() / batch["response_mask"][trained].sum())
        if trained.any()
        else float("nan"),
        "zero_advantage_frac": float((advantages == 0).float().mean()) if advantages.numel() else float("nan"),
        "sampling_rounds": stats.rounds,
        "prompts_generated": stats.prompts_generated,
        "prompts_trained": int(torch.unique(batch["group_index"][trained]).numel()),
        "kept_group_ratio": stats.groups_kept / max(1, stats.prompts_generated),
        "all_correct_group_ratio": stats.all_correct_groups / max(1, stats.prompts_generated),
        "all_wrong_group_ratio": stats.all_wrong_groups / max(1, stats.prompts_generated),
        "sampling_limit_reached": float(stats.limit_reached),
        # Responses scored wrong because the verifier failed on them (see VerifierResult.failed).
        "verifier_failures": int(sum(r["verifier_failed"].sum() for r in rounds)),
        "generate_seconds": generate_seconds,
        "score_seconds": sum(r["score_seconds"] for r in rounds),
        "generated_tokens_per_second": float(generated_lengths.sum()) / max(1e-9, generate_seconds),
    }


def selection_metrics(rounds: list[dict[str, Any]], kept_per_round: list[np.ndarray]) -> dict[str, float]:
    """What dynamic sampling kept and dropped of the generated responses, and, with asynchronous
    rollouts, how the rounds used fared by their age.

    Dropping is not neutral: it keeps mixed groups in the order they come and drops the rest, so if
    what is dropped differs from what is kept (shorter, easier), training leans that way. Reported:
    the mean response length and accuracy of the kept and of the dropped responses, and of the mixed
    (informative) groups dropped as surplus beyond the step's target; NaN where there are none. With
    a ``staleness`` column (asynchronous rounds), per staleness s of the rounds used:
    ``generated_accuracy_staleness_{s}`` and ``response_length_mean_staleness_{s}``, and
    ``kept_staleness_mean`` (of the kept responses).

    Args:
        rounds: the step's generation rounds (``acc``, ``response_length``, ``group_index`` (N,) each).
        kept_per_round: per round, (N,) bool, the responses the step kept (``CollectionStats``).
    """
    if len(kept_per_round) != len(rounds):
        raise ValueError(f"kept_per_round has {len(kept_per_round)} entries for {len(rounds)} rounds")
    acc = np.concatenate([r["acc"] for r in rounds]).astype(np.float64)
    lengths = np.concatenate([r["response_length"] for r in rounds]).astype(np.float64)
    kept = np.concatenate(kept_per_round).astype(bool)
    mixed = np.concatenate([_in_mixed_group(r["acc"], r["group_index"]) for r in rounds])

    def mean(values: np.ndarray, where: np.ndarray) -> float:
        return float(values[where].mean()) if where.any() else float("nan")

    surplus_mixed = mixed & ~kept
    metrics = {
        "kept_response_length_mean": mean(lengths, kept),
        "dropped_response_length_mean": mean(lengths, ~kept),
        "kept_generated_accuracy": mean(acc, kept),
        "dropped_generated_accuracy": mean(acc, ~kept),
        "dropped_mixed_response_frac": float(surplus_mixed.mean()) if len(acc) else float("nan"),
        "dropped_mixed_response_length_mean": mean(lengths, surplus_mixed),
    }
    if all("staleness" in r for r in rounds):
        staleness = np.concatenate([r["staleness"] for r in rounds])
        metrics["kept_staleness_mean"] = mean(staleness.astype(np.float64), kept)
        for level in sorted(set(staleness.tolist())):
            at_level = staleness == level
            metrics[f"generated_accuracy_staleness_{level}"] = mean(acc, at_level)
            metrics[f"response_length_mean_staleness_{level}"] = mean(lengths, at_level)
    return metrics


def _in_mixed_group(acc: np.ndarray, group_index: np.ndarray) -> np.ndarray:
    """(N,) bool: the response's group has both right and wrong answers."""
    if len(group_index) == 0:
        return np.zeros(0, dtype=bool)
    correct = np.bincount(group_index, weights=acc.astype(np.float64))
    size = np.bincount(group_index)
    group_mixed = (correct > 0) & (correct < size)
    return group_mixed[group_index]


def episode_metrics(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Multi-turn episodes generated this step: turns, the share that had an environment turn (a tool
    call, a retry), and the share of episode tokens the environment wrote (no loss on them)."""
    model_turns = np.concatenate([r["model_turns"] for r in rounds]).astype(np.float64)
    environment_turns = np.concatenate([r["environment_turns"] for r in rounds]).astype(np.float64)
    model_tokens = sum(float(mask.sum()) for r in rounds for mask in r["response_loss_mask"])
    all_tokens = sum(float(r["response_length"].sum()) for r in rounds)
    return {
        "episode_model_turns_mean": float(model_turns.mean()),
        "episode_model_turns_max": float(model_turns.max()),
        "environment_turns_mean": float(environment_turns.mean()),
        "environment_turn_frac": float((environment_turns > 0).mean()),
        "environment_token_frac": 1.0 - model_tokens / max(1.0, all_tokens),
    }


def logged_samples(
    rollout: dict[str, Any],
    decode: Callable[[Any], str],
    *,
    count: int,
    max_response_length: int,
    overlong_cache_len: int,
    overlong_penalty_factor: float,
) -> list[dict[str, Any]]:
    """The first response to each of the first ``count`` prompts of a generation round, with the
    verifier's score and the shaped reward (whether or not its group was trained on): researchers
    read samples. ``decode`` turns a prompt's token ids into text."""
    rows = np.flatnonzero(np.diff(rollout["group_index"], prepend=-1) != 0)[:count]
    rewards = shaped_rewards(
        torch.as_tensor(rollout["score"][rows]),
        torch.as_tensor(rollout["response_length"][rows]),
        max_response_length=max_response_length,
        overlong_cache_len=overlong_cache_len,
        overlong_penalty_factor=overlong_penalty_factor,
    )
    return [
        {
            "prompt": decode(rollout["prompt_token_ids"][row]),
            "response": rollout["response_text"][row],
            "pred": rollout["pred"][row],
            "score": float(rollout["score"][row]),
            "reason": rollout["reason"][row],
            "reward": float(reward),
            "acc": bool(rollout["acc"][row]),
            "truncated": bool(rollout["truncated"][row]),
        }
        for row, reward in zip(rows.tolist(), rewards.tolist(), strict=True)
    ]
