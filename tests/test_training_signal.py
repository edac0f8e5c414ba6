"""Loud degenerate training: a step that trains on little or nothing says so, naming the setting
that explains it, in result["warnings"], in a logged warning and on the iteration line."""

from __future__ import annotations

import logging
import math

from dapo_rl.jobs.tracking import summary_line
from dapo_rl.training import DEGENERATE_SHARE, training_signal_warnings
from tests.helpers import ScriptedPolicy, built_algo, make_config

HEALTHY = dict(
    prompts_trained=32,
    prompts_generated=48,
    all_correct_group_ratio=0.2,
    all_wrong_group_ratio=0.1,
    response_clip_ratio=0.05,
    loss_token_frac=0.97,
    zero_advantage_frac=0.0,
)
SETTINGS = dict(overlong_filter=True, max_response_length=16, dynamic_sampling=True, on_sampling_limit="train")


def test_a_healthy_step_says_nothing():
    assert training_signal_warnings(HEALTHY, **SETTINGS) == []
    just_below = {**HEALTHY, "response_clip_ratio": DEGENERATE_SHARE - 0.01, "loss_token_frac": 0.11}
    assert training_signal_warnings(just_below, **SETTINGS) == []


def test_no_trained_group_is_named_with_the_group_shares():
    metrics = {
        **HEALTHY,
        "prompts_trained": 0,
        "all_correct_group_ratio": 0.25,
        "all_wrong_group_ratio": 0.75,
        "loss_token_frac": math.nan,
        "zero_advantage_frac": math.nan,
    }
    (said,) = training_signal_warnings(metrics, **SETTINGS)
    assert said == (
        "no group was trained on: none of the 48 prompts got both right and wrong answers (all right in "
        "25% of the groups, all wrong in 75%); on_sampling_limit='train' went on without them"
    )


def test_truncated_responses_under_the_overlong_filter_name_both_settings():
    metrics = {**HEALTHY, "response_clip_ratio": DEGENERATE_SHARE, "loss_token_frac": 0.1}
    (said,) = training_signal_warnings(metrics, **SETTINGS)
    assert said.startswith("90% of the responses reached max_response_length (16)")
    assert "overlong_filter=False" in said
    # Without the filter the truncated responses still carry loss: nothing to say about them.
    assert training_signal_warnings(metrics, **{**SETTINGS, "overlong_filter": False}) == [
        "only 10% of the trained responses' tokens carry loss (token_mask): the update had almost nothing to learn from"
    ]


def test_zero_advantages_without_dynamic_sampling_name_it():
    metrics = {**HEALTHY, "zero_advantage_frac": 1.0}
    assert training_signal_warnings(metrics, **SETTINGS) == []  # dynamic sampling keeps mixed groups only
    (said,) = training_signal_warnings(metrics, **{**SETTINGS, "dynamic_sampling": False})
    assert said.startswith("100% of the trained responses have advantage 0") and "dynamic_sampling=True" in said


def scripted(algo, text: str, finished: bool) -> None:
    """Every response of the algorithm's local runner is ``text`` (cut at the budget unless finished)."""
    policy = ScriptedPolicy(algo._tokenizer, lambda context: (text, finished))
    algo.env_runner.backend = algo.env_runner.generation.backend = policy


def test_a_real_step_on_nothing_says_so(ray_session, caplog):
    """Every response runs past the 8-token budget: masked by the overlong filter, all wrong alike
    (advantage 0), with dynamic sampling off."""
    with caplog.at_level(logging.WARNING, logger="dapo_rl.rllib.dapo"), built_algo(make_config()) as algo:
        scripted(algo, "x" * 40, finished=False)
        result = algo.train()
    assert result["dapo"]["response_clip_ratio"] == 1.0 and result["dapo"]["loss_token_frac"] == 0.0
    assert result["dapo"]["zero_advantage_frac"] == 1.0
    truncated, zero = result["warnings"]
    assert truncated.startswith("100% of the responses reached max_response_length (8)")
    assert zero.startswith("100% of the trained responses have advantage 0")
    line = summary_line(result)
    assert line.splitlines()[1:] == [f"  warning: {truncated}", f"  warning: {zero}"]
    assert [r.getMessage() for r in caplog.records if r.name == "dapo_rl.rllib.dapo"] == [
        f"iteration 1: {truncated}",
        f"iteration 1: {zero}",
    ]


def test_finished_responses_carry_loss_and_only_the_zero_advantages_are_said(ray_session):
    with built_algo(make_config()) as algo:
        scripted(algo, "no", finished=True)  # short, finished, and wrong for every problem
        result = algo.train()
    assert result["dapo"]["loss_token_frac"] == 1.0 and result["dapo"]["response_clip_ratio"] == 0.0
    (said,) = result["warnings"]
    assert "advantage 0" in said
    assert "\n  warning: " + said in summary_line(result)
