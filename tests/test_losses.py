"""policy_loss against a plain per-token reference loop written from the paper's formula.

The reference computes each token's loss with Python floats (math.exp, min/max), aggregates with
explicit loops, and gets each token's gradient from the case analysis of the clipped objective
(d/dlogp of -r*A is -r*A; a clipped or dual-clipped token has gradient 0) -- a different structure
from the vectorised implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_rl.core.losses import (
    LOSS_AGGREGATIONS,
    loss_normalizer,
    piece_normalizer,
    policy_loss,
    register_loss_aggregation,
)

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
DTYPE = torch.float64


# ----------------------------------------------------------------------------- reference


def ref_token_loss(lp: float, old: float, a: float, cl: float, ch: float, c: float | None) -> float:
    r = math.exp(lp - old)
    loss = -min(r * a, min(max(r, 1 - cl), 1 + ch) * a)
    if c is not None and a < 0:
        loss = min(loss, -c * a)
    return loss


def ref_token_grad(lp: float, old: float, a: float, cl: float, ch: float, c: float | None) -> float:
    r = math.exp(lp - old)
    if a > 0 and r > 1 + ch:  # upper clip active: constant loss
        return 0.0
    if a < 0 and r < 1 - cl:  # lower clip active
        return 0.0
    if c is not None and a < 0 and -r * a > -c * a:  # dual clip active
        return 0.0
    return -a * r


def ref_policy_loss(lp, old, adv, mask, agg, cl=0.2, ch=0.28, c=None, seq_len=None):
    """(loss, grad list-of-lists) from nested Python loops. adv: per row (list) or per token."""
    rows, cols = len(mask), len(mask[0]) if mask else 0
    length = cols if seq_len is None else seq_len

    def a_at(b, t):
        return adv[b][t] if isinstance(adv[b], list) else adv[b]

    tokens = [[t for t in range(cols) if mask[b][t]] for b in range(rows)]
    live_rows = [b for b in range(rows) if tokens[b]]
    num_tokens = sum(len(tokens[b]) for b in range(rows))
    total, weights = 0.0, {}
    for b in live_rows:
        for t in tokens[b]:
            loss_bt = ref_token_loss(lp[b][t], old[b][t], a_at(b, t), cl, ch, c)
            if agg == "token-mean":
                w = 1.0 / num_tokens
            elif agg == "seq-mean-token-mean":
                w = 1.0 / (len(live_rows) * len(tokens[b]))
            elif agg == "seq-mean-token-sum":
                w = 1.0 / len(live_rows)
            elif agg == "seq-mean-token-sum-norm":
                w = 1.0 / (len(live_rows) * length)
            else:
                raise AssertionError(agg)
            total += w * loss_bt
            weights[b, t] = w
    grad = [[0.0] * cols for _ in range(rows)]
    for (b, t), w in weights.items():
        grad[b][t] = w * ref_token_grad(lp[b][t], old[b][t], a_at(b, t), cl, ch, c)
    return total, grad


def ref_metrics(lp, old, adv, mask, cl, ch, c):
    hi = lo = dual = kl = kl1 = rsum = 0.0
    n = 0
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            r = math.exp(lp[b][t] - old[b][t])
            n += 1
            hi += a > 0 and r > 1 + ch
            lo += a < 0 and r < 1 - cl
            dual += c is not None and a < 0 and r > c
            kl += r - 1 - math.log(r)
            kl1 += old[b][t] - lp[b][t]
            rsum += r
    d = max(n, 1)
    return {
        "clip_frac_high": hi / d,
        "clip_frac_low": lo / d,
        "dual_clip_frac": dual / d,
        "approx_kl": kl / d,
        "approx_kl_k1": kl1 / d,
        "ratio_mean": rsum / d,
        "num_tokens": float(n),
    }


def run(lp, old, adv, mask, **kwargs):
    """policy_loss on tensors -> (loss float, grad tensor, metrics)."""
    lp = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, metrics


def make_batch(seed: int, rows: int = 6, cols: int = 7, per_token_adv: bool = False):
    """Random batch covering: clipped high/low, dual clip, zero and negative advantages, an
    all-masked row, and rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(rows, cols, generator=g, dtype=DTYPE) * 3
    old = lp + (torch.rand(rows, cols, generator=g, dtype=DTYPE) * 3 - 1.5)  # ratio in ~[0.22, 4.5]
    adv_shape = (rows, cols) if per_token_adv else (rows,)
    adv = torch.randn(adv_shape, generator=g, dtype=DTYPE)
    adv[1] = 0.0
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    lengths[2] = 0  # a row with no unmasked token
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    return lp, old, adv, mask


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_matches_reference_loop(agg, dual_clip, per_token_adv):
    lp, old, adv, mask = make_batch(seed=1, per_token_adv=per_token_adv)
    loss, grad, metrics = run(lp, old, adv, mask, agg=agg, dual_clip=dual_clip)
    ref_loss, ref_grad = ref_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), agg, c=dual_clip)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=DTYPE), rtol=1e-12, atol=1e-12)
    ref = ref_metrics(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, dual_clip)
    assert metrics == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_batch_exercises_every_branch():
    # Guards the test above: the random batch must really hit each clip case.
    lp, old, adv, mask = make_batch(seed=1)
    _, _, metrics = run(lp, old, adv, mask, dual_clip=2.0)
    assert metrics["clip_frac_high"] > 0 and metrics["clip_frac_low"] > 0 and metrics["dual_clip_frac"] > 0
    ratio = torch.exp(lp - old)[mask]
    unclipped = ((ratio >= 0.8) & (ratio <= 1.28)).sum()
    assert unclipped > 0


