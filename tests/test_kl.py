"""The optional KL penalty to a reference policy (issue 28): the estimators against hand computations
and their gradients, the loss term's aggregation, the settings, and the learner's term through RLlib
(off by default and then exactly today's loss; 0 at the first update, positive after)."""

from __future__ import annotations

import math

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from dapo_rl.core import (
    KL_ESTIMATORS,
    kl_loss,
    kl_penalized_rewards,
    kl_penalty,
    loss_normalizer,
    policy_loss,
    register_kl_estimator,
)
from dapo_rl.core.losses import LOG_RATIO_CLAMP, LOSS_AGGREGATIONS
from dapo_rl.rllib.dapo import InvalidConfigError
from dapo_rl.training import add_reward_kl_penalty
from tests.helpers import built_algo, make_config, unequal_minibatch

# (B, T) = (2, 3); the last column of row 1 is padding, holding values that must never leak.
LOGPROBS = [[-0.5, -1.0, -2.0], [-0.1, -3.0, math.inf]]
REF_LOGPROBS = [[-0.7, -1.0, -1.5], [-0.4, -2.0, math.nan]]
MASK = [[True, True, True], [True, True, False]]


def hand(estimator: str, log_r: float) -> tuple[float, float]:
    """(value, d value / d logprob) of one token's estimate, written out by hand."""
    if estimator == "k1":
        return log_r, 1.0
    if estimator == "k2":
        return 0.5 * log_r * log_r, log_r
    return math.exp(-log_r) - 1 + log_r, 1 - math.exp(-log_r)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_each_estimator_and_its_gradient_match_a_hand_computation(estimator):
    logprobs = torch.tensor(LOGPROBS, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(REF_LOGPROBS, dtype=torch.float64, requires_grad=True)
    values = kl_penalty(logprobs, ref, torch.tensor(MASK), estimator)
    values.sum().backward()
    for row in range(2):
        for column in range(3):
            if not MASK[row][column]:
                assert values[row, column] == 0 and logprobs.grad[row, column] == 0
                continue
            value, gradient = hand(estimator, LOGPROBS[row][column] - REF_LOGPROBS[row][column])
            assert float(values[row, column].detach()) == pytest.approx(value, rel=1e-12, abs=1e-15)
            assert float(logprobs.grad[row, column]) == pytest.approx(gradient, rel=1e-12, abs=1e-15)
    assert ref.grad is None or not ref.grad.any()  # the reference is data
    if estimator != "k1":
        assert bool((values >= 0).all())  # k2 and k3 are non-negative per token


def test_the_log_ratio_is_clamped_as_in_the_policy_loss():
    logprobs = torch.tensor([[0.0, -100.0]])
    ref = torch.tensor([[-100.0, 0.0]])
    values = kl_penalty(logprobs, ref, torch.ones(1, 2, dtype=torch.bool), "k3")
    assert torch.isfinite(values).all()
    expected = [hand("k3", LOG_RATIO_CLAMP)[0], hand("k3", -LOG_RATIO_CLAMP)[0]]
    torch.testing.assert_close(values, torch.tensor([expected]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("agg", sorted(name for name, a in LOSS_AGGREGATIONS.items() if a.global_normalizer))
def test_the_kl_term_adds_up_over_micro_batches_like_the_policy_loss(agg):
    """coef x the aggregation of the per-token estimates; pieces divided by the mini-batch's normaliser
    sum to the whole mini-batch's term, so the penalty stays exact under gradient accumulation."""
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, 5, generator=generator, dtype=torch.float64)
    ref = -torch.rand(6, 5, generator=generator, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=generator) < 0.7
    mask[3] = False  # a row without loss tokens
    whole, metrics = kl_loss(logprobs, ref, mask, coef=0.3, estimator="k3", agg=agg)
    expected = 0.3 * LOSS_AGGREGATIONS[agg](kl_penalty(logprobs, ref, mask, "k3"), mask)
    assert float(whole) == pytest.approx(float(expected), rel=1e-12)
    assert metrics["kl"] == pytest.approx(float(kl_penalty(logprobs, ref, mask, "k3")[mask].mean()), rel=1e-12)
    normalizer = loss_normalizer(mask, agg)
    pieces = sum(
        float(kl_loss(logprobs[rows], ref[rows], mask[rows], coef=0.3, agg=agg, normalizer=normalizer)[0])
        for rows in (slice(0, 2), slice(2, 5), slice(5, 6))
    )
    assert pieces == pytest.approx(float(whole), rel=1e-12)


def test_the_registry_refuses_a_taken_name_and_kl_penalty_an_unknown_one():
    assert set(KL_ESTIMATORS) >= {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="KL estimator 'k3' is already registered"):
        register_kl_estimator("k3", lambda log_r: log_r)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k4")
    with pytest.raises(ValueError, match="coef must be >= 0"):
        kl_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), coef=-1.0)


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"kl_coef": -0.1}, "kl_coef must be a number >= 0, got -0.1"),
        ({"kl_estimator": "k4"}, "kl_estimator must be one of ['k1', 'k2', 'k3'], got 'k4'"),
    ],
)
def test_kl_settings_are_refused_by_value(training, message):
    with pytest.raises(InvalidConfigError) as raised:
        make_config(**training).validate()
    assert message in str(raised.value)


