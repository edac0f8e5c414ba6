"""What one DAPO step computes, on scripted responses (metrics, samples, advantages from shaped
rewards), and the learner's loss settings through RLlib (dual clip, epochs, token-mean-legacy)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

import dapo_rl.rllib.dapo as dapo_module
from dapo_rl.core import policy_loss
from tests.helpers import (
    ALL_RIGHT,
    ALL_WRONG_GROUP,
    ARITHMETIC_PROMPT,
    ENV,
    ENV_CONFIG,
    MIXED,
    SCRIPTED,
    TINY,
    ScriptedGeneration,
    built_algo,
    learner_weights,
    make_config,
    max_abs_diff,
    record_step_lrs,
    unequal_minibatch,
)

# The local env runner's backend is replaced by a script that answers each prompt with known texts
# (right or wrong, finished or truncated, of chosen lengths); the rest of the step -- verifier,
# shaping, dynamic sampling, advantages, updates, metrics -- is the real one. Every expectation is
# recomputed here from the script with the paper's formulas, not with the library's functions.


def overlong_penalty(length: int, max_len: int = 16, cache: int = 12) -> float:
    """Paper Eq. 13."""
    expected = max_len - cache
    if length <= expected:
        return 0.0
    return (expected - length) / cache if length <= max_len else -1.0


def shaped_reward(row: dict) -> float:
    return (1.0 if row["correct"] else -1.0) + overlong_penalty(row["length"])


def hand_group_advantages(rewards: list[float]) -> list[float]:
    """(R - mean) / (std + 1e-6) within one group, unbiased std; 0 for a constant group."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.max() == values.min():
        return [0.0] * len(values)
    return list((values - values.mean()) / (values.std(ddof=1) + 1e-6))


#: One round of 7 prompts, 4 of them mixed: exactly prompts_per_step informative groups.
ROUND_KINDS = [MIXED, ALL_RIGHT, MIXED, ALL_WRONG_GROUP, ALL_RIGHT, MIXED, MIXED]


@pytest.fixture(scope="module")
def scripted_step(ray_session):
    """One train() on scripted responses with dynamic sampling: 7 prompts generated, the 4 mixed
    groups trained; the rollouts collect_groups returned, and the result."""
    rounds_seen = []
    real_collect = dapo_module.collect_groups

    def spy(*args, **kwargs):
        collected, stats, rounds = real_collect(*args, **kwargs)
        rounds_seen.append(rounds)
        return collected, stats, rounds

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dapo_module, "collect_groups", spy)
        algo = make_config(
            **SCRIPTED,
            dynamic_sampling=True,
            generation_batch_prompts=len(ROUND_KINDS),
            max_sampling_rounds=2,
            on_sampling_limit="error",
            log_samples=6,
        ).build_algo()
        try:
            script = ScriptedGeneration(algo, ROUND_KINDS)
            result = algo.train()
        finally:
            algo.stop()
    (rounds,) = rounds_seen
    return dict(result=result, script=script, rounds=rounds)