@pytest.mark.parametrize("clip_low, clip_high", [(0.2, 0.28), (0.1, 0.1)])
def test_custom_clip_ranges_match_reference(clip_low, clip_high):
    lp, old, adv, mask = make_batch(seed=2)
    loss, grad, _ = run(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high)
    ref_loss, ref_grad = ref_policy_loss(
        lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), "token-mean", cl=clip_low, ch=clip_high
    )
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=DTYPE))


def test_clip_higher_is_asymmetric():
    # A > 0, ratio 1.25: inside DAPO's [0.8, 1.28] (gradient flows) but clipped by a symmetric 0.2.
    old = torch.zeros(1, 1, dtype=DTYPE)
    lp = torch.full((1, 1), math.log(1.25), dtype=DTYPE)
    adv = torch.ones(1, dtype=DTYPE)
    mask = torch.ones(1, 1, dtype=torch.bool)
    _, grad_dapo, m_dapo = run(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    _, grad_sym, m_sym = run(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert grad_dapo.item() == pytest.approx(-1.25)
    assert grad_sym.item() == 0.0
    assert (m_dapo["clip_frac_high"], m_sym["clip_frac_high"]) == (0.0, 1.0)


def _exact_exp(x: float) -> float:
    """exp(x) as torch computes it for a (1, 1) float64 tensor (the shape the test uses: a 0-d
    tensor may take a different kernel), so bounds can be placed exactly on a ratio."""
    return torch.exp(torch.full((1, 1), x, dtype=DTYPE)).item()


def _step_past(x: float, direction: float) -> float:
    """The nearest log-ratio beyond x whose float64 ratio differs from exp(x)."""
    past = math.nextafter(x, direction)
    while _exact_exp(past) == _exact_exp(x):
        past = math.nextafter(past, direction)
    return past


@pytest.mark.parametrize("side", ["high", "low", "dual"])
def test_ratio_exactly_at_bound_is_not_clipped(side):
    # Choose the bound equal to the ratio torch will compute, then step one ulp past it.
    if side == "high":
        x, a = 0.2, 1.0
        ratio = _exact_exp(x)
        kwargs = dict(clip_low=0.2, clip_high=ratio - 1)
        assert 1 + kwargs["clip_high"] == ratio  # precondition: the bound really is exact
        past = _step_past(x, math.inf)
    elif side == "low":
        x, a = -0.25, -1.0
        ratio = _exact_exp(x)
        kwargs = dict(clip_low=1 - ratio, clip_high=0.28)
        assert 1 - kwargs["clip_low"] == ratio
        past = _step_past(x, -math.inf)
    else:
        x, a = 1.5, -2.0
        ratio = _exact_exp(x)
        kwargs = dict(dual_clip=ratio)
        past = _step_past(x, math.inf)
    old = torch.zeros(1, 1, dtype=DTYPE)
    adv = torch.tensor([a], dtype=DTYPE)
    mask = torch.ones(1, 1, dtype=torch.bool)

    loss, grad, metrics = run(torch.full((1, 1), x, dtype=DTYPE), old, adv, mask, **kwargs)
    assert loss == pytest.approx(-ratio * a, rel=1e-15)
    assert grad.item() == pytest.approx(-a * ratio, rel=1e-15)  # full gradient at the bound
    assert metrics["clip_frac_high"] == metrics["clip_frac_low"] == metrics["dual_clip_frac"] == 0.0

    _, grad_past, metrics_past = run(torch.full((1, 1), past, dtype=DTYPE), old, adv, mask, **kwargs)
    assert grad_past.item() == 0.0
    key = {"high": "clip_frac_high", "low": "clip_frac_low", "dual": "dual_clip_frac"}[side]
    assert metrics_past[key] == 1.0


def test_zero_width_clip_at_ratio_one():
    # clip_low = clip_high = 0 puts both bounds on r = 1 exactly; r = 1 must keep gradient -A.
    lp = torch.zeros(2, 3, dtype=DTYPE)
    adv = torch.tensor([2.0, -3.0], dtype=DTYPE)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, grad, metrics = run(lp, lp.clone(), adv, mask, clip_low=0.0, clip_high=0.0)
    assert loss == pytest.approx(-(2.0 - 3.0) / 2)
    torch.testing.assert_close(grad, -adv[:, None].expand(2, 3) / 6)
    assert metrics["clip_frac_high"] == metrics["clip_frac_low"] == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 3, dtype=DTYPE)
    lp = torch.log(torch.tensor([[20.0, 5.0, 2.0]], dtype=DTYPE))
    mask = torch.ones(1, 3, dtype=torch.bool)
    neg = torch.tensor([-1.0], dtype=DTYPE)
    loss, grad, metrics = run(lp, old, neg, mask, dual_clip=10.0, agg="seq-mean-token-sum")
    assert loss == pytest.approx(10.0 + 5.0 + 2.0)  # 20 is bounded at c * |A| = 10
    torch.testing.assert_close(grad, torch.tensor([[0.0, 5.0, 2.0]], dtype=DTYPE))
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 3)
    # Without dual clip the same token is unbounded; with A > 0 the dual clip never applies.
    assert run(lp, old, neg, mask, agg="seq-mean-token-sum")[0] == pytest.approx(27.0)
    pos = torch.tensor([1.0], dtype=DTYPE)
    assert run(lp, old, pos, mask, dual_clip=10.0, agg="seq-mean-token-sum")[0] == pytest.approx(-3 * 1.28)