def test_kl_with_sharded_learners_is_refused_not_shipped_unverified():
    config = make_config(kl_coef=0.1, data_parallel="fsdp2").learners(num_learners=2)
    with pytest.raises(InvalidConfigError, match="the KL penalty's reference model is not sharded yet"):
        config.validate()
    make_config(kl_coef=0.1).validate()
    make_config(data_parallel="fsdp2").learners(num_learners=2).validate()


def test_kl_is_off_by_default_as_in_dapo():
    config = make_config()
    assert config.kl_coef == 0.0 and config.kl_estimator == "k3"


# -- the learner, through RLlib ----------------------------------------------------------------------


def test_kl_coef_zero_leaves_the_loss_bitwise_unchanged_and_makes_no_reference(ray_session):
    with built_algo(make_config(overlong_filter=False)) as algo:
        learner = algo.learner_group._learner
        module = learner.module[DEFAULT_MODULE_ID].unwrapped()
        assert not module.has_reference
        batch = unequal_minibatch(algo)
        fwd_out = module.forward_train(batch)
        assert "ref_logprobs" not in fwd_out
        loss = learner.compute_loss_for_module(
            module_id=DEFAULT_MODULE_ID, config=algo.config, batch=batch, fwd_out=fwd_out
        )
        learner._loss_parts.clear()
        config = algo.config
        expected, _ = policy_loss(
            fwd_out["logprobs"],
            batch["old_logprobs"],
            batch["advantages"],
            batch["token_mask"],
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            dual_clip=config.dual_clip,
            agg=config.loss_agg,
            normalizer=float(batch["loss_normalizer"][0]),
        )
        assert torch.equal(loss, expected)
        algo._update(batch)
        logged = algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]
        assert not {"ref_kl", "ref_kl_loss", "ref_kl_loss_share"} & set(logged)


@pytest.mark.parametrize("micro_batch_tokens", [0, 40])
def test_the_kl_term_is_zero_at_the_first_update_and_positive_after(ray_session, micro_batch_tokens):
    coef = 0.5
    config = make_config(overlong_filter=False, kl_coef=coef, kl_estimator="k3", micro_batch_tokens=micro_batch_tokens)
    with built_algo(config) as algo:
        learner = algo.learner_group._learner
        module = learner.module[DEFAULT_MODULE_ID].unwrapped()
        assert module.has_reference
        reference = module.__dict__["reference_forward"].causal_lm
        assert reference is not module.causal_lm
        # The copy is no parameter of the module: not trained, not synced, not checkpointed.
        assert all(p.data_ptr() != q.data_ptr() for p in module.parameters() for q in reference.parameters())
        assert not any(p.requires_grad for p in reference.parameters())
        start = {name: value.clone() for name, value in reference.state_dict().items()}

        batch = unequal_minibatch(algo)
        algo._update(batch)
        logged = algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]
        assert float(logged["ref_kl"]) == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
        assert float(logged["ref_kl_loss"]) == pytest.approx(0.0, abs=1e-6)

        # After one update the policy moved away: the term is positive, and the logged loss is the
        # policy loss plus coef x the token mean of k3 over the whole mini-batch.
        with torch.no_grad():
            fwd_out = module.forward_train(batch)
        assert torch.equal(fwd_out["ref_logprobs"], module.reference_logprobs(batch))
        pg, _ = policy_loss(fwd_out["logprobs"], batch["old_logprobs"], batch["advantages"], batch["token_mask"])
        term, metrics = kl_loss(fwd_out["logprobs"], fwd_out["ref_logprobs"], batch["token_mask"], coef=coef)
        algo._update(batch)
        logged = algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]
        assert metrics["kl"] > 1e-6
        assert float(logged["ref_kl"]) == pytest.approx(metrics["kl"], rel=1e-4)
        assert float(logged["ref_kl_loss"]) == pytest.approx(float(term), rel=1e-4)
        assert float(logged["policy_loss"]) == pytest.approx(float(pg + term), rel=1e-4, abs=1e-7)
        share = abs(float(term)) / (abs(float(pg)) + abs(float(term)))
        assert float(logged["ref_kl_loss_share"]) == pytest.approx(share, rel=1e-3)
        # The reference stayed the starting weights.
        for name, value in reference.state_dict().items():
            assert torch.equal(value, start[name]), name


