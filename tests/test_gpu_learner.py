"""GPU checks of the learner at scale (marked ``gpu``; skipped without CUDA): one bf16 mixed-precision
step with activation checkpointing on a Qwen2.5-0.5B-shaped random model at 8192 response tokens
keeps float32 master weights and follows the float32 step's gradient direction. Peak memory and
tokens per second are measured by ``benchmarks/learner_step.py``, not here."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_step_at_8k_tokens_on_a_half_billion_parameter_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    from benchmarks.learner_step import QWEN25_05B, _batch
    from dapo_rl.core import policy_loss
    from dapo_rl.models.loading import enable_activation_checkpointing
    from dapo_rl.models.policy import response_logprobs

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B)).to(device=device, dtype=torch.float32)
    model.train()
    enable_activation_checkpointing(model)
    batch = _batch(4, 512, 8192, QWEN25_05B["vocab_size"], device)
    mask = batch["response_mask"].float()

    def gradient(mixed_precision):
        model.zero_grad(set_to_none=True)
        logprobs, _ = response_logprobs(model, batch, mixed_precision=mixed_precision, chunk_size=1024)
        loss, _ = policy_loss(
            logprobs,
            batch["old_logprobs"],
            batch["advantages"],
            mask,
            clip_low=0.2,
            clip_high=0.28,
            agg="token-mean",
            normalizer=float(mask.sum()),
        )
        loss.backward()
        assert torch.isfinite(loss)
        return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    bf16, fp32 = gradient("bf16"), gradient(None)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=0)
    assert cosine > 0.99, float(cosine)