def test_step_metrics_follow_from_the_scripted_responses(scripted_step):
    result, (call,) = scripted_step["result"], scripted_step["script"].calls
    dapo = result["dapo"]
    generated = [row for group in call for row in group["rows"]]
    trained = [row for group in call if group["kind"] == MIXED for row in group["rows"]]
    rewards = [shaped_reward(row) for row in trained]
    advantages = [
        a
        for group in call
        if group["kind"] == MIXED
        for a in hand_group_advantages([shaped_reward(row) for row in group["rows"]])
    ]
    lengths = [row["length"] for row in generated]
    expected = {
        "reward_mean": np.mean(rewards),
        "reward_max": max(rewards),
        "reward_min": min(rewards),
        "train_accuracy": np.mean([row["correct"] for row in trained]),  # 1/2
        "generated_accuracy": np.mean([row["correct"] for row in generated]),  # 16/28
        "advantage_mean": np.mean(advantages),
        "advantage_max": max(advantages),
        "advantage_min": min(advantages),
        "response_length_mean": np.mean(lengths),
        "response_length_max": max(lengths),
        "response_length_min": min(lengths),
        "response_clip_ratio": np.mean([row["truncated"] for row in generated]),
        "sampling_rounds": 1,
        "prompts_generated": 7,
        "prompts_trained": 4,
        "kept_group_ratio": 4 / 7,
        "all_correct_group_ratio": 2 / 7,
        "all_wrong_group_ratio": 1 / 7,
        "sampling_limit_reached": 0.0,
        "optimizer_steps": 2,  # 4 prompts / 2 per mini-batch
    }
    for key, value in expected.items():
        assert dapo[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    assert dapo["generated_tokens_per_second"] == pytest.approx(sum(lengths) / dapo["generate_seconds"], rel=1e-6)
    # Re-scoring the responses the step logged with the environment's verifier gives its accuracy.
    (rollout,) = scripted_step["rounds"]
    assert rollout["response_text"] == [row["text"] for row in generated]
    env = gym.make(ENV, **ENV_CONFIG).unwrapped
    references = [str(group["answer"]) for group in call for _ in group["rows"]]
    rescored = env.score(rollout["response_text"], references)
    assert [r.acc for r in rescored] == [row["correct"] for row in generated]
    assert dapo["generated_accuracy"] == pytest.approx(np.mean([r.acc for r in rescored]))
    # Overlong filtering: the loss ran on the finished trained responses' tokens only.
    learner = result["learners"][DEFAULT_MODULE_ID]
    assert learner["num_tokens"] == sum(row["length"] for row in trained if not row["truncated"])
    assert result["env_runners"]["num_env_steps_sampled_lifetime"] == len(generated)


def test_log_samples_are_first_responses_of_the_round_rescored(scripted_step, ray_session):
    """result["samples"]: the first response to each of the first log_samples prompts of the step's
    first generation round (trained on or not), with the verifier's verdict and the shaped reward."""
    samples = scripted_step["result"]["samples"]
    (call,) = scripted_step["script"].calls
    assert len(samples) == min(6, len(call))  # log_samples=6, 7 prompts in the round
    env = gym.make(ENV, **ENV_CONFIG).unwrapped
    tokenizer = scripted_step["script"].tokenizer
    for sample, group in zip(samples, call[:6], strict=True):
        assert set(sample) == {"prompt", "response", "pred", "score", "reason", "reward", "acc", "truncated"}
        assert sample["prompt"] == group["prompt"]
        assert sample["response"] == group["rows"][0]["text"]
        # The reference comes from the prompt itself; the verifier re-scores the logged response.
        reference = sum(int(x) for x in ARITHMETIC_PROMPT.search(sample["prompt"]).groups())
        (verdict,) = env.score([sample["response"]], [str(reference)])
        assert (sample["acc"], sample["pred"], sample["score"], sample["reason"]) == (
            verdict.acc,
            verdict.pred,
            verdict.score,
            verdict.reason,
        )
        length = len(tokenizer.encode(sample["response"], add_special_tokens=False)) + (0 if sample["truncated"] else 1)
        assert sample["reward"] == pytest.approx(verdict.score + overlong_penalty(length))
        assert sample["truncated"] == group["rows"][0]["truncated"]
    assert [s["acc"] for s in samples] == [True, True, True, False, True, True]  # both verdicts occur
    # At most the round's prompts (4 here); 0 switches samples off.
    for log_samples, expected in ((2, 2), (9, TINY["prompts_per_step"]), (0, 0)):
        with built_algo(make_config(log_samples=log_samples)) as algo:
            logged = algo.train()["samples"]
        assert len(logged) == expected, log_samples


def test_advantages_come_from_the_shaped_rewards(ray_session, monkeypatch):
    """Groups all right or all wrong, responses of different lengths in the overlong window: the
    verifier's scores are constant per group (advantage 0), the shaped rewards are not."""
    batches, minibatches = [], []
    real_build = dapo_module.build_train_batch
    monkeypatch.setattr(
        dapo_module, "build_train_batch", lambda *a, **k: batches.append(real_build(*a, **k)) or batches[-1]
    )
    with built_algo(make_config(**SCRIPTED, dynamic_sampling=False, overlong_filter=False)) as algo:
        script = ScriptedGeneration(algo, [ALL_RIGHT, ALL_WRONG_GROUP])
        real_update = algo._update
        algo._update = lambda minibatch: minibatches.append(minibatch["advantages"].clone()) or real_update(minibatch)
        result = algo.train()
    (call,), (batch,) = script.calls, batches
    expected = [a for group in call for a in hand_group_advantages([shaped_reward(row) for row in group["rows"]])]
    for group in range(4):  # the verifier's scores alone would give every response advantage 0
        assert len(set(batch["score"][batch["group_index"] == group].tolist())) == 1
    assert all(abs(a) > 0.3 for a in expected)
    torch.testing.assert_close(batch["advantages"], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    # ... and these are the advantages the learner trained on, and the step reports.
    torch.testing.assert_close(
        torch.sort(torch.cat(minibatches)).values, torch.sort(torch.tensor(expected, dtype=torch.float32)).values
    )
    assert result["dapo"]["advantage_max"] == pytest.approx(max(expected), rel=1e-5)


def hand_loss(algo, batch: dict[str, torch.Tensor], rows=slice(None), *, dual_clip=None, agg="token-mean"):
    """(loss, metrics, gradient norm) of ``policy_loss`` on ``rows`` of a mini-batch under the local
    learner's current weights (one pass over those rows, their own normaliser)."""
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
    parameters = [p for p in module.parameters() if p.requires_grad]
    piece = {key: value[rows] for key, value in batch.items()}
    logprobs = module.forward_train(piece)["logprobs"]
    config = algo.config
    loss, metrics = policy_loss(
        logprobs,
        piece["old_logprobs"],
        piece["advantages"],
        piece["token_mask"],
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        dual_clip=dual_clip,
        agg=agg,
    )
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    norm = math.sqrt(sum(float(g.square().sum()) for g in gradients if g is not None))
    return float(loss.detach()), metrics, norm


def test_dual_clip_bounds_the_loss_of_negative_advantage_tokens(ray_session):
    with built_algo(make_config(overlong_filter=False, dual_clip=3.0)) as algo:
        learner = algo.train()["learners"][DEFAULT_MODULE_ID]
        assert learner["dual_clip_frac"] == 0.0  # on-policy ratios stay far below the bound 3

        batch = unequal_minibatch(algo)
        # Rows 4-7 have negative advantages: every other token of theirs gets ratio e^1.5 = 4.5 > 3.
        current = algo._old_logprobs(batch)
        shift = torch.zeros_like(current)
        shift[4:, ::2] = 1.5
        batch["old_logprobs"] = torch.where(shift > 0, current - shift, batch["old_logprobs"]) * batch["response_mask"]
        with_dual, metrics, norm = hand_loss(algo, batch, dual_clip=3.0)
        without, _, norm_without = hand_loss(algo, batch, dual_clip=None)
        assert metrics["dual_clip_frac"] > 0.2 and without - with_dual > 0.1  # the bound is active here
        assert abs(norm - norm_without) > 1e-3 * norm
        algo._update(batch)
        logged = algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]
    assert float(logged["policy_loss"]) == pytest.approx(with_dual, rel=1e-5, abs=1e-6)
    assert float(logged["dual_clip_frac"]) == pytest.approx(metrics["dual_clip_frac"], rel=1e-6)
    assert float(logged["gradients_default_optimizer_global_norm"]) == pytest.approx(norm, rel=1e-4)


def test_two_epochs_take_twice_the_optimizer_steps_on_the_same_batch(ray_session):
    runs = []
    for epochs in (1, 2):
        with built_algo(make_config(overlong_filter=False, num_epochs=epochs)) as algo:
            before = learner_weights(algo)
            rates = record_step_lrs(algo)
            result = algo.train()
            optimizer = algo.learner_group._learner._only_optimizer()
            adam_steps = {int(state["step"]) for state in optimizer.state.values()}
            runs.append(dict(result=result, steps=len(rates), adam_steps=adam_steps, weights=learner_weights(algo)))
    one, two = runs
    assert (one["steps"], two["steps"]) == (2, 4)  # optimizer.step() calls on the learner
    assert (one["adam_steps"], two["adam_steps"]) == ({2}, {4})
    assert (one["result"]["dapo"]["optimizer_steps"], two["result"]["dapo"]["optimizer_steps"]) == (2, 4)
    for key in ("reward_mean", "response_length_mean", "advantage_max"):  # the same generated batch
        assert one["result"]["dapo"][key] == two["result"]["dapo"][key], key
    assert max_abs_diff(before, one["weights"]) > 1e-5
    assert max_abs_diff(one["weights"], two["weights"]) > 1e-5  # the second epoch moved them further


def test_token_mean_legacy_weights_each_micro_batch_token_mean_by_its_rows(ray_session, monkeypatch):
    """verl's old aggregation: sum over micro-batches of (micro-batch token mean x micro rows / rows);
    token-mean on the same micro-batches stays the one-pass token mean."""
    import dapo_rl.rllib.learner

    splits = []
    original = dapo_rl.rllib.learner.token_budget_micro_batches
    monkeypatch.setattr(
        dapo_rl.rllib.learner,
        "token_budget_micro_batches",
        lambda *a, **k: splits.append(original(*a, **k)) or splits[-1],
    )
    budget = 40  # padded tokens: _unequal_minibatch's 8 rows split into 3 / 4 / 1 rows
    logged, one_pass, legacy = {}, {}, {}
    for agg in ("token-mean-legacy", "token-mean"):
        with built_algo(make_config(overlong_filter=False, loss_agg=agg, micro_batch_tokens=budget)) as algo:
            batch = unequal_minibatch(algo)
            micro_batches = original(batch, budget)
            tokens = [int(batch["token_mask"][rows].sum()) for rows in micro_batches]
            assert len(micro_batches) == 3 and len(set(tokens)) == 3, tokens
            one_pass[agg] = hand_loss(algo, batch)[0]
            legacy[agg] = sum(
                hand_loss(algo, batch, rows)[0] * len(rows) / len(batch["token_mask"]) for rows in micro_batches
            )
            splits.clear()
            algo._update(batch)
            assert [rows.tolist() for rows in splits[0]] == [rows.tolist() for rows in micro_batches]
            logged[agg] = float(algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]["policy_loss"])
    # Both algorithms started from the same weights and got the same mini-batch.
    assert one_pass["token-mean"] == pytest.approx(one_pass["token-mean-legacy"], rel=1e-6)
    assert abs(legacy["token-mean"] - one_pass["token-mean"]) > 0.05  # the micro-batches' token counts differ
    assert logged["token-mean-legacy"] == pytest.approx(legacy["token-mean-legacy"], rel=1e-5, abs=1e-6)
    assert logged["token-mean"] == pytest.approx(one_pass["token-mean"], rel=1e-5, abs=1e-6)
