"""DAPO under Tune: two iterations with their metrics, the trial's files."""

from __future__ import annotations

import math

import pytest
from ray import tune
from ray.rllib.core import DEFAULT_MODULE_ID

from tests.helpers import (
    TINY,
    make_config,
)


def test_tune_runs_two_iterations_with_metrics(ray_session, tmp_path):
    tuner = tune.Tuner(
        "DAPO",  # registered by `import dapo_rl`
        # Unfiltered: the random-init model's responses mostly run to the limit, and a mini-batch
        # without loss tokens is skipped (no learner metrics).
        param_space=make_config(overlong_filter=False),
        run_config=tune.RunConfig(
            name="dapo_tune_test", stop={"training_iteration": 2}, storage_path=str(tmp_path), verbose=0
        ),
    )
    results = tuner.fit()
    assert results.num_errors == 0, [str(r.error) for r in results]
    metrics = results[0].metrics
    assert metrics["training_iteration"] == 2
    dapo = metrics["dapo"]
    # Counts that follow from the config (4 prompts x 4 responses, 2 mini-batches of 8 rows, no
    # dynamic sampling): what each metric measures is checked against scripted responses below.
    assert dapo["prompts_generated"] == TINY["prompts_per_step"]
    assert dapo["prompts_trained"] == TINY["prompts_per_step"]
    assert dapo["kept_group_ratio"] == 1.0
    assert dapo["sampling_rounds"] == 1
    assert dapo["optimizer_steps"] == 4  # 2 iterations x 2 mini-batches
    # Without dynamic sampling the trained responses are the generated ones.
    assert dapo["train_accuracy"] == dapo["generated_accuracy"]
    responses = TINY["prompts_per_step"] * TINY["group_size"]
    assert dapo["generated_tokens_per_second"] == pytest.approx(
        dapo["response_length_mean"] * responses / dapo["generate_seconds"], rel=1e-6
    )
    learner = metrics["learners"][DEFAULT_MODULE_ID]
    for key in ("policy_loss", "clip_frac_high", "clip_frac_low", "entropy", "approx_kl"):
        assert math.isfinite(learner[key]), key
    # The random-init tiny model is close to uniform over its 258 tokens (entropy log 258 = 5.55).
    assert learner["entropy"] > 0.95 * math.log(258)
    # 0 when the last update's groups were uniform (the random-init model's answers are mostly all
    # truncated alike); gradients' flow is checked by the learning and equivalence tests.
    assert math.isfinite(learner["gradients_default_optimizer_global_norm"])
    assert learner["default_optimizer_learning_rate"] == pytest.approx(TINY["lr"])  # no warm-up
    rows_per_update = TINY["minibatch_prompts"] * TINY["group_size"]
    assert learner["num_module_steps_trained"] == 2 * rows_per_update  # this iteration's 2 updates
    assert learner["num_module_steps_trained_lifetime"] == 4 * rows_per_update
    assert metrics["env_runners"]["num_env_steps_sampled_lifetime"] == 2 * responses
    for timer in ("generate_and_score", "old_logprobs", "update", "sync_weights", "training_iteration"):
        assert timer in metrics["timers"], timer
