"""Per-token estimators of KL(pi_theta || pi_ref) from the log-probs of the sampled tokens.

The responses are sampled from (approximately) pi_theta, so with log r = log pi_theta(o_t) -
log pi_ref(o_t) at each sampled token, each estimator's expectation under pi_theta relates to
KL(pi_theta || pi_ref) as named in the literature (Schulman, "Approximating KL divergence", 2020)
and in peers (verl's ``kl``/``mse``/``low_var_kl``, TRL, OpenRLHF):

- ``k1`` = log r: unbiased for the KL, high variance, can be negative per token.
- ``k2`` = ½ (log r)²: biased (low bias when the policies are close), always >= 0; its gradient
  is that of the KL's second-order expansion (verl's ``mse``).
- ``k3`` = exp(-log r) - 1 + log r = pi_ref/pi_theta - 1 - log(pi_ref/pi_theta): unbiased, >= 0,
  low variance (verl's ``low_var_kl``, GRPO's KL term). The default.

log r is clamped to +-``LOG_RATIO_CLAMP`` before use, as in the policy loss, so that exp never
overflows; masked positions hold 0 whatever their inputs (inf and NaN included).

The penalty goes in the loss (:func:`kl_loss`, ``kl_placement="loss"``) or in the reward
(:func:`kl_penalized_rewards`, ``kl_placement="reward"``, verl's ``use_kl_in_reward``): there each
response's outcome reward loses ``coef`` times the sum of its per-token estimates under the weights
that start the update, before the group advantages are taken, so the penalty reaches the gradient
through the advantages, with no gradient of its own.

DAPO itself drops the KL penalty (paper §2.3): ``kl_coef`` is 0 by default and these functions are
then never called. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dapo_rl.core.losses import LOG_RATIO_CLAMP, LOSS_AGGREGATIONS

__all__ = ["KL_ESTIMATORS", "KL_PLACEMENTS", "kl_loss", "kl_penalized_rewards", "kl_penalty", "register_kl_estimator"]

#: Where ``kl_coef`` applies the penalty: a term of the loss, or a deduction from each response's reward.
KL_PLACEMENTS = ("loss", "reward")

#: name -> function of the clamped log-ratio (B, T) -> per-token estimate (B, T).
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_kl_estimator(name: str, estimator: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Register ``estimator`` (log r (B, T) -> (B, T)) under ``name``; raises ValueError if taken."""
    if name in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {name!r} is already registered")
    KL_ESTIMATORS[name] = estimator


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(-log_ratio) - 1 + log_ratio


register_kl_estimator("k1", _k1)
register_kl_estimator("k2", _k2)
register_kl_estimator("k3", _k3)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimates of the sampled tokens.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy being trained (gradients
            flow through them).
        ref_logprobs: (B, T) log-probs of the same tokens under the reference policy (treated as data).
        mask: (B, T) bool or 0/1, True on the tokens that count.
        estimator: a name in ``KL_ESTIMATORS`` ("k1", "k2", "k3").

    Returns:
        (B, T) in float32 or wider: the estimate per token, 0 at masked positions.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    if logprobs.dim() != 2 or ref_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs, ref_logprobs and mask must share one (B, T) shape, got {tuple(logprobs.shape)}, "
            f"{tuple(ref_logprobs.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.bool()
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    # torch.where (not multiplication) so inf/NaN at padding never reaches the value or its gradient.
    log_ratio = torch.where(mask, logprobs.to(dtype) - ref_logprobs.detach().to(dtype), 0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(mask, KL_ESTIMATORS[estimator](log_ratio), 0.0)


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    estimator: str = "k3",
    agg: str = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The KL term of the loss: ``coef`` times the per-token estimates aggregated like the policy loss.

    Every aggregation of ``dapo_rl.core.losses`` is linear in the token losses, so with the same
    ``agg`` and ``normalizer`` as :func:`dapo_rl.core.policy_loss`, ``policy_loss + kl_loss`` is the
    aggregation of ``pg_loss + coef * kl`` per token, exactly, under any split into micro-batches or
    learner shards.

    Args:
        logprobs, ref_logprobs, mask, estimator: as for :func:`kl_penalty`, (B, T) each.
        coef: the penalty's weight (>= 0).
        agg: a name in ``LOSS_AGGREGATIONS``.
        normalizer: the mini-batch's normaliser (``loss_normalizer``), as given to ``policy_loss``.

    Returns:
        ``(term, metrics)``: the 0-d term to add to the loss, and ``{"kl": the mean estimate per
        unmasked token}`` (0.0 when there are none).
    """
    if not coef >= 0:
        raise ValueError(f"coef must be >= 0, got {coef!r}")
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {sorted(LOSS_AGGREGATIONS)}")
    per_token = kl_penalty(logprobs, ref_logprobs, mask, estimator)
    bool_mask = mask.bool()
    term = coef * LOSS_AGGREGATIONS[agg](per_token, bool_mask, normalizer)
    with torch.no_grad():
        mean = per_token.sum() / bool_mask.sum().clamp(min=1)
    return term, {"kl": float(mean)}


def kl_penalized_rewards(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    estimator: str = "k3",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response's reward less ``coef`` times its summed per-token KL estimates (the KL in the reward).

    Args:
        rewards: (B,) each response's (shaped) outcome reward.
        logprobs: (B, T) log-probs of the sampled tokens under the weights that start the update
            (treated as data: the penalty acts through the advantages, not through a gradient).
        ref_logprobs, mask, estimator: as for :func:`kl_penalty`.
        coef: the penalty's weight (>= 0).

    Returns:
        ``(penalized, sequence_kl)``, both (B,) float32 or wider: ``rewards - coef * sequence_kl`` and
        the sum of each response's per-token estimates over its masked tokens.
    """
    if not coef >= 0:
        raise ValueError(f"coef must be >= 0, got {coef!r}")
    if rewards.dim() != 1 or rewards.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"rewards must be (B,) with B = {logprobs.shape[0]} rows of logprobs, got {tuple(rewards.shape)}"
        )
    per_token = kl_penalty(logprobs.detach(), ref_logprobs, mask, estimator)
    sequence_kl = per_token.sum(dim=1)
    penalized = rewards.to(sequence_kl.dtype) - coef * sequence_kl
    return penalized, sequence_kl
