"""Response log-probs of a packed, padded batch equal each sequence's own unpadded computation."""

import pytest
import torch

from dapo_rl.models.kv_cache import distinct_prompts
from dapo_rl.models.loading import TINY_PRESET, build_char_tokenizer, enable_activation_checkpointing, load_policy
from dapo_rl.models.policy import response_logprobs
from dapo_rl.rollout.batch import pack_sequences
from tests.helpers import tiny_causal_lm


def _reference_logprobs(model, prompt, response, temperature):
    """The plain way: one unpadded sequence, full logits, log-softmax, gather."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    log_softmax = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    logprobs = log_softmax[positions, torch.tensor(response)]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)[positions]
    return logprobs, entropy


def test_packed_logprobs_match_unpadded_sequences():
    model, tokenizer = load_policy(TINY_PRESET, seed=2)
    model.eval()
    prompts = [tokenizer("What is 1 + 1?\n").input_ids, tokenizer("2*3=").input_ids, tokenizer("x").input_ids]
    responses = [tokenizer("Answer: 2").input_ids + [tokenizer.eos_token_id], tokenizer("6").input_ids, []]
    batch = pack_sequences(prompts, responses, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, batch, temperature=0.7, return_entropy=True, chunk_size=3)
    assert logprobs.shape == batch["response_mask"].shape
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if not response:
            assert torch.all(logprobs[row] == 0)
            continue
        expected, expected_entropy = _reference_logprobs(model, prompt, response, 0.7)
        torch.testing.assert_close(logprobs[row, : len(response)], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[row, : len(response)], expected_entropy, atol=1e-5, rtol=1e-5)
        assert torch.all(logprobs[row, len(response) :] == 0)


def test_logprob_gradients_reach_the_model():
    model, tokenizer = load_policy(TINY_PRESET, seed=2)
    batch = pack_sequences(
        [tokenizer("1+1=").input_ids], [tokenizer("2").input_ids], pad_token_id=tokenizer.pad_token_id
    )
    logprobs, _ = response_logprobs(model, batch)
    logprobs.sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def _batch(tokenizer):
    prompts = [tokenizer("What is 12 + 7?\n").input_ids, tokenizer("3+4=").input_ids]
    responses = [tokenizer("Answer: 19").input_ids + [tokenizer.eos_token_id], tokenizer("Answer: 7").input_ids]
    return pack_sequences(prompts, responses, pad_token_id=tokenizer.pad_token_id)


def _logprobs_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    logprobs, _ = response_logprobs(model, batch, **kwargs)
    (logprobs * batch["response_mask"]).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), grads


def test_bf16_mixed_precision_keeps_float32_weights_and_tracks_float32():
    model, tokenizer = load_policy(TINY_PRESET, seed=4)
    batch = _batch(tokenizer)
    full, full_grads = _logprobs_and_grads(model, batch)
    mixed, mixed_grads = _logprobs_and_grads(model, batch, mixed_precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert mixed.dtype == torch.float32
    mask = batch["response_mask"].bool()
    # bf16 has 8 bits of mantissa: log-probs agree to a few hundredths, not exactly.
    assert (mixed[mask] - full[mask]).abs().max() < 0.1
    assert not torch.equal(mixed[mask], full[mask])
    assert set(mixed_grads) == set(full_grads)
    for name, grad in mixed_grads.items():
        assert grad.dtype == torch.float32, name
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in mixed_grads.values()]),
        torch.cat([g.flatten() for g in full_grads.values()]),
        dim=0,
    )
    assert cosine > 0.99


def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients():
    model, tokenizer = load_policy(TINY_PRESET, seed=4)
    batch = _batch(tokenizer)
    model.train()
    plain, plain_grads = _logprobs_and_grads(model, batch)
    enable_activation_checkpointing(model)
    checkpointed, checkpointed_grads = _logprobs_and_grads(model, batch)
    torch.testing.assert_close(checkpointed, plain)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_unknown_mixed_precision_is_named():
    model, tokenizer = load_policy(TINY_PRESET, seed=4)
    with pytest.raises(ValueError, match="fp8"):
        response_logprobs(model, _batch(tokenizer), mixed_precision="fp8")


def _grouped_batch(tokenizer, group_size=3):
    """Groups of responses to shared prompts of different lengths, rows of two groups interleaved."""
    generator = torch.Generator().manual_seed(0)
    prompts = [tokenizer("What is 12 + 7?\n").input_ids, tokenizer("3+4=").input_ids, tokenizer("x").input_ids]
    rows_prompts, rows_responses = [], []
    for _ in range(group_size):
        for prompt in prompts:
            length = int(torch.randint(0, 7, (), generator=generator))
            rows_prompts.append(prompt)
            rows_responses.append(torch.randint(3, 200, (length,), generator=generator).tolist())
    return pack_sequences(rows_prompts, rows_responses, pad_token_id=tokenizer.pad_token_id)


def _tiny_llama():
    """SmolLM2's architecture (Llama, grouped-query attention, tied head) at test size."""
    return tiny_causal_lm("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True), build_char_tokenizer()


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_shared_prompt_forward_gives_the_same_logprobs_and_gradients(architecture):
    model, tokenizer = load_policy(TINY_PRESET, seed=4) if architecture == "qwen2" else _tiny_llama()
    model.train()
    batch = _grouped_batch(tokenizer)
    per_row, per_row_grads = _logprobs_and_grads(model, batch, share_prompts=False)
    shared, shared_grads = _logprobs_and_grads(model, batch, share_prompts=True)
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=1e-5)
    assert per_row_grads.keys() == shared_grads.keys()
    for name, grad in per_row_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4)
    # The two paths differ: the shared one runs 3 prompts, not 9.
    calls = []
    hook = model.get_decoder().embed_tokens.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape))
    response_logprobs(model, batch, share_prompts=True)
    hook.remove()
    assert calls[0][0] == 3 and calls[1][0] == 9


def test_shared_prompt_forward_steps_aside_under_activation_checkpointing():
    model, tokenizer = load_policy(TINY_PRESET, seed=4)
    batch = _grouped_batch(tokenizer)
    model.train()
    plain, plain_grads = _logprobs_and_grads(model, batch, share_prompts=False)
    enable_activation_checkpointing(model)
    checkpointed, checkpointed_grads = _logprobs_and_grads(model, batch, share_prompts=True)
    torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_distinct_prompts_tells_a_pad_led_prompt_from_a_padded_one():
    pad = 0
    prompt_ids = torch.tensor([[pad, 5, 6], [pad, 5, 6], [7, 5, 6], [pad, 5, 6]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]])
    first_rows, inverse = distinct_prompts(prompt_ids, prompt_mask)
    assert len(first_rows) == 3
    assert inverse[0] == inverse[3] and len({int(inverse[0]), int(inverse[1]), int(inverse[2])}) == 3
    assert sorted(first_rows.tolist()) == [0, 1, 2]
    assert torch.equal(prompt_ids[first_rows][inverse], prompt_ids)
