"""Dynamic sampling through the algorithm: the round limit (error or train on what was kept), and
only mixed groups trained."""

from __future__ import annotations

import math
import zlib

import gymnasium as gym
import pytest
import torch

import dapo_rl.rllib.dapo as dapo_module
from dapo_rl.core.sampling import SamplingRoundLimitError
from tests.helpers import (
    TINY,
    built_algo,
    exception_text,
    learner_weights,
    make_config,
    max_abs_diff,
)

ALL_WRONG = dict(dynamic_sampling=True, max_sampling_rounds=2, generation_batch_prompts=4)


def test_dynamic_sampling_limit_error_names_limit_rounds_and_kept(ray_session):
    # The random model never answers an arithmetic problem right: every group is all wrong.
    with built_algo(make_config(**ALL_WRONG, on_sampling_limit="error")) as algo, pytest.raises(Exception) as info:
        algo.train()
    text = exception_text(info.value)
    assert "SamplingRoundLimitError" in text, text
    assert "max_sampling_rounds=2" in text and "after 2 generation rounds" in text, text
    assert "kept 0 of the 4 prompts" in text, text


def test_sampling_round_limit_error_survives_copy_and_pickle():
    # Ray/Tune copy.copy an exception raised in train() and pickle it between processes.
    import copy
    import pickle

    error = SamplingRoundLimitError(max_sampling_rounds=3, rounds=3, num_groups=1, target_groups=4)
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is SamplingRoundLimitError
        assert str(clone) == str(error)
        assert (clone.max_sampling_rounds, clone.rounds, clone.num_groups, clone.target_groups) == (3, 3, 1, 4)


def test_dynamic_sampling_limit_train_with_nothing_kept(ray_session):
    with built_algo(make_config(**ALL_WRONG, on_sampling_limit="train")) as algo:
        before = learner_weights(algo)
        result = algo.train()
        dapo = result["dapo"]
        assert dapo["sampling_rounds"] == 2
        assert dapo["sampling_limit_reached"] == 1.0
        assert dapo["prompts_trained"] == 0
        assert dapo["prompts_generated"] == 8
        assert dapo["all_wrong_group_ratio"] == 1.0
        assert dapo["optimizer_steps"] == 0
        assert math.isnan(dapo["reward_mean"])  # nothing trained on
        assert max_abs_diff(before, learner_weights(algo)) == 0.0  # no update happened
        assert algo.train()["training_iteration"] == 2  # and the run goes on


HASH_ENV = "dapo_test/HashCoin-v0"


def _hash_coin(response: str, reference: str) -> bool:
    """'Correct' for about one response in four, decided by a hash of its text: groups are mixed
    or all wrong at random, whatever the model."""
    return zlib.crc32(response.encode("utf-8")) % 4 == 0


def test_dynamic_sampling_keeps_only_mixed_groups(ray_session, monkeypatch):
    import dapo_envs

    if HASH_ENV not in gym.registry:
        dapo_envs.register_reasoning_env(
            HASH_ENV,
            dataset=[{"prompt": f"question {i}", "answer": str(i)} for i in range(32)],
            verifier=dapo_envs.Verifier(name="hash_coin", fn=_hash_coin, isolate=False),
            prompt_template="plain",
        )
    batches = []
    real_build = dapo_module.build_train_batch

    def spy(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        batches.append(batch)
        return batch

    monkeypatch.setattr(dapo_module, "build_train_batch", spy)
    algo = make_config(
        env=HASH_ENV,
        env_config={},
        dynamic_sampling=True,
        generation_batch_prompts=4,
        max_sampling_rounds=8,
        on_sampling_limit="error",
        overlong_filter=False,
    ).build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
    dapo = result["dapo"]
    assert dapo["prompts_trained"] == TINY["prompts_per_step"]
    assert dapo["sampling_limit_reached"] == 0.0
    assert 0.0 < dapo["train_accuracy"] < 1.0
    assert dapo["all_wrong_group_ratio"] + dapo["all_correct_group_ratio"] > 0  # some groups were filtered out
    assert dapo["prompts_generated"] > TINY["prompts_per_step"]
    assert dapo["optimizer_steps"] == 2
    (batch,) = batches
    group_index, acc = batch["group_index"], batch["acc"].float()
    assert sorted(torch.unique(group_index).tolist()) == [0, 1, 2, 3]
    for group in range(4):
        group_acc = acc[group_index == group]
        assert len(group_acc) == TINY["group_size"]
        assert 0 < float(group_acc.mean()) < 1, f"group {group} is not mixed: {group_acc.tolist()}"
