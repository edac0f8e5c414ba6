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