def test_zero_advantage_gives_zero_loss_and_gradient():
    lp, old, _, mask = make_batch(seed=3)
    loss, grad, _ = run(lp, old, torch.zeros(lp.shape[0], dtype=DTYPE), mask, dual_clip=3.0)
    assert loss == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("rows", [0, 3])
def test_empty_batch_gives_zero_loss_with_grad_path(agg, rows):
    lp = torch.randn(rows, 4, dtype=DTYPE, requires_grad=True)
    mask = torch.zeros(rows, 4, dtype=torch.bool)
    loss, metrics = policy_loss(lp, lp.detach() + 1, torch.ones(rows, dtype=DTYPE), mask, agg=agg)
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.equal(grad, torch.zeros_like(lp))
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["num_tokens"] == 0.0


@pytest.mark.parametrize("agg", AGGS)
def test_garbage_at_masked_positions_is_ignored(agg):
    lp, old, adv, mask = make_batch(seed=4, per_token_adv=True)
    clean = run(lp, old, adv, mask, agg=agg, dual_clip=3.0)
    lp_bad, old_bad, adv_bad = lp.clone(), old.clone(), adv.clone()
    lp_bad[~mask] = -math.inf
    old_bad[~mask] = math.nan
    adv_bad[~mask] = math.inf
    dirty = run(lp_bad, old_bad, adv_bad, mask, agg=agg, dual_clip=3.0)
    assert dirty[0] == clean[0]
    assert torch.equal(dirty[1], clean[1])
    assert dirty[2] == clean[2]


def test_extreme_log_ratio_stays_finite():
    lp = torch.tensor([[0.0, -200.0, 200.0]], dtype=torch.float32)
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for adv in (torch.tensor([1.0]), torch.tensor([-1.0])):
        loss, grad, metrics = run(lp, old, adv, mask)
        assert math.isfinite(loss) and torch.isfinite(grad).all()
        assert all(math.isfinite(v) for v in metrics.values())


