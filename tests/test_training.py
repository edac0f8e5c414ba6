"""The Ray-free pieces of a DAPO step: prompt order, dynamic sampling loop, batch assembly, mini-batches."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import dapo_envs  # noqa: F401
from dapo_rl.core import SamplingRoundLimitError, loss_normalizer
from dapo_rl.core.micro_batches import token_budget_micro_batches, trim_padding
from dapo_rl.rollout.prompt_sampler import PromptSampler
from dapo_rl.training import build_train_batch, collect_groups, minibatch_indices, minibatch_with_loss_normalizer


def _env():
    return gym.make("dapo/Arithmetic-v0", operators="+").unwrapped


def test_prompt_sampler_is_reproducible_and_restorable():
    first = PromptSampler(_env(), seed=3)
    drawn = [p.problem_id for p in first.next(5)]
    state = first.get_state()
    following = [p.problem_id for p in first.next(7)]
    restored = PromptSampler(_env(), seed=99)
    restored.set_state(state)
    assert [p.problem_id for p in restored.next(7)] == following
    assert [p.problem_id for p in PromptSampler(_env(), seed=3).next(5)] == drawn


def test_prompt_sampler_covers_a_data_set_once_per_epoch():
    env = gym.make("dapo/AIME24-v0").unwrapped
    sampler = PromptSampler(env, seed=0)
    ids = [p.problem_id for p in sampler.next(30)]
    assert sorted(ids) == sorted(env.problem(i).problem_id for i in range(30))
    assert sampler.epoch == 0
    sampler.next(1)
    assert sampler.epoch == 1


def _fake_round(correct_by_group):
    """A generate_round whose groups have the given per-response correctness."""
    calls = {"count": 0}

    def generate_round(num_prompts):
        calls["count"] += 1
        pattern = correct_by_group[(calls["count"] - 1) % len(correct_by_group)]
        group_size = len(pattern[0])
        acc = np.array([pattern[g % len(pattern)] for g in range(num_prompts)], dtype=bool).reshape(-1)
        n = num_prompts * group_size
        return {
            "prompt_token_ids": [[1, 2]] * n,
            "response_token_ids": [[3, 4, 5][: 1 + i % 3] for i in range(n)],
            "pred": [""] * n,
            "group_index": np.repeat(np.arange(num_prompts), group_size),
            "truncated": np.arange(n) % 5 == 0,
            "response_length": np.array([1 + i % 3 for i in range(n)]),
            "score": np.where(acc, 1.0, -1.0).astype(np.float32),
            "acc": acc,
            "generate_seconds": 0.1,
            "score_seconds": 0.01,
        }

    return generate_round, calls


def test_dynamic_sampling_keeps_only_mixed_groups_until_the_target():
    # Groups alternate: all wrong, mixed, all right.
    generate_round, calls = _fake_round([[[False] * 4, [True, False, False, True], [True] * 4]])
    batch, stats, _ = collect_groups(
        generate_round,
        prompts_per_step=5,
        generation_batch_prompts=6,
        dynamic_sampling=True,
        max_sampling_rounds=10,
        on_sampling_limit="error",
    )
    assert stats.rounds == 3 and calls["count"] == 3  # 2 mixed groups per round of 6
    assert stats.groups_kept == 5
    assert batch["group_index"].unique().tolist() == [0, 1, 2, 3, 4]
    for group in range(5):
        acc = batch["acc"][batch["group_index"] == group]
        assert 0 < acc.sum() < len(acc)
    assert stats.all_wrong_groups == 6 and stats.all_correct_groups == 6


def test_dynamic_sampling_round_limit_in_both_modes():
    generate_round, _ = _fake_round([[[False] * 4]])
    with pytest.raises(SamplingRoundLimitError, match="max_sampling_rounds=2 after 2 generation rounds, having kept 0"):
        collect_groups(
            generate_round,
            prompts_per_step=4,
            generation_batch_prompts=4,
            dynamic_sampling=True,
            max_sampling_rounds=2,
            on_sampling_limit="error",
        )
    _, stats, _ = collect_groups(
        generate_round,
        prompts_per_step=4,
        generation_batch_prompts=4,
        dynamic_sampling=True,
        max_sampling_rounds=2,
        on_sampling_limit="train",
    )
    assert stats.limit_reached and stats.rounds == 2 and stats.groups_kept == 0


def test_without_dynamic_sampling_one_round_is_the_batch():
    generate_round, calls = _fake_round([[[False] * 2, [True, False]]])
    batch, stats, _ = collect_groups(
        generate_round,
        prompts_per_step=3,
        generation_batch_prompts=99,
        dynamic_sampling=False,
        max_sampling_rounds=1,
        on_sampling_limit="error",
    )
    assert calls["count"] == 1 and stats.groups_kept == 3 and len(batch["acc"]) == 6


def _collected():
    generate_round, _ = _fake_round([[[True, False, False, True]]])
    batch, _, _ = collect_groups(
        generate_round,
        prompts_per_step=4,
        generation_batch_prompts=4,
        dynamic_sampling=False,
        max_sampling_rounds=1,
        on_sampling_limit="error",
    )
    return batch


def test_build_train_batch_shapes_rewards_and_masks():
    collected = _collected()
    batch = build_train_batch(
        collected,
        pad_token_id=0,
        max_response_length=3,
        overlong_cache_len=2,
        overlong_penalty_factor=1.0,
        overlong_filter=True,
        advantage_scale="std",
    )
    lengths = collected["response_length"]
    # Eq. 13 with L_max 3, L_cache 2: 0 up to length 1, -0.5 at 2, -1 at 3.
    expected_penalty = torch.tensor([{1: 0.0, 2: -0.5, 3: -1.0}[int(n)] for n in lengths])
    torch.testing.assert_close(batch["rewards"], collected["score"] + expected_penalty)
    truncated = collected["truncated"]
    assert torch.all(batch["token_mask"][truncated] == 0)
    assert torch.equal(batch["token_mask"][~truncated], batch["response_mask"][~truncated])
    for group in range(4):
        assert abs(float(batch["advantages"][batch["group_index"] == group].mean())) < 1e-5


def test_minibatches_are_whole_groups_covering_each_group_once():
    group_index = torch.arange(6).repeat_interleave(4)
    batches = minibatch_indices(group_index, minibatch_prompts=2, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 3
    seen = torch.cat(batches).sort().values
    assert torch.equal(seen, torch.arange(24))
    for rows in batches:
        assert len(group_index[rows].unique()) == 2


def test_minibatch_with_loss_normalizer_trims_padding_and_carries_the_global_normaliser():
    collected = _collected()
    batch = build_train_batch(
        collected,
        pad_token_id=0,
        max_response_length=3,
        overlong_cache_len=2,
        overlong_penalty_factor=0.0,
        overlong_filter=False,
        advantage_scale="std",
    )
    batch["old_logprobs"] = torch.randn(batch["response_mask"].shape)
    rows = torch.tensor([1, 4])  # responses of lengths 2 and 2
    mini = minibatch_with_loss_normalizer(batch, rows, loss_agg="token-mean", max_response_length=3)
    assert mini["response_mask"].shape[1] == 2
    assert mini["input_ids"].shape[1] == 2 + 2
    assert torch.equal(mini["old_logprobs"], batch["old_logprobs"][rows][:, :2])
    assert float(mini["loss_normalizer"][0]) == loss_normalizer(batch["token_mask"][rows], "token-mean") == 4.0


def test_token_budget_micro_batches_respect_the_budget_and_cover_every_row():
    from dapo_rl.rollout.batch import pack_sequences

    prompts = [[1] * n for n in (3, 5, 2, 4, 6, 1)]
    responses = [[2] * n for n in (4, 1, 7, 2, 3, 5)]
    batch = pack_sequences(prompts, responses, pad_token_id=0)
    micro = token_budget_micro_batches(batch, max_tokens=20)
    assert torch.equal(torch.cat(micro).sort().values, torch.arange(6))
    lengths = batch["attention_mask"].sum(dim=1)
    for rows in micro:
        assert len(rows) == 1 or len(rows) * int(lengths[rows].max()) <= 20
        trimmed = trim_padding({key: value[rows] for key, value in batch.items()})
        assert trimmed["input_ids"].shape[1] == int(lengths[rows].max()) or len(rows) > 1
    assert [len(rows) for rows in token_budget_micro_batches(batch, max_tokens=1)] == [1] * 6
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        token_budget_micro_batches(batch, max_tokens=0)