# -- kl_placement="reward" ----------------------------------------------------------------------------


def test_the_kl_in_the_reward_deducts_coef_times_each_responses_summed_estimates():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    rewards = torch.tensor([1.0, -1.0])
    # k1 = log r per token: row 0: 0.5 + (-1.0) = -0.5 (the third token is masked); row 1: 0 + 1.0 = 1.0.
    penalized, sequence_kl = kl_penalized_rewards(rewards, logprobs, ref_logprobs, mask, coef=0.2, estimator="k1")
    assert sequence_kl.tolist() == pytest.approx([-0.5, 1.0])
    assert penalized.tolist() == pytest.approx([1.0 + 0.2 * 0.5, -1.0 - 0.2 * 1.0])
    # k3 = exp(-log r) - 1 + log r: row 0: (e^-0.5 - 0.5) + (e^1 - 2); row 1: 0 + (e^-1 + 0).
    _, sequence_kl = kl_penalized_rewards(rewards, logprobs, ref_logprobs, mask, coef=0.2, estimator="k3")
    expected = [math.exp(-0.5) - 0.5 + math.exp(1.0) - 2.0, math.exp(-1.0)]
    assert sequence_kl.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="coef must be >= 0"):
        kl_penalized_rewards(rewards, logprobs, ref_logprobs, mask, coef=-1.0)
    with pytest.raises(ValueError, match=r"rewards must be \(B,\) with B = 2"):
        kl_penalized_rewards(rewards[:1], logprobs, ref_logprobs, mask, coef=0.1)


def test_add_reward_kl_penalty_takes_the_group_advantages_of_the_penalised_rewards():
    # Two groups of two; every response right in group 0 (advantages 0 before the penalty).
    batch = {
        "rewards": torch.tensor([1.0, 1.0, 1.0, -1.0]),
        "advantages": torch.tensor([0.0, 0.0, 0.7071, -0.7071]),
        "group_index": torch.tensor([0, 0, 1, 1]),
        "old_logprobs": torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]]),
        "token_mask": torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]]),
    }
    ref_logprobs = torch.tensor([[-2.0, -2.0], [-1.0, -5.0], [-1.5, -1.0], [-9.0, -9.0]])
    metrics = add_reward_kl_penalty(batch, ref_logprobs, coef=0.5, estimator="k1", advantage_scale="none")
    # Summed k1 over loss tokens: 2.0, 0.0 (its second token is no loss token), 0.5, 0.0 (none).
    rewards = [1.0 - 1.0, 1.0, 1.0 - 0.25, -1.0]
    assert batch["rewards"].tolist() == pytest.approx(rewards)
    assert batch["advantages"].tolist() == pytest.approx([-0.5, 0.5, 0.875, -0.875])
    assert metrics["reward_kl"] == pytest.approx((2.0 + 0.0 + 0.5) / 3)  # responses with loss tokens
    assert metrics["reward_kl_per_token"] == pytest.approx(2.5 / 5)
    assert metrics["reward_kl_penalty"] == pytest.approx(0.5 * 2.5 / 3)


def test_kl_placement_is_a_checked_setting_and_loss_by_default():
    assert make_config().kl_placement == "loss"
    with pytest.raises(InvalidConfigError, match="kl_placement must be one of \\['loss', 'reward'\\], got 'advantage'"):
        make_config(kl_placement="advantage").validate()


def test_the_kl_in_the_reward_changes_the_advantages_not_the_loss(ray_session):
    """kl_placement="reward": the learner's loss carries no KL term and the forward pass no reference
    log-probs; each step deducts the KL of the weights it starts from, 0 at the first step (the policy
    is the reference) and positive once the policy moved."""
    config = make_config(overlong_filter=False, kl_coef=0.5, kl_placement="reward", kl_estimator="k3")
    with built_algo(config) as algo:
        module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
        assert module.has_reference
        batch = unequal_minibatch(algo)
        assert "ref_logprobs" not in module.forward_train(batch)
        first = algo.train()
        second = algo.train()
        assert first["dapo"]["reward_kl"] == 0.0
        assert second["dapo"]["reward_kl"] > 0.0
        assert second["dapo"]["reward_kl_penalty"] == pytest.approx(0.5 * second["dapo"]["reward_kl"])
        learner_metrics = second["learners"][DEFAULT_MODULE_ID]
        assert not {"ref_kl", "ref_kl_loss", "ref_kl_loss_share"} & set(learner_metrics)