def test_float_mask_and_low_precision_logprobs():
    lp, old, adv, mask = make_batch(seed=5)
    ref = run(lp, old, adv, mask)
    as_float = run(lp, old, adv, mask.to(DTYPE))
    assert as_float[0] == ref[0]
    # bf16 log-probs: the ratio is computed in float32 and the loss is float32.
    loss, _ = policy_loss(lp.bfloat16().requires_grad_(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32


def test_gradient_does_not_flow_into_old_logprobs_or_advantages():
    lp, old, adv, mask = make_batch(seed=6)
    old = old.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    loss, _ = policy_loss(lp.clone().requires_grad_(True), old, adv, mask)
    grads = torch.autograd.grad(loss, [old, adv], allow_unused=True)
    assert grads == (None, None)


# ----------------------------------------------------------------------------- splitting


def _trim(mask: torch.Tensor) -> int:
    """Columns needed by a micro-batch: its own longest row (so pieces have different T)."""
    lengths = mask.sum(-1)
    return max(int(lengths.max()) if lengths.numel() else 0, 1)


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_with_global_normalizer_sum_to_full_batch(agg):
    lp, old, adv, mask = make_batch(seed=7, rows=8, cols=9)
    mask[5] = False  # a micro-batch below is entirely empty: rows 5
    max_len = mask.shape[1]
    full_norm = loss_normalizer(mask, agg, max_len=max_len)
    full_loss, full_grad, _ = run(lp, old, adv, mask, agg=agg, dual_clip=3.0, normalizer=full_norm)
    if agg != "seq-mean-token-sum-norm":  # with L = T, the default normaliser is the global one
        assert full_loss == pytest.approx(run(lp, old, adv, mask, agg=agg, dual_clip=3.0)[0], rel=1e-12)

    lp_leaf = lp.clone().requires_grad_(True)
    total = 0.0
    for rows in ([0, 1, 2], [3, 4], [5], [6, 7]):
        cols = _trim(mask[rows])  # each micro-batch padded only to its own length
        loss, _ = policy_loss(
            lp_leaf[rows, :cols],
            old[rows, :cols],
            adv[rows],
            mask[rows, :cols],
            agg=agg,
            dual_clip=3.0,
            normalizer=full_norm,
        )
        loss.backward()  # gradient accumulation
        total += loss.item()
    assert total == pytest.approx(full_loss, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(lp_leaf.grad, full_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("agg", AGGS)
def test_data_parallel_shards_with_all_reduced_normalizer(agg):
    lp, old, adv, mask = make_batch(seed=8, rows=8, cols=6, per_token_adv=True)
    shards = [torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])]
    # Each learner computes its shard's count; an all-reduce (sum) gives the global normaliser.
    local = [loss_normalizer(mask[s], agg, max_len=6) for s in shards]
    assert sum(local) == loss_normalizer(mask, agg, max_len=6)
    full_loss, full_grad, _ = run(lp, old, adv, mask, agg=agg, normalizer=loss_normalizer(mask, agg, max_len=6))
    grad_sum = torch.zeros_like(lp)
    loss_sum = 0.0
    for s in shards:
        loss, grad, _ = run(lp[s], old[s], adv[s], mask[s], agg=agg, normalizer=sum(local))
        grad_sum[s] += grad
        loss_sum += loss
    assert loss_sum == pytest.approx(full_loss, rel=1e-12)
    torch.testing.assert_close(grad_sum, full_grad, rtol=1e-12, atol=1e-15)


def test_per_micro_batch_token_mean_averaged_is_not_dapo():
    # The pitfall: averaging each micro-batch's own token-mean weights a short micro-batch's tokens
    # more than a long one's. One micro-batch of 1 token (loss 1 each) vs one of 9 tokens (loss 0).
    lp = torch.zeros(2, 9, dtype=DTYPE)
    adv = torch.tensor([-1.0, 0.0], dtype=DTYPE)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :1] = True
    mask[1, :] = True
    full = run(lp, lp, adv, mask)[0]
    assert full == pytest.approx(1 / 10)  # DAPO: every token weighs 1/10
    averaged = (run(lp[:1], lp[:1], adv[:1], mask[:1])[0] + run(lp[1:], lp[1:], adv[1:], mask[1:])[0]) / 2
    assert averaged == pytest.approx(1 / 2)
    assert averaged != pytest.approx(full)
    with_global = sum(
        run(lp[i : i + 1], lp[i : i + 1], adv[i : i + 1], mask[i : i + 1], normalizer=loss_normalizer(mask))[0]
        for i in range(2)
    )
    assert with_global == pytest.approx(full)


def test_token_mean_legacy_pieces_follow_verls_micro_batch_formula():
    """ "token-mean-legacy" (verl's actor when the paper's run was made): on each of 2 data-parallel
    learners, the sum over its micro-batches of (the micro-batch's own token mean x its rows / the
    learner's rows), then DDP's average over the learners (so no world-size scaling)."""
    agg = "token-mean-legacy"
    lp, old, adv, mask = make_batch(seed=11, rows=8, cols=9)
    shards = [[[0, 1, 2], [3]], [[4, 5], [6, 7]]]  # learner -> its micro-batches (rows)
    minibatch_normalizer = loss_normalizer(mask, agg)
    world = len(shards)
    lp_leaf = lp.clone().requires_grad_(True)
    total = 0.0
    for micro_batches in shards:
        shard_rows = sum(len(rows) for rows in micro_batches)
        for rows in micro_batches:
            cols = _trim(mask[rows])  # each piece padded only to its own length
            normalizer, scale_by_world_size = piece_normalizer(
                mask[rows, :cols],
                agg,
                minibatch_normalizer=minibatch_normalizer,
                piece_row_share=len(rows) / shard_rows,
            )
            assert scale_by_world_size is False
            loss, _ = policy_loss(
                lp_leaf[rows, :cols], old[rows, :cols], adv[rows], mask[rows, :cols], agg=agg, normalizer=normalizer
            )
            (loss / world).backward()  # accumulate; DDP averages the learners' gradients
            total += loss.item() / world

    # verl: mean over learners of sum over micro-batches of token_mean(micro) * micro rows / learner rows.
    reference, reference_grad = 0.0, torch.zeros_like(lp)
    micro_tokens = []
    for micro_batches in shards:
        shard_rows = sum(len(rows) for rows in micro_batches)
        for rows in micro_batches:
            value, grad = ref_policy_loss(
                lp[rows].tolist(), old[rows].tolist(), adv[rows].tolist(), mask[rows].tolist(), "token-mean"
            )
            weight = len(rows) / shard_rows / world
            reference += weight * value
            reference_grad[rows] += weight * torch.tensor(grad, dtype=DTYPE)
            micro_tokens.append(int(mask[rows].sum()))
    assert micro_tokens[0] != micro_tokens[1] and micro_tokens[2] != micro_tokens[3]  # unequal micro-batches
    assert total == pytest.approx(reference, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(lp_leaf.grad, reference_grad, rtol=1e-12, atol=1e-15)

    # DAPO's token-mean weighs every token alike, whatever the split: a different loss here.
    token_mean = run(lp, old, adv, mask, agg="token-mean")[0]
    assert abs(total - token_mean) > 1e-3
    assert piece_normalizer(mask[:4], "token-mean", minibatch_normalizer=minibatch_normalizer, piece_row_share=0.5) == (
        minibatch_normalizer,
        True,
    )
    # One learner, one piece: the legacy loss is the token mean.
    normalizer, _ = piece_normalizer(mask, agg, minibatch_normalizer=minibatch_normalizer)
    assert run(lp, old, adv, mask, agg=agg, normalizer=normalizer)[0] == pytest.approx(token_mean, rel=1e-12)


def test_loss_normalizer_values():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    assert loss_normalizer(mask, "token-mean") == 5.0
    assert loss_normalizer(mask, "seq-mean-token-mean") == 2.0
    assert loss_normalizer(mask, "seq-mean-token-sum") == 2.0
    assert loss_normalizer(mask, "seq-mean-token-sum-norm") == 8.0
    assert loss_normalizer(mask, "seq-mean-token-sum-norm", max_len=10) == 20.0
    assert loss_normalizer(torch.zeros(0, 4, dtype=torch.bool), "token-mean") == 0.0


def test_token_mean_differs_from_sequence_mean():
    # Different aggregations must actually differ on ragged lengths (guards against aliasing).
    lp, old, adv, mask = make_batch(seed=9)
    values = {agg: run(lp, old, adv, mask, agg=agg)[0] for agg in AGGS}
    assert len({round(v, 12) for v in values.values()}) == len(AGGS)


# ----------------------------------------------------------------------------- registry and validation


def test_registry_names_and_duplicate_rejected():
    assert set(AGGS) <= set(LOSS_AGGREGATIONS)
    with pytest.raises(ValueError, match="token-mean"):
        register_loss_aggregation("token-mean", lambda p, m: p.sum(), lambda m, L: m.sum())


def test_registered_aggregation_is_used():
    name = "test-token-sum"
    register_loss_aggregation(name, lambda p, m: p.sum(), lambda m, L: torch.ones((), dtype=torch.long))
    try:
        lp, old, adv, mask = make_batch(seed=10)
        tokens = mask.sum().item()
        assert run(lp, old, adv, mask, agg=name)[0] == pytest.approx(run(lp, old, adv, mask)[0] * tokens)
    finally:
        del LOSS_AGGREGATIONS[name]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(agg="sequence-mean"), "sequence-mean"),
        (dict(clip_low=1.0), "1.0"),
        (dict(clip_low=-0.1), "-0.1"),
        (dict(clip_high=-0.5), "-0.5"),
        (dict(dual_clip=1.0), "1.0"),
        (dict(dual_clip=0.5), "0.5"),
        (dict(normalizer=-3.0), "-3.0"),
        (dict(normalizer=math.nan), "nan"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    lp, old, adv, mask = make_batch(seed=11)
    with pytest.raises(ValueError, match=match):
        policy_loss(lp, old, adv, mask, **kwargs)


def test_invalid_shapes_and_masks_raise():
    lp, old, adv, mask = make_batch(seed=12, rows=3, cols=4)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        policy_loss(lp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        policy_loss(lp, old, adv[:2], mask)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        policy_loss(lp, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match=r"0\.5"):
        policy_loss(lp, old, adv, mask.to(DTYPE) * 0.5)
    with pytest.raises(ValueError, match="normalizer=0"):
        policy_loss(lp, old, adv, mask, normalizer=0)
    with pytest.raises(ValueError, match="bad-agg"):
        loss_normalizer(mask, "bad-agg")


# ----------------------------------------------------------------------------- properties


@st.composite
def batches(draw):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 5))
    floats = st.floats(-3, 3, allow_nan=False, allow_infinity=False)
    lp = draw(st.lists(st.lists(floats, min_size=cols, max_size=cols), min_size=rows, max_size=rows))
    delta = draw(st.lists(st.lists(floats, min_size=cols, max_size=cols), min_size=rows, max_size=rows))
    adv = draw(st.lists(floats, min_size=rows, max_size=rows))
    mask = draw(st.lists(st.lists(st.booleans(), min_size=cols, max_size=cols), min_size=rows, max_size=rows))
    lp_t = torch.tensor(lp, dtype=DTYPE)
    return lp_t, lp_t + torch.tensor(delta, dtype=DTYPE), torch.tensor(adv, dtype=DTYPE), torch.tensor(mask)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(batches(), st.sampled_from(AGGS), st.sampled_from([None, 1.5, 10.0]))
def test_property_matches_reference_and_is_finite(batch, agg, dual_clip):
    lp, old, adv, mask = batch
    loss, grad, metrics = run(lp, old, adv, mask, agg=agg, dual_clip=dual_clip)
    ref_loss, ref_grad = ref_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), agg, c=dual_clip)
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=DTYPE), rtol=1e-9, atol=1e-12)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(batches())
def test_property_ratio_one_token_mean_is_minus_mean_advantage(batch):
    lp, _, adv, mask = batch
    loss, grad, metrics = run(lp, lp, adv, mask, agg="token-mean")
    per_token = adv[:, None].expand_as(lp)[mask]
    expected = -per_token.mean().item() if per_token.numel() else 0.0
    assert loss == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # At r = 1 nothing is clipped: the gradient is -A / #tokens on every unmasked token.
    expected_grad = torch.where(mask, -adv[:, None] / max(per_token.numel(), 1), 0.0)
    torch.testing.assert_close(grad, expected_grad)
    assert metrics["clip_frac_high"] == metrics["clip_frac_low"] == metrics["approx_kl"] == 0.0
