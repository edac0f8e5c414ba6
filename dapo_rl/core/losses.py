"""DAPO's clipped policy-gradient loss (paper Eq. 8-12) with decoupled clip and pluggable aggregation.

Every aggregation is ``numerator / denominator``: the numerator is a sum over responses (rows), and
the denominator is a count. Splitting a mini-batch by rows (micro-batches for gradient accumulation,
or shards for data-parallel learners) and dividing every piece by the *whole* mini-batch's
denominator -- the ``normalizer`` -- therefore makes the pieces' losses, and gradients, sum exactly to
the whole mini-batch's. ``loss_normalizer`` computes that denominator so callers never re-derive it.

The ``normalizer`` each aggregation expects (S = number of rows with at least one unmasked token):

- "token-mean" (DAPO): loss = sum of token losses / #unmasked tokens.
  normalizer = the global number of unmasked tokens.
- "seq-mean-token-mean" (GRPO, the paper's "naive" baseline): loss = sum over rows of the row's
  token mean / S.  normalizer = the global S.
- "seq-mean-token-sum": loss = sum of token losses / S.  normalizer = the global S.
- "seq-mean-token-sum-norm" (Dr. GRPO): loss = sum of token losses / (S * L), with L = T =
  mask.shape[-1] when no normalizer is given.  normalizer = the global S times a constant L (the
  maximum response length, say): ``loss_normalizer(mask, agg, max_len=L)``.
- "token-mean-legacy": what the run behind the authors' 52%-AIME recipe computed (verl's actor at
  the time): the token mean of each *micro-batch*, weighted by the micro-batch's share of its
  learner's rows (1 / the number of accumulation steps when micro-batches are equal), then averaged
  over data-parallel learners. It is not additive: each piece uses its own normaliser
  (:func:`piece_normalizer`), so a token's weight depends on how the mini-batch was split. With one
  learner and no micro-batches it equals "token-mean".

Rows without unmasked tokens (e.g. truncated responses under overlong filtering) are not counted in
S: they contribute nothing, in the numerator or in the denominator.

Data-parallel learners whose gradients are *averaged* by all-reduce should multiply their loss by
the world size (or all-reduce with a sum): the normaliser already divides by the global count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

import torch

__all__ = [
    "LOG_RATIO_CLAMP",
    "LOSS_AGGREGATIONS",
    "LossAggregation",
    "clip_setting_problems",
    "loss_normalizer",
    "piece_normalizer",
    "policy_loss",
    "register_loss_aggregation",
]

#: log(pi/pi_old) is clamped to +-this before exp, as in the DAPO reference scripts (verl): padding or
#: a diverged policy must not overflow exp to inf (inf * 0 = NaN in the backward pass). Only a token
#: whose ratio exceeds e**20 ~ 4.9e8 (or is below its inverse) is affected; its gradient becomes 0.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class LossAggregation:
    """A loss aggregation: ``loss = numerator(pg_loss, mask) / denominator``.

    Attributes:
        numerator: (pg_loss (B, T) with masked tokens already 0, mask bool (B, T)) -> 0-d tensor.
            Must be a sum of per-row terms, so that it adds up over any split of the rows.
        denominator: (mask bool (B, T), max_len int | None) -> 0-d tensor, the count to divide by.
            Additive over row splits as well (``loss_normalizer`` returns it for a full mini-batch).
    """

    numerator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    denominator: Callable[[torch.Tensor, int | None], torch.Tensor]
    #: True: every piece of a split mini-batch divides by the whole mini-batch's denominator (exact
    #: under any split). False: each piece divides by its own (see ``piece_normalizer``).
    global_normalizer: bool = True

    def __call__(self, pg_loss: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
        """Aggregate (B, T) token losses into a scalar; ``normalizer`` overrides the denominator."""
        numerator = self.numerator(pg_loss, mask)
        if normalizer is None:
            denominator = self.denominator(mask, None).to(numerator.dtype)
        else:
            denominator = torch.tensor(float(normalizer), dtype=numerator.dtype, device=numerator.device)
        # A count of 0 only happens with an empty batch, whose numerator is 0: divide by 1 instead,
        # so the loss is 0 and still has a grad path.
        return numerator / denominator.clamp(min=1)


#: name -> aggregation. Add entries with ``register_loss_aggregation``.
LOSS_AGGREGATIONS: dict[str, LossAggregation] = {}


def register_loss_aggregation(
    name: str,
    numerator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    denominator: Callable[[torch.Tensor, int | None], torch.Tensor],
    *,
    global_normalizer: bool = True,
) -> LossAggregation:
    """Register an aggregation under ``name``; raises ValueError if the name is already taken."""
    if name in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation {name!r} is already registered")
    aggregation = LossAggregation(numerator, denominator, global_normalizer)
    LOSS_AGGREGATIONS[name] = aggregation
    return aggregation


def _token_sum(pg_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return pg_loss.sum()


def _row_token_mean_sum(pg_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    row_tokens = mask.sum(dim=-1).clamp(min=1)  # empty rows have a 0 sum: any divisor works
    return (pg_loss.sum(dim=-1) / row_tokens).sum()


def _num_tokens(mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    return mask.sum()


def _num_rows(mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    return mask.any(dim=-1).sum()


def _num_rows_times_len(mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    return mask.any(dim=-1).sum() * (mask.shape[-1] if max_len is None else max_len)


register_loss_aggregation("token-mean", _token_sum, _num_tokens)
register_loss_aggregation("seq-mean-token-mean", _row_token_mean_sum, _num_rows)
register_loss_aggregation("seq-mean-token-sum", _token_sum, _num_rows)
register_loss_aggregation("seq-mean-token-sum-norm", _token_sum, _num_rows_times_len)
register_loss_aggregation("token-mean-legacy", _token_sum, _num_tokens, global_normalizer=False)


def _check_agg(agg: str) -> LossAggregation:
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[agg]


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)][:5].tolist() if not mask.is_complex() else "complex"
        raise ValueError(f"mask must be bool or hold only 0/1, got values {bad} (dtype {mask.dtype})")
    return mask.bool()


def loss_normalizer(mask: torch.Tensor, agg: str = "token-mean", *, max_len: int | None = None) -> float:
    """The ``normalizer`` to pass to ``policy_loss`` for every piece of a split mini-batch.

    Args:
        mask: (B, T) response mask of the *whole* mini-batch (bool or 0/1). For data-parallel
            learners that only hold a shard, call this on the shard and all-reduce (sum) the result.
        agg: a name in ``LOSS_AGGREGATIONS``.
        max_len: only for "seq-mean-token-sum-norm": the constant L (e.g. the maximum response
            length) to use instead of T = mask.shape[-1]; pass it whenever the pieces are padded to
            different lengths, so that every piece divides by the same S * L.

    Returns:
        The global count as a float (0.0 for an empty mini-batch; policy_loss then returns 0).
    """
    aggregation = _check_agg(agg)
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    if max_len is not None and not (isinstance(max_len, int) and max_len > 0):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    return float(aggregation.denominator(_as_bool_mask(mask), max_len))


def piece_normalizer(
    piece_mask: torch.Tensor,
    agg: str,
    *,
    minibatch_normalizer: float,
    piece_row_share: float = 1.0,
    max_len: int | None = None,
) -> tuple[float, bool]:
    """The ``normalizer`` of one piece of a mini-batch (a micro-batch on one data-parallel learner),
    and whether the piece's loss is to be multiplied by the world size.

    Args:
        piece_mask: (b, T) loss mask of the piece.
        minibatch_normalizer: ``loss_normalizer`` of the whole mini-batch (all learners' rows).
        piece_row_share: the piece's rows / its learner's rows of the mini-batch.

    Returns:
        ``(normalizer, scale_by_world_size)``. Global aggregations: the mini-batch's normaliser, and
        True (data-parallel gradients are *averaged*, and the normaliser already divides by the global
        count). Per-piece ones ("token-mean-legacy"): the piece's own denominator divided by its row
        share, and False (averaging over learners is part of the aggregation).
    """
    aggregation = _check_agg(agg)
    if aggregation.global_normalizer:
        return float(minibatch_normalizer), True
    if not 0 < piece_row_share <= 1:
        raise ValueError(f"piece_row_share must be in (0, 1], got {piece_row_share!r}")
    return float(aggregation.denominator(_as_bool_mask(piece_mask), max_len)) / piece_row_share, False


def clip_setting_problems(clip_low: object, clip_high: object, dual_clip: object) -> list[str]:
    """What is wrong with a clip setting (empty when nothing): the one home of these rules, used by
    :func:`policy_loss` and by ``DAPOConfig.validate``.

    ``clip_low`` (epsilon_low) in [0, 1): a ratio bound of 1 - clip_low must stay positive.
    ``clip_high`` (epsilon_high) >= 0; ``math.inf`` lifts the upper bound altogether.
    ``dual_clip`` None, or a finite c > 1 (c <= 1 would bound losses below the unclipped objective).
    """
    problems = []
    if not (_is_real(clip_low) and 0 <= clip_low < 1):
        problems.append(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not (_is_real(clip_high) and clip_high >= 0):
        problems.append(f"clip_high must be >= 0 (math.inf: no upper bound), got {clip_high!r}")
    if dual_clip is not None and not (_is_real(dual_clip) and 1 < dual_clip < math.inf):
        problems.append(f"dual_clip must be None or a finite number > 1, got {dual_clip!r}")
    return problems


def _is_real(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normalizer: float | None = None,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss with decoupled clip (Clip-Higher) and optional dual clip.

    Per token, with r = exp(logprobs - old_logprobs) and A the advantage:
        pg_loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
        if dual_clip = c and A < 0:  pg_loss = min(pg_loss, -c * A)
        with importance_weights w:   pg_loss = w * pg_loss
    then aggregated over the unmasked tokens by ``agg`` (see the module docstring).

    The weighted form is the decoupled objective of asynchronous training: ``old_logprobs`` are the
    *proximal* policy's (recomputed under the weights the update starts from), and ``w`` is the
    truncated behaviour importance weight min(pi_prox / pi_behav, C) of the policy that generated the
    token (``dapo_rl.core.off_policy.behaviour_importance_weights``). Without weights the loss is
    exactly the synchronous one.

    Gradients flow through ``logprobs`` only (old log-probs and advantages are treated as data). A
    token exactly at a clip bound counts as *not* clipped: it keeps its full gradient -A * r.

    Args:
        logprobs: (B, T) log-probs of the response tokens under the current policy (requires grad).
        old_logprobs: (B, T) log-probs under the policy that generated the responses.
        advantages: (B,) per response, or (B, T) per token.
        mask: (B, T) bool or 0/1; True on real response tokens. Values at masked positions of the
            other inputs are ignored, even if inf/NaN.
        clip_low: epsilon_low in [0, 1). DAPO: 0.2.
        clip_high: epsilon_high >= 0 (``math.inf``: no upper bound). DAPO: 0.28.
        dual_clip: c > 1 bounds a negative-advantage token's loss at -c * A (reference scripts: 10).
        agg: a name in ``LOSS_AGGREGATIONS``.
        normalizer: replaces the aggregation's denominator; pass ``loss_normalizer(full_mask, agg)``
            for every micro-batch / shard so that their losses sum to the whole mini-batch's loss.
        importance_weights: None, or (B, T) non-negative per-token weights (treated as data).

    Returns:
        loss: 0-d tensor to minimise (0 with a grad path when no token is unmasked).
        metrics: Python floats over this call's unmasked tokens (0.0 when there are none):
            clip_frac_high (A > 0 and r > 1 + clip_high), clip_frac_low (A < 0 and r < 1 - clip_low),
            dual_clip_frac (A < 0 and the dual clip bound is active), approx_kl (KL(old || new) by the
            k3 estimator mean(r - 1 - log r), >= 0), approx_kl_k1 (mean(old - new), the reference
            scripts' "ppo_kl"), ratio_mean, num_tokens; with importance_weights also
            importance_weight_mean.
    """
    aggregation = _check_agg(agg)
    problems = clip_setting_problems(clip_low, clip_high, dual_clip)
    if problems:
        raise ValueError("; ".join(problems))
    if normalizer is not None and not (float(normalizer) >= 0 and math.isfinite(float(normalizer))):
        raise ValueError(f"normalizer must be a finite number >= 0 or None, got {normalizer!r}")
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs, old_logprobs and mask must share one (B, T) shape, got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)} and {tuple(mask.shape)}"
        )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be floating point, got dtype {logprobs.dtype}")
    if importance_weights is not None and importance_weights.shape != logprobs.shape:
        raise ValueError(
            f"importance_weights must be (B, T) = {tuple(logprobs.shape)}, got {tuple(importance_weights.shape)}"
        )
    mask = _as_bool_mask(mask)

    # Ratios of low-precision (bf16) log-probs are too coarse for a 0.2 clip: compute in >= float32.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    # torch.where (not multiplication) so inf/NaN at padding never reaches the loss or its gradient.
    advantages = torch.where(mask, advantages.detach().to(dtype), 0.0)
    log_ratio = torch.where(mask, logprobs.to(dtype) - old_logprobs.detach().to(dtype), 0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    # min(unclipped, clipped) as an explicit where: ties go to `unclipped`, so a token exactly at a
    # bound keeps its full gradient without relying on how torch.minimum splits gradients on ties.
    surrogate = torch.where(clipped < unclipped, clipped, unclipped)
    pg_loss = -surrogate
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (pg_loss > dual_bound)
        pg_loss = torch.where(dual_active, dual_bound, pg_loss)
    if importance_weights is not None:
        # After the clips, as in the decoupled objective: the weight corrects for who sampled the token.
        pg_loss = importance_weights.detach().to(dtype) * pg_loss
    pg_loss = torch.where(mask, pg_loss, 0.0)
    loss = aggregation(pg_loss, mask, normalizer)

    with torch.no_grad():
        num_tokens = mask.sum()
        if normalizer is not None and float(normalizer) == 0 and int(num_tokens) > 0:
            raise ValueError(
                f"normalizer=0 but this batch has {int(num_tokens)} unmasked tokens; pass the count of "
                "the whole mini-batch (loss_normalizer)"
            )

        def token_mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, values.to(dtype), 0.0).sum() / num_tokens.clamp(min=1)

        clip_high_active = (advantages > 0) & (ratio > 1 + clip_high)
        clip_low_active = (advantages < 0) & (ratio < 1 - clip_low)
        names = ["clip_frac_high", "clip_frac_low", "dual_clip_frac", "approx_kl", "approx_kl_k1", "ratio_mean"]
        values = torch.stack(
            [
                token_mean(clip_high_active),
                token_mean(clip_low_active),
                token_mean(dual_active),
                token_mean(ratio - 1 - log_ratio),
                token_mean(-log_ratio),
                token_mean(ratio),
            ]
        ).tolist()  # one device sync for all metrics
        metrics = dict(zip(names, values, strict=True))
        if importance_weights is not None:
            metrics["importance_weight_mean"] = float(token_mean(importance_weights))
        metrics["num_tokens"] = float(num_tokens)
    return loss, metrics
