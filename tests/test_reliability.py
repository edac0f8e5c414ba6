"""Faults injected into a real DAPO run (tiny preset, local learner): what the run does about them.

Non-finite numbers: NaN or inf advantages reach the real loss and backward pass; the update is
skipped with the weights and AdamW's state untouched, counted, and too many in a row stop the run
with a message naming the iteration.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from ray.rllib.core import DEFAULT_MODULE_ID

import dapo_rl.dapo as dapo_module
from dapo_rl import DAPOConfig
from dapo_rl.dapo import NonFiniteUpdatesError

ENV = "dapo/Arithmetic-v0"
#: 4 prompts x 4 responses per step, 2 prompts per update: 2 updates per train().
TINY = dict(
    group_size=4, prompts_per_step=4, minibatch_prompts=2, generation_batch_prompts=4, max_prompt_length=64,
    max_response_length=8, overlong_cache_len=4, lr=1e-3, lr_warmup_steps=0, num_epochs=1, dynamic_sampling=False,
    # The random-init model's responses all run to the limit: unfiltered, every update has loss tokens
    # (an update without any still steps AdamW, whose weight decay moves the weights).
    overlong_filter=False,
)
UPDATES_PER_STEP = TINY["prompts_per_step"] // TINY["minibatch_prompts"]


def make_config(**training) -> DAPOConfig:
    return (
        DAPOConfig()
        .rl_module(model_config={"model": "tiny-qwen2"})
        .environment(ENV, env_config={"operators": "+"})
        .training(**{**TINY, **training})
        .debugging(seed=0)
    )


def learner_weights(algo) -> dict[str, np.ndarray]:
    return {key: np.array(value, copy=True) for key, value in algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[key] - b[key]))) for key in a)


def optimizer_state_size(algo) -> int:
    optimizer = next(iter(algo.learner_group._learner._named_optimizers.values()))
    return len(optimizer.state)


@pytest.fixture
def poison_advantages(monkeypatch):
    """``poison(value)`` makes the driver's next train batches carry ``value`` as every advantage
    (real rollouts, real loss and backward); ``poison(None)`` stops it."""
    poisoned = {"value": None}
    real_build = dapo_module.build_train_batch

    def build(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        if poisoned["value"] is not None:
            batch["advantages"] = batch["advantages"].fill_(poisoned["value"])
        return batch

    monkeypatch.setattr(dapo_module, "build_train_batch", build)
    return lambda value: poisoned.__setitem__("value", value)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_update_is_skipped_with_weights_and_optimizer_untouched(ray_session, poison_advantages, bad_value):
    algo = make_config().build_algo()
    try:
        before = learner_weights(algo)
        poison_advantages(bad_value)
        result = algo.train()
        assert max_abs_diff(before, learner_weights(algo)) == 0.0
        assert optimizer_state_size(algo) == 0  # AdamW never stepped: no moments were written
        assert result["dapo"]["nonfinite_updates_skipped"] == UPDATES_PER_STEP
        assert result["dapo"]["optimizer_steps"] == 0
        assert result["learners"][DEFAULT_MODULE_ID]["nonfinite_update_skipped"] == UPDATES_PER_STEP

        # The next, clean step trains as usual and the run's count stays.
        poison_advantages(None)
        result = algo.train()
        assert result["dapo"]["optimizer_steps"] == UPDATES_PER_STEP
        assert result["dapo"]["nonfinite_updates_skipped"] == UPDATES_PER_STEP
        assert result["learners"][DEFAULT_MODULE_ID]["nonfinite_update_skipped"] == 0
        assert optimizer_state_size(algo) > 0
    finally:
        algo.stop()


def test_consecutive_non_finite_updates_stop_the_run_naming_the_iteration(ray_session, poison_advantages):
    algo = make_config(max_consecutive_nonfinite_updates=3).build_algo()
    try:
        algo.train()  # clean
        poison_advantages(math.nan)
        algo.train()  # 2 skipped in a row: below the limit
        with pytest.raises(NonFiniteUpdatesError) as raised:
            algo.train()  # the third in a row
    finally:
        algo.stop()
    message = str(raised.value)
    assert message.startswith("iteration 3:")
    assert "max_consecutive_nonfinite_updates=3" in message
    assert f"optimizer step {UPDATES_PER_STEP}" in message


def test_max_consecutive_nonfinite_updates_is_validated():
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_updates must be an integer >= 1, got 0"):
        make_config(max_consecutive_nonfinite_updates=0).validate()


def test_sharded_learners_agree_to_skip_when_one_shard_is_poisoned(ray_session, monkeypatch):
    """Two FSDP2 learner processes (DTensor gradients); NaN advantages in the first group only, so in
    one learner's rows. The driver raises if the learners' decisions differ."""
    real_build = dapo_module.build_train_batch

    def build(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        batch["advantages"][batch["group_index"] == 0] = math.nan
        return batch

    monkeypatch.setattr(dapo_module, "build_train_batch", build)
    algo = make_config(data_parallel="fsdp2").learners(num_learners=2).build_algo()
    try:
        result = algo.train()
        # One of the two updates held group 0: that one was skipped on both learners, the other not.
        assert result["dapo"]["nonfinite_updates_skipped"] == 1
        assert result["dapo"]["optimizer_steps"] == UPDATES_PER_STEP - 1
    finally:
        algo.stop()
