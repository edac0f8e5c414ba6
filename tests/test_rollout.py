"""Packing, EOS handling and the Hugging Face generation backend."""

import copy

import pytest
import torch

from dapo_rl.models.loading import TINY_PRESET, load_policy
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.batch import pack_sequences, split_at_eos
from dapo_rl.rollout.hf import HFGenerationBackend

PAD = 0


def test_pack_left_pads_prompts_and_right_pads_responses():
    batch = pack_sequences([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, PAD, PAD], [PAD, PAD, 8, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    # Positions count real tokens only; the padded prompt still starts at 0.
    assert batch["position_ids"][1, 2:].tolist() == [0, 1, 2, 3]
    assert batch["position_ids"][0, :4].tolist() == [0, 1, 2, 3]
    assert batch["response_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["response_lengths"].tolist() == [1, 3]
    assert batch["prompt_lengths"].tolist() == [3, 1]


def test_pack_keeps_an_empty_response_fully_masked():
    batch = pack_sequences([[1, 2]], [[]], pad_token_id=PAD)
    assert batch["response_mask"].shape == (1, 1)
    assert batch["response_mask"].sum() == 0


def test_pack_rejects_mismatched_and_empty_prompts():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack_sequences([[1], [2]], [[3]], pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        pack_sequences([[1], []], [[3], [4]], pad_token_id=PAD)


@pytest.mark.parametrize(
    ("tokens", "expected", "finished"),
    [([4, 5, 2, 0, 0], [4, 5, 2], True), ([4, 5, 6], [4, 5, 6], False), ([2], [2], True), ([], [], False)],
)
def test_split_at_eos(tokens, expected, finished):
    assert split_at_eos(tokens, [2]) == (expected, finished)


def test_sampling_settings_validate():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        SamplingSettings(n=2, max_new_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingSettings(n=2, max_new_tokens=4, top_p=1.5)


@pytest.fixture(scope="module")
def backend():
    model, tokenizer = load_policy(TINY_PRESET, seed=0)
    return HFGenerationBackend(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id], prompts_per_call=2
    ), tokenizer


def test_generate_returns_n_responses_per_prompt_deterministically(backend):
    generator, tokenizer = backend
    prompts = [tokenizer("1+1=").input_ids, tokenizer("12+30=").input_ids, tokenizer("7-2=").input_ids]
    sampling = SamplingSettings(n=4, max_new_tokens=6)
    first = generator.generate(prompts, sampling, seed=11)
    second = generator.generate(prompts, sampling, seed=11)
    other = generator.generate(prompts, sampling, seed=12)
    assert len(first) == 12
    assert first.token_ids == second.token_ids and first.finished == second.finished
    assert first.token_ids != other.token_ids
    for tokens, finished in zip(first.token_ids, first.finished):
        assert len(tokens) <= 6
        # An unfinished response ran to the limit; a finished one ends with its EOS.
        assert (tokens[-1] == tokenizer.eos_token_id) if finished else (len(tokens) == 6)


def test_shared_prompt_prefill_samples_exactly_what_generate_samples(backend):
    generator, tokenizer = backend
    # Prompts of different lengths (left padding inside a call) and a one-token prompt.
    prompts = [
        tokenizer("1+1=").input_ids,
        tokenizer("12+30=").input_ids,
        tokenizer("7").input_ids,
        tokenizer("What is 3 + 4?").input_ids,
    ]
    sampling = SamplingSettings(n=3, max_new_tokens=8)
    shared = HFGenerationBackend(
        generator.model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=[tokenizer.eos_token_id],
        prompts_per_call=3,
        share_prompt_prefill=True,
    )
    per_sample = HFGenerationBackend(
        generator.model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=[tokenizer.eos_token_id],
        prompts_per_call=3,
        share_prompt_prefill=False,
    )
    calls = []
    hook = generator.model.get_decoder().embed_tokens.register_forward_hook(
        lambda _m, inputs, _o: calls.append(inputs[0].shape)
    )
    shared_responses = shared.generate(prompts, sampling, seed=5)
    hook.remove()
    expected = per_sample.generate(prompts, sampling, seed=5)
    assert shared_responses.token_ids == expected.token_ids
    assert shared_responses.finished == expected.finished
    # The prefill ran once per prompt: the first call of each generate() round holds 3 rows, not 9.
    assert calls[0][0] == 3


def test_generate_does_not_disturb_the_callers_rng(backend):
    generator, tokenizer = backend
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generator.generate([tokenizer("2+2=").input_ids], SamplingSettings(n=2, max_new_tokens=3), seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_generation_config_does_not_change_sampling(backend):
    """A checkpoint's generation_config.json (top_k=50, penalties) must not alter the sampled distribution."""
    generator, tokenizer = backend
    prompts = [tokenizer("3+4=").input_ids] * 2
    sampling = SamplingSettings(n=4, max_new_tokens=6)
    plain = generator.generate(prompts, sampling, seed=3).token_ids
    saved = generator.model.generation_config
    generator.model.generation_config = copy.deepcopy(saved)
    try:
        generator.model.generation_config.top_k = 2
        generator.model.generation_config.repetition_penalty = 10.0
        altered = generator.generate(prompts, sampling, seed=3).token_ids
    finally:
        generator.model.generation_config = saved
    assert altered == plain


@pytest.mark.parametrize("share_prompt_prefill", [True, False])
def test_generator_logprobs_equal_a_forward_pass_and_leave_sampling_unchanged(backend, share_prompt_prefill):
    """The behaviour log-probs of asynchronous training: log_softmax(logits / T) of each sampled token
    under the generating weights, the same numbers a teacher-forced forward pass gives."""
    generator, tokenizer = backend
    model = generator.model
    prompts = [tokenizer("1+1=").input_ids, tokenizer("12+30=").input_ids, tokenizer("7").input_ids]
    backend_ = HFGenerationBackend(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=[tokenizer.eos_token_id],
        prompts_per_call=2,
        share_prompt_prefill=share_prompt_prefill,
    )
    plain = SamplingSettings(n=3, max_new_tokens=7, temperature=0.7)
    with_logprobs = SamplingSettings(n=3, max_new_tokens=7, temperature=0.7, logprobs=True)
    expected = backend_.generate(prompts, plain, seed=3)
    generated = backend_.generate(prompts, with_logprobs, seed=3)
    assert expected.logprobs is None
    assert generated.token_ids == expected.token_ids and generated.finished == expected.finished
    assert [len(row) for row in generated.logprobs] == [len(row) for row in generated.token_ids]
    for index, response in enumerate(generated.token_ids):
        prompt = prompts[index // 3]
        ids = torch.as_tensor([list(prompt) + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        reference = (
            torch.log_softmax(logits / 0.7, dim=-1).gather(-1, torch.as_tensor(response).unsqueeze(-1)).squeeze(-1)
        )
        assert torch.allclose(torch.as_tensor(generated.logprobs[index]), reference, atol=1e-4), index
