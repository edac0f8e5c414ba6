"""Response log-probs of a packed, padded batch equal each sequence's own unpadded computation."""

import torch

from dapo_rl.models import TINY_PRESET, load_policy
from dapo_rl.policy import response_logprobs
from dapo_rl.rollout.batch import pack_sequences


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
    batch = pack_sequences([tokenizer("1+1=").input_ids], [tokenizer("2").input_ids], pad_token_id=tokenizer.pad_token_id)
    logprobs, _ = response_logprobs(model, batch)
    logprobs.sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
