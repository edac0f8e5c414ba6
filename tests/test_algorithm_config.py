"""DAPOConfig.validate() and .training(): inconsistent settings named with their values, the model
and its context, the generation round."""

from __future__ import annotations

import pytest

import dapo_rl.rllib.dapo as dapo_module
from dapo_rl import DAPOConfig
from tests.helpers import (
    ENV,
    ENV_CONFIG,
    TINY,
    built_algo,
    make_config,
)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(prompts_per_step=4, minibatch_prompts=3), ["minibatch_prompts (3)", "prompts_per_step (4)"]),
        (dict(max_response_length=4, overlong_cache_len=4), ["max_response_length (4)", "overlong_cache_len (4)"]),
        (dict(max_response_length=3, overlong_cache_len=5), ["max_response_length (3)", "overlong_cache_len (5)"]),
        (dict(loss_agg="sequence-sum"), ["loss_agg", "'sequence-sum'", "token-mean"]),
        (dict(group_size=1), ["group_size must be an integer >= 2", "got 1"]),
        (dict(env=None), ["env must be", "None"]),
        # 1 prompt x 3 responses = 3 rows per update cannot be split over 2 learners.
        (dict(group_size=3, minibatch_prompts=1, num_learners=2), ["= 3)", "num_learners (2)"]),
    ],
    ids=["minibatch", "overlong-equal", "overlong-greater", "loss-agg", "group-size", "no-env", "learner-rows"],
)
def test_validate_rejects_inconsistent_settings(settings, expected):
    settings = dict(settings)
    env = settings.pop("env", ENV)
    num_learners = settings.pop("num_learners", None)
    config = make_config(env=env, **settings)
    if num_learners is not None:
        config.learners(num_learners=num_learners)
    with pytest.raises(ValueError) as info:
        config.validate()
    message = str(info.value)
    for text in expected:
        assert text in message, f"{text!r} not in: {message}"


def test_validate_accepts_consistent_settings():
    for config in (
        make_config(),
        make_config(group_size=3, minibatch_prompts=2).learners(num_learners=2),
    ):  # 6 rows / 2
        assert config._dapo_problems() == []
        config.validate()  # RLlib's own checks pass too


def test_rllibs_validation_switch_skips_dapos_checks_too():
    with pytest.raises(dapo_module.InvalidConfigError, match="group_size"):
        make_config(group_size=0).validate()
    make_config(group_size=0).experimental(_validate_config=False).validate()


def test_training_rejects_unknown_key():
    with pytest.raises(TypeError, match="unknown_key"):
        DAPOConfig().training(unknown_key=1)
    with pytest.raises(TypeError, match="group_sise"):
        DAPOConfig().training(group_sise=4)


def test_validate_rejects_unknown_data_parallel():
    config = make_config(data_parallel="zero3")
    with pytest.raises(ValueError, match=r"data_parallel must be one of \['ddp', 'fsdp2'\], got 'zero3'"):
        config.validate()


def test_validate_without_a_model_names_model_config():
    config = DAPOConfig().environment(ENV, env_config=ENV_CONFIG).training(**TINY)
    with pytest.raises(ValueError) as info:
        config.validate()
    assert "model_config" in str(info.value)


def test_validate_names_lengths_beyond_the_tiny_context():
    config = make_config(max_prompt_length=500, max_response_length=100, overlong_cache_len=4)
    with pytest.raises(ValueError) as info:
        config.validate()
    message = str(info.value)
    for text in ("max_prompt_length (500)", "max_response_length (100)", "512"):
        assert text in message, message
    make_config(max_prompt_length=500, max_response_length=12, overlong_cache_len=4).validate()  # 512 fits


def test_generation_rounds_default_to_three_times_the_prompts_per_step(ray_session):
    assert DAPOConfig().generation_round_prompts == 3 * 512  # the paper's 1,536
    config = make_config(
        dynamic_sampling=True, generation_batch_prompts=None, max_sampling_rounds=1, on_sampling_limit="train"
    )
    assert config.generation_round_prompts == 3 * TINY["prompts_per_step"]
    with built_algo(config) as algo:
        calls = []
        backend = algo.env_runner.backend
        real_generate = backend.generate
        backend.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or real_generate(prompts, *a, **k)
        dapo = algo.train()["dapo"]
    assert calls == [12]  # one round (the limit) of 3 x 4 prompts
    assert dapo["prompts_generated"] == 12 and dapo["sampling_rounds"] == 1
