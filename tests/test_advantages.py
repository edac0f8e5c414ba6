"""group_advantages against a per-group Python loop (statistics.mean / statistics.stdev)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_rl.core.advantages import ADVANTAGE_SCALES, group_advantages


def ref_advantages(rewards: list[float], groups: list[int], eps: float = 1e-6, scale: str = "std") -> list[float]:
    members: dict[int, list[float]] = {}
    for reward, group in zip(rewards, groups, strict=True):
        members.setdefault(group, []).append(reward)
    out = []
    for reward, group in zip(rewards, groups, strict=True):
        values = members[group]
        if len(set(values)) == 1:  # constant group, singletons included
            out.append(0.0)
            continue
        mean = statistics.fmean(values)
        if scale == "std":
            out.append((reward - mean) / (statistics.stdev(values) + eps))
        else:
            out.append(reward - mean)
    return out


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_matches_reference_with_unsorted_noncontiguous_groups(scale):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, -3, 100, 5])
    group_index = ids[torch.randint(0, 4, (40,), generator=g)]
    rewards = torch.randn(40, generator=g, dtype=torch.float64)
    out = group_advantages(rewards, group_index, scale=scale)
    expected = ref_advantages(rewards.tolist(), group_index.tolist(), scale=scale)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_dapo_binary_rewards_by_hand():
    # G = 4, one correct: mean -0.5, unbiased std sqrt((1.5^2 + 3 * 0.5^2) / 3) = 1.
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0])
    out = group_advantages(rewards, torch.tensor([0, 0, 0, 0]))
    torch.testing.assert_close(out, torch.tensor([1.5, -0.5, -0.5, -0.5]) / (1 + 1e-6))
    out_none = group_advantages(rewards, torch.tensor([0, 0, 0, 0]), scale="none")
    torch.testing.assert_close(out_none, torch.tensor([1.5, -0.5, -0.5, -0.5]))


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_constant_and_singleton_groups_are_exactly_zero(scale):
    # 3 x 0.1 does not average back to 0.1 in floating point: still exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 5.0, -1.0, -1.0, 1.0, 1e30, 1e30], dtype=torch.float64)
    groups = torch.tensor([4, 4, 4, 9, 2, 2, 2, 8, 8])
    out = group_advantages(rewards, groups, scale=scale)
    assert torch.equal(out[[0, 1, 2, 3, 7, 8]], torch.zeros(6, dtype=torch.float64))
    assert (out[[4, 5, 6]] != 0).all()


def test_dtype_and_empty_input():
    assert group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0])).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0])).dtype == torch.float64
    assert group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])).dtype == torch.get_default_dtype()
    empty = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_eps_is_used():
    rewards, groups = torch.tensor([1.0, -1.0]), torch.tensor([0, 0])  # std = sqrt(2)
    out = group_advantages(rewards, groups, eps=1.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0]) / (math.sqrt(2) + 1.0))


@pytest.mark.parametrize(
    "rewards, groups, kwargs, match",
    [
        (torch.ones(3), torch.zeros(3, dtype=torch.long), dict(scale="mad"), "mad"),
        (torch.ones(3), torch.zeros(2, dtype=torch.long), {}, r"\(2,\)"),
        (torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), {}, r"\(2, 3\)"),
        (torch.ones(3), torch.zeros(3), {}, "float32"),
        (torch.tensor([1.0, math.nan]), torch.zeros(2, dtype=torch.long), {}, "nan"),
        (torch.ones(3), torch.zeros(3, dtype=torch.long), dict(eps=0.0), "0.0"),
    ],
)
def test_invalid_inputs_raise(rewards, groups, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, groups, **kwargs)


rewards_and_groups = st.integers(1, 30).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([-1.0, 1.0, 0.0, 0.1, 0.5, -2.5, 1e-7, 3e5]), min_size=n, max_size=n),
        st.lists(st.integers(-5, 5), min_size=n, max_size=n),
    )
)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(rewards_and_groups, st.sampled_from(ADVANTAGE_SCALES))
def test_property_reference_zero_mean_finite(data, scale):
    rewards, groups = data
    out = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), scale=scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, torch.tensor(ref_advantages(rewards, groups, scale=scale), dtype=torch.float64), rtol=1e-9, atol=1e-9
    )
    for group in set(groups):
        members = out[torch.tensor(groups) == group]
        assert abs(members.sum().item()) <= 1e-9 * max(1.0, members.abs().max().item())


@settings(max_examples=50, deadline=None, derandomize=True)
@given(rewards_and_groups, st.randoms(use_true_random=False))
def test_property_permutation_and_relabel_equivariant(data, rng):
    rewards, groups = data
    out = group_advantages(torch.tensor(rewards), torch.tensor(groups))
    perm = list(range(len(rewards)))
    rng.shuffle(perm)
    relabel = {g: 1000 - 7 * g for g in set(groups)}  # different ids, different sort order
    out_perm = group_advantages(
        torch.tensor([rewards[i] for i in perm]), torch.tensor([relabel[groups[i]] for i in perm])
    )
    torch.testing.assert_close(out_perm, out[perm])  # summation order may differ
