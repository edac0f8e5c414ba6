"""The off-policy side of asynchronous rollouts, Ray-free: the behaviour log-probs the generator reports
against the proximal ones the learner recomputes, the corrections (dapo_rl.core.off_policy) against
hand computations, and the diagnostics the step logs.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import dapo_envs  # noqa: F401  (registers the environments)
from dapo_rl.core.off_policy import behaviour_importance_weights, off_policy_diagnostics
from dapo_rl.models.loading import TINY_PRESET, load_policy
from dapo_rl.models.policy import ResponseLogprobs
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend
from dapo_rl.rollout.prompt_sampler import PromptSampler
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.training import build_train_batch

# -- behaviour and proximal log-probs agree when no update separates them (max_staleness=0) -------------


@pytest.fixture(scope="module")
def tiny_policy():
    return load_policy(TINY_PRESET, seed=0)


def synchronous_round(model, tokenizer, *, temperature: float, share: bool, top_p: float = 1.0):
    """One generation round on the HF backend with the behaviour log-probs, packed as the step packs it."""
    env = gym.make("dapo/Arithmetic-v0", operators="+").unwrapped
    backend = HFGenerationBackend(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=[tokenizer.eos_token_id],
        prompts_per_call=3,  # several generate() calls, prompts of different lengths left-padded in each
        share_prompt_prefill=share,
    )
    runner = GenerationRunner(env, tokenizer, backend, PromptSettings(64, None, "error"))
    problems = PromptSampler(env, seed=1).next(5)
    sampling = SamplingSettings(n=4, max_new_tokens=16, temperature=temperature, top_p=top_p, logprobs=True)
    rollout = runner.sample(problems, sampling, seed=7)
    collected = {
        key: torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        for key, value in rollout.items()
        if isinstance(value, (np.ndarray, list))
    }
    return build_train_batch(
        collected,
        pad_token_id=tokenizer.pad_token_id,
        max_response_length=16,
        overlong_cache_len=4,
        overlong_penalty_factor=1.0,
        overlong_filter=False,
        advantage_scale="std",
    )


@pytest.mark.parametrize("temperature", [0.6, 1.3])
@pytest.mark.parametrize("share", [True, False], ids=["shared-prefill", "per-row-prefill"])
def test_synchronous_ratio_of_proximal_to_behaviour_is_one(tiny_policy, temperature, share):
    """At max_staleness=0 the weights that generated a response are the ones the update starts from:
    pi_prox / pi_behav must be 1 on every token, up to float rounding, at any temperature, with the
    prompt's prefill shared among its samples or not (the first response token is predicted from the
    shared cache), through the learner's own log-prob path (packed batch, chunked kernel, shared
    prompt forward)."""
    model, tokenizer = tiny_policy
    batch = synchronous_round(model, tokenizer, temperature=temperature, share=share)
    forward = ResponseLogprobs(model, temperature=temperature, share_prompts=share)
    model.eval()
    with torch.no_grad():
        proximal, _ = forward(batch)
    mask = batch["response_mask"].bool()
    assert int(mask.sum()) > 40  # enough tokens for the check to mean something
    log_ratio = (proximal - batch["behaviour_logprobs"])[mask]
    assert torch.isfinite(log_ratio).all()
    ratio = torch.exp(log_ratio)
    assert float((ratio - 1).abs().max()) < 1e-4, float((ratio - 1).abs().max())
    # The first response token (predicted from the prompt's last position) on its own.
    first = (proximal - batch["behaviour_logprobs"])[:, 0][mask[:, 0]]
    assert float(first.abs().max()) < 1e-4


def test_behaviour_logprobs_ignore_top_p_as_the_learner_does(tiny_policy):
    """top_p < 1 changes which tokens are drawn, not the log-probs reported: they are of
    softmax(logits / T) over the whole vocabulary, the distribution the learner's log-probs are of, so
    the synchronous ratio stays 1 (a renormalised top-p log-prob would make it sum(kept probs) < 1)."""
    model, tokenizer = tiny_policy
    batch = synchronous_round(model, tokenizer, temperature=0.8, share=True, top_p=0.5)
    forward = ResponseLogprobs(model, temperature=0.8, share_prompts=True)
    with torch.no_grad():
        proximal, _ = forward(batch)
    mask = batch["response_mask"].bool()
    assert float((proximal - batch["behaviour_logprobs"])[mask].abs().max()) < 1e-4


@pytest.mark.parametrize(
    "changes",
    [dict(max_staleness=1, top_p=0.9), dict(max_staleness=2, top_k=20), dict(recompute_old_logprobs=False, top_p=0.5)],
)
def test_vllm_behaviour_logprobs_with_a_sampling_filter_are_refused(changes):
    """vLLM's processed log-probs are renormalised after top-k/top-p (the HF backend's and the learner's
    are not): a config that would compare them is refused, naming the values."""
    from dapo_rl.rllib.config_rules import vllm_behaviour_logprobs_are_unfiltered
    from tests.helpers import make_config

    config = make_config(generation_backend="vllm", **changes).env_runners(num_env_runners=1)
    (problem,) = vllm_behaviour_logprobs_are_unfiltered(config, False)
    assert "generation_backend='vllm' with top_p=" in problem and "set top_p=1.0 and top_k=-1" in problem
    assert f"top_p={config.top_p!r}, top_k={config.top_k!r}" in problem
    unfiltered = make_config(generation_backend="vllm", **{**changes, "top_p": 1.0, "top_k": -1})
    assert vllm_behaviour_logprobs_are_unfiltered(unfiltered, False) == []
    assert vllm_behaviour_logprobs_are_unfiltered(make_config(**changes), False) == []  # the hf backend


# -- the corrections, by hand ---------------------------------------------------------------------------

#: rho = pi_prox / pi_behav of two stale responses (row 0 has 3 tokens, row 1 has 4) and a fresh one.
RHO = [[math.exp(0.5), math.exp(-1.0), 3.0, 1.0], [0.25, 6.0, 1.0, 2.0], [9.0, 0.1, 1.0, 1.0]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
STALE = torch.tensor([True, True, False])


def weights_of(correction: str, **bounds) -> tuple[torch.Tensor, dict[str, float]]:
    proximal = torch.full((3, 4), -1.0)
    behaviour = proximal - torch.log(torch.tensor(RHO))  # so that exp(proximal - behaviour) = RHO
    return behaviour_importance_weights(
        proximal, behaviour, MASK, STALE, cap=bounds.pop("cap", 2.0), correction=correction, **bounds
    )


def assert_weights(weights: torch.Tensor, row0: list[float], row1: list[float]) -> None:
    # Padding and the fresh row are 1 whatever the correction.
    assert weights[0].tolist() == pytest.approx([*row0, 1.0], abs=1e-5)
    assert weights[1].tolist() == pytest.approx(row1, abs=1e-5)
    assert weights[2].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_tis_token_caps_each_token_at_c():
    weights, metrics = weights_of("tis_token", cap=2.0)
    # min(rho, 2): 3.0 and 6.0 are capped; 2.0 exactly at the cap is not.
    assert_weights(weights, [1.64872, 0.36788, 2.0], [0.25, 2.0, 1.0, 2.0])
    assert metrics["importance_weight_capped_frac"] == pytest.approx(2 / 7)
    assert metrics["importance_weight_masked_frac"] == 0.0
    assert metrics["importance_weight_mean_stale"] == pytest.approx((1.64872 + 0.36788 + 2 + 0.25 + 2 + 1 + 2) / 7)


def test_tis_sequence_caps_each_responses_ratio():
    # Product: row 0 e^0.5 * e^-1 * 3 = 3 e^-0.5 = 1.81959 < 2 kept; row 1 0.25 * 6 * 1 * 2 = 3 -> 2.
    weights, metrics = weights_of("tis_sequence", cap=2.0)
    assert_weights(weights, [1.81959] * 3, [2.0] * 4)
    assert metrics["importance_weight_capped_frac"] == pytest.approx(4 / 7)
    # Geometric mean: row 0 1.81959^(1/3) = e^0.199537 = 1.22084, row 1 3^(1/4) = 1.31607, both under the cap.
    weights, metrics = weights_of("tis_sequence", cap=2.0, sequence_ratio="geometric_mean")
    assert_weights(weights, [1.22084] * 3, [1.31607] * 4)
    assert metrics["importance_weight_capped_frac"] == 0.0


def test_mis_token_gives_tokens_outside_the_band_no_loss():
    weights, metrics = weights_of("mis_token", low=0.5, high=5.0)
    # rho inside [0.5, 5] kept as it is; 0.368, 0.25 (below) and 6 (above) get 0.
    assert_weights(weights, [1.64872, 0.0, 3.0], [0.0, 0.0, 1.0, 2.0])
    assert metrics["importance_weight_masked_frac"] == pytest.approx(3 / 7)
    assert metrics["importance_weight_capped_frac"] == 0.0


def test_mis_sequence_gives_responses_outside_the_band_no_loss():
    # Products 1.81959 and 3 are inside [0.5, 5]: each response weighs its ratio.
    weights, metrics = weights_of("mis_sequence", low=0.5, high=5.0)
    assert_weights(weights, [1.81959] * 3, [3.0] * 4)
    assert metrics["importance_weight_masked_frac"] == 0.0
    # With the band [0.5, 2.5] row 1's 3 is outside: its every token carries no loss.
    weights, metrics = weights_of("mis_sequence", low=0.5, high=2.5)
    assert_weights(weights, [1.81959] * 3, [0.0] * 4)
    assert metrics["importance_weight_masked_frac"] == pytest.approx(4 / 7)


def test_icepop_masks_outside_the_band_and_leaves_weight_one_inside():
    weights, metrics = weights_of("icepop", low=0.5, high=5.0)
    assert_weights(weights, [1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0])
    assert metrics["importance_weight_masked_frac"] == pytest.approx(3 / 7)


def test_none_weighs_every_token_one():
    weights, metrics = weights_of("none")
    assert torch.equal(weights, torch.ones(3, 4))
    assert metrics["importance_weight_capped_frac"] == metrics["importance_weight_masked_frac"] == 0.0


def test_corrections_are_a_registry_that_refuses_duplicates_and_unknown_names():
    from dapo_rl.core.off_policy import OFF_POLICY_CORRECTIONS, register_off_policy_correction

    assert list(OFF_POLICY_CORRECTIONS) == ["tis_token", "tis_sequence", "mis_token", "mis_sequence", "icepop", "none"]
    with pytest.raises(ValueError, match="'icepop' is already registered"):
        register_off_policy_correction("icepop", OFF_POLICY_CORRECTIONS["icepop"].weigh, caps=False)
    with pytest.raises(ValueError, match="unknown off_policy_correction 'tis'"):
        weights_of("tis")
    with pytest.raises(ValueError, match=r"importance_ratio_low must be in \(0, 1\], got 1.5"):
        weights_of("mis_token", low=1.5)
    with pytest.raises(ValueError, match="importance_ratio_high must be >= 1"):
        weights_of("mis_token", high=0.9)
    with pytest.raises(ValueError, match="sequence_ratio must be one of"):
        weights_of("tis_sequence", sequence_ratio="mean")


def _todays_weights(proximal, behaviour, mask, stale, cap):
    """The weights as dapo_rl.core.off_policy computed them before the corrections became settings
    (commit 0fa186f), copied here so that the default is held to them bit for bit."""
    mask = mask.bool()
    corrected = mask & stale.bool().unsqueeze(-1) & torch.isfinite(behaviour)
    corrected = corrected & torch.isfinite(proximal) if cap is not None else torch.zeros_like(corrected)
    log_weight = torch.where(corrected, proximal.float() - behaviour.float(), 0.0)
    raw = torch.exp(log_weight.clamp(-20.0, 20.0))
    upper = math.inf if cap is None else float(cap)
    return torch.where(corrected, raw.clamp(max=upper), 1.0)


@pytest.mark.parametrize("cap", [2.0, 1.0, math.inf, None])
def test_the_default_correction_leaves_todays_weights_and_loss_bit_identical(cap):
    generator = torch.Generator().manual_seed(0)
    proximal = -torch.rand(6, 9, generator=generator) * 4
    behaviour = proximal + torch.randn(6, 9, generator=generator) * 0.7
    behaviour[1, 2] = math.nan
    behaviour[2, 3] = -80.0  # a log ratio past the clamp
    mask = torch.rand(6, 9, generator=generator) > 0.2
    stale = torch.tensor([True, True, True, False, True, False])
    weights, metrics = behaviour_importance_weights(proximal, behaviour, mask, stale, cap=cap)
    expected = _todays_weights(proximal, behaviour, mask, stale, cap)
    assert torch.equal(weights, expected)
    from dapo_rl.core import policy_loss

    logprobs = proximal + torch.randn(6, 9, generator=generator) * 0.1
    advantages = torch.randn(6, generator=generator)
    loss, _ = policy_loss(logprobs, proximal, advantages, mask, importance_weights=weights)
    today, _ = policy_loss(logprobs, proximal, advantages, mask, importance_weights=expected)
    assert torch.equal(loss, today)
    if cap == 2.0:
        assert 0 < metrics["importance_weight_capped_frac"] < 1  # the check had capped tokens to hold


# -- what the correction sees ----------------------------------------------------------------------------


def test_diagnostics_match_a_hand_computation():
    # Stale tokens rho = 0.5, 1, 1 (staleness 1) and 2, 4 (staleness 2); a fresh row off by rounding.
    rho = torch.tensor([[0.5, 1.0, 1.0], [2.0, 4.0, 7.0], [math.exp(1e-6), math.exp(-3e-6), 1.0]], dtype=torch.float64)
    proximal = torch.full((3, 3), -2.0, dtype=torch.float64)
    behaviour = proximal - torch.log(rho.double())
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)  # rho 7 is padding
    metrics = off_policy_diagnostics(proximal, behaviour, mask, torch.tensor([1, 2, 0]))
    # Quantiles of [0.5, 1, 1, 2, 4] with linear interpolation at q * (n - 1): p1 at 0.04 -> 0.52,
    # p5 at 0.2 -> 0.6, p50 -> 1, p95 at 3.8 -> 2 + 0.8 * 2 = 3.6, p99 at 3.96 -> 3.92.
    assert metrics["ratio_p1"] == pytest.approx(0.52)
    assert metrics["ratio_p5"] == pytest.approx(0.6)
    assert metrics["ratio_p50"] == pytest.approx(1.0)
    assert metrics["ratio_p95"] == pytest.approx(3.6)
    assert metrics["ratio_p99"] == pytest.approx(3.92)
    assert (metrics["ratio_min"], metrics["ratio_max"]) == pytest.approx((0.5, 4.0))
    # k3 = rho - 1 - ln rho: 0.5 -> 0.193147, 1 -> 0, 2 -> 0.306853, 4 -> 1.613706.
    assert metrics["behaviour_kl_k3"] == pytest.approx((0.193147 + 0.306853 + 1.613706) / 5, abs=1e-6)
    assert metrics["behaviour_kl_k3_staleness_1"] == pytest.approx(0.193147 / 3, abs=1e-6)
    assert metrics["behaviour_kl_k3_staleness_2"] == pytest.approx((0.306853 + 1.613706) / 2, abs=1e-6)
    assert metrics["stale_tokens_staleness_1"] == 3 and metrics["stale_tokens_staleness_2"] == 2
    assert metrics["fresh_abs_log_ratio_max"] == pytest.approx(3e-6, rel=1e-3)
    # A step without stale responses reports the fresh check only.
    assert set(off_policy_diagnostics(proximal, behaviour, mask, torch.tensor([0, 0, 0]))) == {
        "fresh_abs_log_ratio_max"
    }


def test_what_dynamic_sampling_kept_and_dropped_by_hand():
    """One round of 3 groups of 2: group 0 mixed (kept: the step needs 1 group), group 1 all right
    (dropped), group 2 mixed but surplus (dropped); the round is 1 version old."""
    from dapo_rl.metrics import selection_metrics
    from dapo_rl.training import collect_groups

    rollout = {
        "prompt_token_ids": [[1]] * 6,
        "response_token_ids": [[2] * n for n in (2, 4, 6, 6, 3, 5)],
        "group_index": np.array([0, 0, 1, 1, 2, 2]),
        "acc": np.array([1, 0, 1, 1, 0, 1], dtype=bool),
        "response_length": np.array([2, 4, 6, 6, 3, 5]),
        "truncated": np.zeros(6, dtype=bool),
        "score": np.zeros(6, dtype=np.float32),
        "staleness": np.ones(6, dtype=np.int64),
    }
    _, stats, rounds = collect_groups(
        lambda count: dict(rollout),
        prompts_per_step=1,
        generation_batch_prompts=3,
        dynamic_sampling=True,
        max_sampling_rounds=1,
        on_sampling_limit="error",
    )
    assert [kept.tolist() for kept in stats.kept_per_round] == [[True, True, False, False, False, False]]
    metrics = selection_metrics(rounds, stats.kept_per_round)
    assert metrics["kept_response_length_mean"] == 3.0  # (2 + 4) / 2
    assert metrics["dropped_response_length_mean"] == 5.0  # (6 + 6 + 3 + 5) / 4
    assert metrics["kept_generated_accuracy"] == 0.5
    assert metrics["dropped_generated_accuracy"] == 0.75
    assert metrics["dropped_mixed_response_frac"] == pytest.approx(2 / 6)
    assert metrics["dropped_mixed_response_length_mean"] == 4.0  # (3 + 5) / 2
    assert metrics["kept_staleness_mean"] == 1.0
    assert metrics["generated_accuracy_staleness_1"] == pytest.approx(4 / 6)
    assert metrics["response_length_mean_staleness_1"] == pytest.approx(26 / 6)
