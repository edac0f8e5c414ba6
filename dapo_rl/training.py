"""One DAPO rollout step, as Ray-free pieces the RLlib algorithm (and the plain-loop benchmark) compose.

    collect_groups      generate in rounds; dynamic sampling keeps groups with mixed correctness
    build_train_batch   shaped rewards -> group advantages; pack tokens; the loss mask
    groups_fitting_learners, take_generator_logprobs, add_importance_weights
                        the old log-probs' side of the batch: what learners can split, and
                        the generator's log-probs or importance weights
    add_reward_kl_penalty
                        kl_placement="reward": the KL to the reference deducted from the rewards,
                        the advantages taken again
    minibatch_indices   the rows of each gradient update (whole groups, shuffled per epoch)
    minibatch_with_loss_normalizer
                        one mini-batch, trimmed of padding, carrying its global loss normaliser
    training_signal_warnings
                        what made a step train on little or nothing, with the setting that explains it

All tensors are on the CPU; the learner moves its mini-batch to its device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dapo_rl.core import (
    DynamicSamplingAccumulator,
    group_advantages,
    kl_penalized_rewards,
    loss_normalizer,
    overlong_mask,
    shaped_rewards,
)
from dapo_rl.core.micro_batches import trim_padding
from dapo_rl.core.off_policy import behaviour_importance_weights, off_policy_diagnostics
from dapo_rl.rollout.batch import pack_sequences

#: Columns of a learner batch (names avoid RLlib's reserved ``loss_mask`` and ``seq_lens``).
LEARNER_COLUMNS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "response_mask",
    "token_mask",
    "advantages",
    "old_logprobs",
    "importance_weights",  # asynchronous rollouts only (max_staleness >= 1)
    "loss_normalizer",
    "loss_tokens",
)


@dataclass
class CollectionStats:
    rounds: int
    prompts_generated: int
    responses_generated: int
    groups_kept: int
    limit_reached: bool
    all_correct_groups: int
    all_wrong_groups: int
    #: Per round, (N,) bool: which of its responses the step kept (all, without dynamic sampling).
    kept_per_round: list[np.ndarray] = field(default_factory=list)


def collect_groups(
    generate_round: Callable[[int], dict[str, Any]],
    *,
    prompts_per_step: int,
    generation_batch_prompts: int,
    dynamic_sampling: bool,
    max_sampling_rounds: int,
    on_sampling_limit: str,
) -> tuple[dict[str, Any], CollectionStats, list[dict[str, Any]]]:
    """Run generation rounds until the step's groups are collected.

    ``generate_round(num_prompts)`` returns one round's rollouts (see ``GenerationRunner.sample``).
    Without dynamic sampling, one round of ``prompts_per_step`` prompts is the batch. With it, rounds
    of ``generation_batch_prompts`` prompts run until ``prompts_per_step`` groups with both correct
    and wrong answers are held (filtered on correctness, not on the shaped reward); surplus groups
    are dropped, and the round limit raises or stops as ``on_sampling_limit`` says.

    Returns ``(batch, stats, rounds)``: the kept responses (group ids renumbered 0..K-1), the
    counts, and every round's raw rollouts (for metrics over all that was generated).
    """
    rounds: list[dict[str, Any]] = []
    if not dynamic_sampling:
        rollout = generate_round(prompts_per_step)
        rounds.append(rollout)
        batch = _per_response_columns(rollout)
        batch["group_index"] = torch.as_tensor(rollout["group_index"])
        kept_groups = prompts_per_step
        limit_reached = False
        kept_per_round = [np.ones(len(rollout["group_index"]), dtype=bool)]
    else:
        accumulator = DynamicSamplingAccumulator(
            prompts_per_step, max_sampling_rounds, on_sampling_limit=on_sampling_limit
        )
        while not accumulator.done:
            rollout = generate_round(generation_batch_prompts)
            rounds.append(rollout)
            columns = _per_response_columns(rollout)
            del columns["group_index"]
            accumulator.add(columns, torch.as_tensor(rollout["acc"]), torch.as_tensor(rollout["group_index"]))
        batch = accumulator.result()
        kept_groups = accumulator.num_groups
        limit_reached = accumulator.limit_reached
        kept_per_round = [kept.numpy() for kept in accumulator.kept_per_round]
    all_correct, all_wrong = _count_uniform_groups(rounds)
    stats = CollectionStats(
        rounds=len(rounds),
        prompts_generated=sum(int(r["group_index"].max()) + 1 for r in rounds if len(r["group_index"])),
        responses_generated=sum(len(r["group_index"]) for r in rounds),
        groups_kept=kept_groups,
        limit_reached=limit_reached,
        all_correct_groups=all_correct,
        all_wrong_groups=all_wrong,
        kept_per_round=kept_per_round,
    )
    return batch, stats, rounds


def _per_response_columns(rollout: dict[str, Any]) -> dict[str, Any]:
    """The per-response entries of a rollout (arrays as tensors, lists as they are); scalars such
    as timings stay behind."""
    return {
        key: torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        for key, value in rollout.items()
        if isinstance(value, (np.ndarray, list))
    }


def _count_uniform_groups(rounds: Sequence[dict[str, Any]]) -> tuple[int, int]:
    all_correct = all_wrong = 0
    for rollout in rounds:
        groups = rollout["group_index"]
        if len(groups) == 0:
            continue
        correct_per_group = np.bincount(groups, weights=rollout["acc"].astype(np.float64))
        size_per_group = np.bincount(groups)
        all_correct += int(np.sum(correct_per_group == size_per_group))
        all_wrong += int(np.sum(correct_per_group == 0))
    return all_correct, all_wrong


def build_train_batch(
    collected: dict[str, Any],
    *,
    pad_token_id: int,
    max_response_length: int,
    overlong_cache_len: int,
    overlong_penalty_factor: float,
    overlong_filter: bool,
    advantage_scale: str,
) -> dict[str, torch.Tensor]:
    """Pack the collected responses and attach rewards, advantages and the loss mask.

    Returns (B = responses, P/R = prompt/response widths): ``input_ids``, ``attention_mask``,
    ``position_ids`` (B, P+R); ``response_mask`` (B, R) real response tokens; ``token_mask`` (B, R)
    the tokens that carry loss (overlong filtering zeroes truncated responses; the environment's turns of
    multi-turn episodes, ``response_loss_mask``, carry none); ``rewards``,
    ``advantages`` (B,) float32; ``group_index`` (B,) int64; ``truncated``, ``acc`` (B,) bool;
    ``score`` (B,) float32 (the verifier's reward before shaping). From asynchronous rollouts also
    ``behaviour_logprobs`` (B, R) float32 (the generator's, 0 at padding) and ``staleness`` (B,)
    int64 (rollout steps between the generating weights and the update's).
    """
    packed = pack_sequences(collected["prompt_token_ids"], collected["response_token_ids"], pad_token_id=pad_token_id)
    rewards = shaped_rewards(
        collected["score"],
        collected["response_length"],
        max_response_length=max_response_length,
        overlong_cache_len=overlong_cache_len,
        overlong_penalty_factor=overlong_penalty_factor,
    )
    group_index = collected["group_index"].long()
    truncated = collected["truncated"].bool()
    advantages = group_advantages(rewards, group_index, scale=advantage_scale)
    token_mask = overlong_mask(truncated, packed["response_mask"]) if overlong_filter else packed["response_mask"]
    if "response_loss_mask" in collected:
        # Multi-turn episodes: the environment's tokens carry no loss and do not count in the token mean.
        token_mask = token_mask * _padded_rows(collected["response_loss_mask"], token_mask)
    batch = {
        "input_ids": packed["input_ids"],
        "attention_mask": packed["attention_mask"],
        "position_ids": packed["position_ids"],
        "response_mask": packed["response_mask"],
        "token_mask": token_mask,
        "rewards": rewards,
        "advantages": advantages.float(),
        "group_index": group_index,
        "truncated": truncated,
        "acc": collected["acc"].bool(),
        "score": collected["score"].float(),
    }
    if "behaviour_logprobs" in collected:
        batch["behaviour_logprobs"] = _padded_rows(collected["behaviour_logprobs"], packed["response_mask"])
    if "staleness" in collected:
        batch["staleness"] = collected["staleness"].long()
    return batch


def _padded_rows(rows: Sequence[Any], like: torch.Tensor) -> torch.Tensor:
    """Per-response values (B ragged rows, each at most R long) as a (B, R) tensor of ``like``'s
    shape and dtype, 0 after each row's end."""
    padded = torch.zeros_like(like)
    for row, values in enumerate(rows):
        padded[row, : len(values)] = torch.as_tensor(np.asarray(values), dtype=like.dtype)
    return padded


def groups_fitting_learners(group_index: torch.Tensor, *, group_size: int, num_learners: int) -> torch.Tensor:
    """``group_index`` with the groups that would leave a mini-batch unevenly split over learners
    marked dropped (-1).

    Only a step cut short by the round limit (``on_sampling_limit="train"``) can hold such a
    remainder; an uneven shard would make DDP learners take different numbers of steps and hang.
    """
    if num_learners == 1:
        return group_index
    groups_per_unit = num_learners // math.gcd(group_size, num_learners)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    usable = num_groups - num_groups % groups_per_unit
    return torch.where(group_index < usable, group_index, torch.full_like(group_index, -1))


def take_generator_logprobs(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """``recompute_old_logprobs=False``: the generator's log-probs become the old (proximal) ones, so
    the ratio and the clip are taken against the policy that sampled each token (its importance
    weight is the ratio itself). A token the generator gave no log-prob for (NaN) carries no loss.

    Sets ``batch["old_logprobs"]`` and narrows ``batch["token_mask"]``; returns the count of loss
    tokens dropped for want of a generator log-prob.
    """
    behaviour = batch["behaviour_logprobs"]
    known = torch.isfinite(behaviour)
    batch["old_logprobs"] = torch.where(known, behaviour, 0.0)
    unknown = (batch["token_mask"].bool() & ~known).sum()
    batch["token_mask"] = batch["token_mask"] * known
    return {"tokens_without_generator_logprob": float(unknown)}


def add_importance_weights(
    batch: dict[str, torch.Tensor],
    *,
    cap: float | None,
    correction: str = "tis_token",
    low: float = 0.5,
    high: float = 5.0,
    sequence_ratio: str = "product",
) -> dict[str, float]:
    """Asynchronous rollouts: the behaviour weights of the stale responses by ``correction``
    (``dapo_rl.core.off_policy``) as ``batch["importance_weights"]``; returns their metrics and what
    the correction saw (``off_policy_diagnostics``: the distribution of pi_prox / pi_behav, the KL
    between the two policies per staleness)."""
    weights, metrics = behaviour_importance_weights(
        batch["old_logprobs"],
        batch["behaviour_logprobs"],
        batch["token_mask"],
        batch["staleness"] > 0,
        cap=cap,
        correction=correction,
        low=low,
        high=high,
        sequence_ratio=sequence_ratio,
    )
    batch["importance_weights"] = weights
    trained = (batch["group_index"] >= 0).unsqueeze(-1) if "group_index" in batch else True
    metrics.update(
        off_policy_diagnostics(
            batch["old_logprobs"], batch["behaviour_logprobs"], batch["token_mask"].bool() & trained, batch["staleness"]
        )
    )
    return metrics


def add_reward_kl_penalty(
    batch: dict[str, torch.Tensor],
    ref_logprobs: torch.Tensor,
    *,
    coef: float,
    estimator: str,
    advantage_scale: str,
) -> dict[str, float]:
    """``kl_placement="reward"``: deduct ``coef`` x each response's summed KL estimate to the reference
    from its reward (``dapo_rl.core.kl.kl_penalized_rewards``), then take the group advantages again.

    The KL is that of the weights the update starts from: ``batch["old_logprobs"]`` (recomputed, or
    the generator's), over the loss tokens (``token_mask``). ``ref_logprobs`` is (B, R) under the
    reference. Replaces ``batch["rewards"]`` and ``batch["advantages"]``; returns ``reward_kl``
    (the mean summed estimate per response with loss tokens), ``reward_kl_per_token`` and
    ``reward_kl_penalty`` (the mean reward deducted).
    """
    mask = batch["token_mask"]
    penalized, sequence_kl = kl_penalized_rewards(
        batch["rewards"], batch["old_logprobs"], ref_logprobs, mask, coef=coef, estimator=estimator
    )
    batch["rewards"] = penalized.to(batch["rewards"].dtype)
    batch["advantages"] = group_advantages(batch["rewards"], batch["group_index"], scale=advantage_scale).float()
    has_tokens = mask.bool().any(dim=1)
    responses = int(has_tokens.sum())
    tokens = float(mask.bool().sum())
    return {
        "reward_kl": float(sequence_kl[has_tokens].sum()) / responses if responses else 0.0,
        "reward_kl_per_token": float(sequence_kl.sum()) / tokens if tokens else 0.0,
        "reward_kl_penalty": coef * float(sequence_kl[has_tokens].sum()) / responses if responses else 0.0,
    }


def minibatch_indices(
    group_index: torch.Tensor, *, minibatch_prompts: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Row indices of each mini-batch: whole groups, groups shuffled, ``minibatch_prompts`` per batch.

    The last mini-batch holds the remainder when the group count is not a multiple (dynamic
    sampling that stopped at its round limit with ``on_sampling_limit="train"``).
    """
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    order = torch.randperm(num_groups, generator=generator)
    batches = []
    for start in range(0, num_groups, minibatch_prompts):
        chosen = order[start : start + minibatch_prompts]
        rows = torch.isin(group_index, chosen).nonzero().squeeze(-1)
        batches.append(rows)
    return batches


def minibatch_with_loss_normalizer(
    batch: dict[str, torch.Tensor], rows: torch.Tensor, *, loss_agg: str, max_response_length: int
) -> dict[str, torch.Tensor]:
    """One mini-batch: the learner columns of ``rows``, with padding trimmed to what they use.

    ``loss_normalizer`` (repeated per row) is the mini-batch's global denominator for ``loss_agg``,
    so however the learners split these rows, their losses add up to the mini-batch's loss;
    ``loss_tokens`` (repeated per row) is its count of loss tokens, for per-token metrics.
    """
    picked = trim_padding({key: batch[key][rows] for key in LEARNER_COLUMNS if key in batch})
    normalizer = loss_normalizer(picked["token_mask"], loss_agg, max_len=max_response_length)
    picked["loss_normalizer"] = torch.full((len(rows),), normalizer, dtype=torch.float32)
    # The mini-batch's loss-token count, for learners to weight their shard's per-token metrics.
    picked["loss_tokens"] = torch.full((len(rows),), float(picked["token_mask"].sum()), dtype=torch.float32)
    return picked


#: A step whose share of responses without training signal reaches this is called out (a warning
#: and the iteration line), not only counted.
DEGENERATE_SHARE = 0.9


def training_signal_warnings(
    metrics: dict[str, float],
    *,
    overlong_filter: bool,
    max_response_length: int,
    dynamic_sampling: bool,
    on_sampling_limit: str,
) -> list[str]:
    """What made this step train on little or nothing, one sentence each, naming the setting that
    explains it (empty for a healthy step).

    ``metrics`` are the step's: ``prompts_trained``, ``prompts_generated``, ``all_correct_group_ratio``,
    ``all_wrong_group_ratio``, ``response_clip_ratio`` (share of generated responses cut at the
    budget), ``loss_token_frac`` (loss tokens over the trained responses' tokens, NaN when none was
    trained) and ``zero_advantage_frac`` (trained responses whose advantage is 0).
    """
    said = []
    if metrics["prompts_trained"] == 0:
        why = (
            f"all right in {metrics['all_correct_group_ratio']:.0%} of the groups, all wrong in "
            f"{metrics['all_wrong_group_ratio']:.0%}"
        )
        said.append(
            f"no group was trained on: none of the {metrics['prompts_generated']:.0f} prompts got both right and "
            f"wrong answers ({why}); on_sampling_limit={on_sampling_limit!r} went on without them"
        )
        return said
    clipped = metrics["response_clip_ratio"]
    if overlong_filter and clipped >= DEGENERATE_SHARE:
        said.append(
            f"{clipped:.0%} of the responses reached max_response_length ({max_response_length}) and carry no loss "
            "under overlong_filter=True: raise max_response_length, or set overlong_filter=False"
        )
    elif 1 - metrics["loss_token_frac"] >= DEGENERATE_SHARE:
        said.append(
            f"only {metrics['loss_token_frac']:.0%} of the trained responses' tokens carry loss (token_mask): "
            "the update had almost nothing to learn from"
        )
    if not dynamic_sampling and metrics["zero_advantage_frac"] >= DEGENERATE_SHARE:
        said.append(
            f"{metrics['zero_advantage_frac']:.0%} of the trained responses have advantage 0 (their groups were "
            "all right or all wrong) and teach nothing: dynamic_sampling=True trains on mixed groups only"
        )
    return said
