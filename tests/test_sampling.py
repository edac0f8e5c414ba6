"""Dynamic sampling: the informative-group filter and the multi-round accumulator."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_rl.core.sampling import (
    DynamicSamplingAccumulator,
    SamplingRoundLimitError,
    select_informative_groups,
)


def ref_informative(correct: list[bool], groups: list[int]) -> list[bool]:
    outcomes: dict[int, set[bool]] = {}
    for c, g in zip(correct, groups, strict=True):
        outcomes.setdefault(g, set()).add(bool(c))
    return [len(outcomes[g]) == 2 for g in groups]


def test_select_matches_reference():
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([9, -4, 30, 2, 11])[torch.randint(0, 5, (60,), generator=g)]
    correct = torch.rand(60, generator=g) < 0.3
    out = select_informative_groups(correct, groups)
    assert out.dtype == torch.bool
    assert out.tolist() == ref_informative(correct.tolist(), groups.tolist())
    assert out.any() and not out.all()  # the random case has both kinds of group


def test_select_by_hand_and_01_input():
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    correct = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    assert select_informative_groups(correct, groups).tolist() == [True, True, False, False, False, False, False]
    assert select_informative_groups(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_select_rejects_shaped_rewards_and_bad_shapes():
    groups = torch.tensor([0, 0, 1, 1])
    # A +-1 reward (or one with an overlong penalty) is not correctness: rejected loudly.
    with pytest.raises(ValueError, match="-1"):
        select_informative_groups(torch.tensor([1.0, -1.0, -1.0, -1.5]), groups)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        select_informative_groups(torch.tensor([True, False, True]), groups)
    with pytest.raises(ValueError, match="float32"):
        select_informative_groups(torch.tensor([True, False, True, True]), groups.float())


def round_batch(start_id: int, correct: list[bool], groups: list[int]):
    n = len(correct)
    batch = {
        "response_id": torch.arange(start_id, start_id + n),
        "tokens": torch.arange(start_id, start_id + n)[:, None].repeat(1, 3),
        "text": [f"r{start_id + i}" for i in range(n)],
        "group_index": torch.tensor(groups),  # overwritten by the renumbered ids in result()
    }
    return batch, torch.tensor(correct), torch.tensor(groups)


def test_accumulates_until_target_and_drops_surplus_whole_groups():
    acc = DynamicSamplingAccumulator(target_groups=3, max_sampling_rounds=5)
    # Round 1: group 0 mixed, 1 all correct, 2 mixed -> 2 kept.
    assert not acc.add(*round_batch(0, [1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 2, 2]))
    assert (acc.rounds, acc.num_groups, acc.done) == (1, 2, False)
    # Round 2 (ids reused, interleaved, unsorted): groups 8, 3, 5 all mixed; only 8 (first seen) is needed.
    assert acc.add(*round_batch(100, [1, 1, 0, 0, 1, 0], [8, 3, 8, 3, 5, 5]))
    assert (acc.rounds, acc.num_groups, acc.done) == (2, 3, True)
    out = acc.result()
    assert out["response_id"].tolist() == [0, 1, 4, 5, 100, 102]
    assert out["tokens"][:, 0].tolist() == [0, 1, 4, 5, 100, 102]
    assert out["text"] == ["r0", "r1", "r4", "r5", "r100", "r102"]
    assert out["group_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert acc.num_responses == 6
    with pytest.raises(RuntimeError, match="done"):
        acc.add(*round_batch(200, [1, 0], [0, 0]))


def test_surplus_keeps_groups_in_order_of_first_appearance():
    acc = DynamicSamplingAccumulator(target_groups=2, max_sampling_rounds=1)
    acc.add(*round_batch(0, [1, 0, 0, 1, 0, 1, 0, 1], [5, 9, 5, 2, 2, 9, 7, 7]))
    out = acc.result()
    # First appearances: 5 (pos 0), 9 (pos 1), 2, 7 -> keep 5 and 9, renumbered 0 and 1.
    assert out["response_id"].tolist() == [0, 1, 2, 5]
    assert out["group_index"].tolist() == [0, 1, 0, 1]


def test_round_limit_raises_with_clear_message():
    acc = DynamicSamplingAccumulator(target_groups=4, max_sampling_rounds=2)
    acc.add(*round_batch(0, [1, 0, 1, 1], [0, 0, 1, 1]))
    with pytest.raises(SamplingRoundLimitError) as info:
        acc.add(*round_batch(10, [0, 0, 1, 0], [0, 0, 1, 1]))
    message = str(info.value)
    assert "max_sampling_rounds=2" in message and "after 2 generation rounds" in message
    assert "kept 2 of the 4 prompts" in message
    assert isinstance(info.value, RuntimeError)
    assert (info.value.rounds, info.value.num_groups) == (2, 2)
    assert acc.result()["response_id"].tolist() == [0, 1, 12, 13]  # still available


def test_round_limit_not_hit_when_target_met_on_last_round():
    acc = DynamicSamplingAccumulator(target_groups=2, max_sampling_rounds=2)
    acc.add(*round_batch(0, [1, 1], [0, 0]))
    assert acc.add(*round_batch(10, [1, 0, 0, 1], [0, 0, 1, 1]))
    assert not acc.limit_reached


def test_on_limit_train_returns_what_was_collected():
    acc = DynamicSamplingAccumulator(target_groups=4, max_sampling_rounds=2, on_sampling_limit="train")
    assert not acc.add(*round_batch(0, [1, 0, 1, 1], [0, 0, 1, 1]))
    assert acc.add(*round_batch(10, [0, 0, 1, 1], [0, 0, 1, 1]))
    assert acc.done and acc.limit_reached and acc.num_groups == 1
    assert acc.result()["group_index"].tolist() == [0, 0]


def test_unlimited_rounds():
    acc = DynamicSamplingAccumulator(target_groups=1, max_sampling_rounds=0)
    for _ in range(30):
        assert not acc.add(*round_batch(0, [1, 1], [0, 0]))
    assert acc.rounds == 30 and acc.num_groups == 0
    assert acc.result()["response_id"].shape == (0,)


def test_accumulator_validation():
    with pytest.raises(ValueError, match="0"):
        DynamicSamplingAccumulator(target_groups=0, max_sampling_rounds=3)
    with pytest.raises(ValueError, match="retry"):
        DynamicSamplingAccumulator(target_groups=2, max_sampling_rounds=3, on_sampling_limit="retry")
    acc = DynamicSamplingAccumulator(target_groups=5, max_sampling_rounds=3)
    batch, correct, groups = round_batch(0, [1, 0], [0, 0])
    with pytest.raises(ValueError, match="text"):
        acc.add({**batch, "text": ["only one"]}, correct, groups)
    acc.add(batch, correct, groups)
    with pytest.raises(ValueError, match="keys"):
        acc.add({"response_id": batch["response_id"]}, correct, groups)
    assert DynamicSamplingAccumulator(target_groups=1, max_sampling_rounds=1).result() == {}


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    st.integers(1, 4),
    st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=10),
        min_size=1,
        max_size=5,
    ),
)
def test_property_result_holds_only_mixed_whole_groups(target, rounds):
    acc = DynamicSamplingAccumulator(target_groups=target, max_sampling_rounds=0)
    origin: dict[int, tuple[int, int]] = {}  # response id -> (round, original group id)
    outcome: dict[int, bool] = {}
    group_size: dict[tuple[int, int], int] = {}
    next_id = expected_kept = 0
    for r, round_ in enumerate(rounds):
        if acc.done:
            break
        groups, correct = [g for g, _ in round_], [c for _, c in round_]
        informative_groups = {g for g, flag in zip(groups, ref_informative(correct, groups), strict=True) if flag}
        expected_kept += min(len(informative_groups), target - expected_kept)
        for i, (g, c) in enumerate(round_):
            origin[next_id + i], outcome[next_id + i] = (r, g), c
            group_size[r, g] = group_size.get((r, g), 0) + 1
        acc.add(*round_batch(next_id, correct, groups))
        next_id += len(round_)
    out = acc.result()
    assert acc.num_groups == expected_kept <= target
    ids = out["group_index"].tolist()
    assert sorted(set(ids)) == list(range(expected_kept))
    # Every kept group is one whole original group with both correct and wrong answers.
    for k in set(ids):
        members = [rid for rid, gid in zip(out["response_id"].tolist(), ids, strict=True) if gid == k]
        assert len({origin[m] for m in members}) == 1
        assert len(members) == group_size[origin[members[0]]]
        assert len({outcome[m] for m in members}) == 2
