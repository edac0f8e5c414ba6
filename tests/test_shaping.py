"""Overlong shaping: soft overlong punishment (paper Eq. 13) and overlong filtering."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_rl.core.shaping import overlong_mask, soft_overlong_penalty


def ref_penalty(length: int, max_len: int, cache_len: int, factor: float = 1.0) -> float:
    """Eq. 13 written out case by case."""
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return factor * ((max_len - cache_len) - length) / cache_len
    return -1.0 * factor


def test_paper_settings_by_hand():
    lengths = torch.tensor([0, 16384, 16385, 18432, 20480, 20481, 30000])
    out = soft_overlong_penalty(lengths, max_len=20480, cache_len=4096)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0, -1.0]))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("max_len, cache_len, factor", [(20, 4, 1.0), (20, 20, 0.5), (7, 1, 2.0), (50, 13, 1.0)])
def test_matches_reference_for_every_length(max_len, cache_len, factor):
    lengths = torch.arange(0, max_len + 5)
    out = soft_overlong_penalty(lengths, max_len=max_len, cache_len=cache_len, factor=factor)
    expected = [ref_penalty(n, max_len, cache_len, factor) for n in lengths.tolist()]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_shape_dtype_and_non_tensor_inputs():
    lengths = torch.tensor([[15, 17], [20, 25]])
    out = soft_overlong_penalty(lengths, max_len=20, cache_len=4)
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.25], [-1.0, -1.0]]))
    assert (
        soft_overlong_penalty(torch.tensor([18.0], dtype=torch.float64), max_len=20, cache_len=4).dtype == torch.float64
    )
    torch.testing.assert_close(soft_overlong_penalty([16, 18], max_len=20, cache_len=4), torch.tensor([0.0, -0.5]))
    assert soft_overlong_penalty(19, max_len=20, cache_len=4).item() == pytest.approx(-0.75)


def test_truncated_wrong_answer_totals_minus_two():
    # Reference-script note: correctness -1 plus the full overlong penalty -1.
    reward = torch.tensor([-1.0]) + soft_overlong_penalty(torch.tensor([20480]), max_len=20480, cache_len=4096)
    assert reward.item() == -2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_len=20, cache_len=0), "cache_len"),
        (dict(max_len=20, cache_len=21), "21"),
        (dict(max_len=20, cache_len=-3), "-3"),
        (dict(max_len=0, cache_len=1), "max_len"),
        (dict(max_len=20, cache_len=4, factor=float("inf")), "inf"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_overlong_penalty(torch.tensor([10]), **kwargs)


def test_negative_length_raises():
    with pytest.raises(ValueError, match="-1"):
        soft_overlong_penalty(torch.tensor([3, -1]), max_len=20, cache_len=4)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    st.integers(1, 5000).flatmap(lambda m: st.tuples(st.just(m), st.integers(1, m))),
    st.lists(st.integers(0, 6000), min_size=1, max_size=20),
    st.floats(0.0, 3.0),
)
def test_property_bounded_and_non_increasing(lens, lengths, factor):
    max_len, cache_len = lens
    lengths = sorted(lengths)
    out = soft_overlong_penalty(torch.tensor(lengths), max_len=max_len, cache_len=cache_len, factor=factor)
    assert (out <= 0).all() and (out >= -factor - 1e-6).all()
    assert (out[1:] <= out[:-1] + 1e-6).all()
    expected = [ref_penalty(n, max_len, cache_len, factor) for n in lengths]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- overlong filtering


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.long])
def test_overlong_mask_zeroes_truncated_rows(dtype):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]).to(dtype)
    original = mask.clone()
    truncated = torch.tensor([False, True, False, True])
    out = overlong_mask(truncated, mask)
    expected = [[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert out.dtype == dtype
    assert out.tolist() == torch.tensor(expected).to(dtype).tolist()
    assert torch.equal(mask, original)  # input untouched
    assert torch.equal(overlong_mask(torch.tensor([0, 1, 0, 1]), mask), out)


def test_overlong_mask_validation():
    mask = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        overlong_mask(torch.zeros(2, dtype=torch.bool), mask)
    with pytest.raises(ValueError, match="0/1"):
        overlong_mask(torch.tensor([0, 2, 1]), mask)
