"""Sharing a prompt's KV cache among a group's responses (``share_prompt_forward``), per architecture.

On every architecture listed in :data:`dapo_rl.models.kv_cache.SHARED_PROMPT_ARCHITECTURES` (tiny random
configs, with sliding-window layers and mixed sliding/full layers where the architecture has them)
the shared path gives the per-response path's log-probs and gradients, and HF generation from a
shared prefill samples exactly what plain ``generate`` samples. A model outside the list (a hybrid
with convolution layers) runs the plain path, and says so once.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dapo_rl.models.kv_cache import SHARED_PROMPT_ARCHITECTURES, shared_prompt_unsupported
from dapo_rl.models.loading import build_char_tokenizer
from dapo_rl.models.policy import response_logprobs
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.batch import pack_sequences
from dapo_rl.rollout.hf import HFGenerationBackend
from tests.helpers import tiny_causal_lm

TOKENIZER = build_char_tokenizer()
#: A window of 4 tokens is shorter than every prompt + response here, so the window shapes the result.
WINDOW = 4
ARCHITECTURES = {
    "llama, tied head": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral, sliding window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2, sliding window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen3, sliding window": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    ),
    "gemma2, sliding and full layers": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=None),
    ),
    "gemma3, sliding and full layers": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),
}


def build(config_name: str, model_name: str, extra: dict, seed: int = 5) -> torch.nn.Module:
    return tiny_causal_lm(config_name, model_name, seed, **extra)


def grouped_batch(group_size: int = 3) -> dict[str, torch.Tensor]:
    """Three prompts of different lengths, ``group_size`` responses each, rows of the groups interleaved."""
    generator = torch.Generator().manual_seed(0)
    prompts = [TOKENIZER("What is 12 + 7?\n").input_ids, TOKENIZER("3+4=").input_ids, TOKENIZER("xyz").input_ids]
    rows_prompts, rows_responses = [], []
    for _ in range(group_size):
        for prompt in prompts:
            rows_prompts.append(prompt)
            rows_responses.append(
                torch.randint(
                    3, 200, (int(torch.randint(1, 9, (), generator=generator)),), generator=generator
                ).tolist()
            )
    return pack_sequences(rows_prompts, rows_responses, pad_token_id=TOKENIZER.pad_token_id)


def logprobs_and_grads(model, batch, *, share_prompts):
    model.zero_grad(set_to_none=True)
    logprobs, _ = response_logprobs(model, batch, share_prompts=share_prompts)
    (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
    return logprobs.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def prompt_rows_per_forward(model, batch, *, share_prompts) -> list[int]:
    """The batch size of each backbone forward (3 then 9: the shared path; 9: one forward per row)."""
    sizes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    with torch.no_grad():
        response_logprobs(model, batch, share_prompts=share_prompts)
    hook.remove()
    return sizes


def test_every_verified_architecture_is_tested():
    tested = {build(*spec).config.model_type for spec in ARCHITECTURES.values()}
    assert tested == SHARED_PROMPT_ARCHITECTURES - {"gemma3"}  # gemma3: the multimodal wrapper's text model
    assert shared_prompt_unsupported(build(*ARCHITECTURES["gemma3, sliding and full layers"])) is None


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_shared_prompt_gives_the_same_logprobs_and_gradients(name):
    model = build(*ARCHITECTURES[name]).train()
    batch = grouped_batch()
    assert prompt_rows_per_forward(model, batch, share_prompts=True) == [3, 9]  # the shared path ran
    plain, plain_grads = logprobs_and_grads(model, batch, share_prompts=False)
    shared, shared_grads = logprobs_and_grads(model, batch, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == plain_grads.keys()
    for parameter, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[parameter], grad, atol=1e-5, rtol=1e-4, msg=parameter)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_shared_prefill_samples_what_generate_samples(name):
    model = build(*ARCHITECTURES[name])
    prompts = [TOKENIZER("What is 12 + 7?\n").input_ids, TOKENIZER("3+4=").input_ids]
    sampling = SamplingSettings(n=3, max_new_tokens=10, temperature=1.0)

    def backend(share):
        return HFGenerationBackend(
            model,
            pad_token_id=TOKENIZER.pad_token_id,
            eos_token_ids=[TOKENIZER.eos_token_id],
            share_prompt_prefill=share,
        )

    shared, plain = (
        backend(True).generate(prompts, sampling, seed=3),
        backend(False).generate(prompts, sampling, seed=3),
    )
    assert shared.token_ids == plain.token_ids and shared.finished == plain.finished
    assert len({tuple(ids) for ids in shared.token_ids}) > 1  # sampled, not one greedy answer


def test_a_model_with_convolution_layers_runs_one_forward_per_response_and_says_so_once():
    model = build("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])).train()
    assert "['conv']" in shared_prompt_unsupported(model)
    batch = grouped_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prompt_rows_per_forward(model, batch, share_prompts=True) == [9]
        assert prompt_rows_per_forward(model, batch, share_prompts=True) == [9]
    said = [str(w.message) for w in caught if "share_prompt_forward" in str(w.message)]
    assert len(said) == 1 and "not plain attention" in said[0] and "one forward per response" in said[0]
    plain, _ = logprobs_and_grads(model, batch, share_prompts=False)
    shared, _ = logprobs_and_grads(model, batch, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=0, rtol=0)


def test_an_unverified_architecture_is_named():
    model = build("Qwen2Config", "Qwen2ForCausalLM", {})
    model.config.model_type = "somenewarch"
    reason = shared_prompt_unsupported(model)
    assert "'somenewarch' has not been verified" in reason and "qwen2" in reason
