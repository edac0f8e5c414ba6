"""What many test files share: the tiny DAPO config, building and stopping an algorithm, weight
comparisons, a ChatML tokenizer, and a scripted generation backend.

Test modules import from here, never from one another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from ray.rllib.core import DEFAULT_MODULE_ID
from tokenizers import AddedToken

from dapo_rl import DAPOConfig
from dapo_rl.models import build_char_tokenizer
from dapo_rl.rollout.base import GeneratedResponses, SamplingSettings

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
    return {key: np.array(value, copy=True) for key, value in algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()}


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

    def __init__(self, tokenizer: Any, turn: Callable[[str], tuple[str, bool]], *, logprobs_value: float = -0.5) -> None:
        self.tokenizer, self.turn, self.logprobs_value = tokenizer, turn, logprobs_value
        self.calls: list[tuple[list[list[int]], SamplingSettings]] = []

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSettings, *, seed: int) -> GeneratedResponses:
        self.calls.append(([list(ids) for ids in prompt_token_ids], sampling))
        token_ids, finished = [], []
        for ids in prompt_token_ids:
            for _ in range(sampling.n):
                text, done = self.turn(self.tokenizer.decode(ids, skip_special_tokens=False))
                response = self.tokenizer(text, add_special_tokens=False).input_ids + ([self.tokenizer.eos_token_id] if done else [])
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
