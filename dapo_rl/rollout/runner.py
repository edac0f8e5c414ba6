"""The generation runner: prompts in, G scored responses per prompt out. No Ray import.

The RLlib env runner (:mod:`dapo_rl.env_runner`) wraps one of these; the plain-loop benchmark and
evaluation use it directly. A reasoning episode is one prompt and one whole response, so nothing
here steps an environment token by token: prompts are drawn in batches, generated for in one
batched call, and verified with the environment's vectorised ``score``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from dapo_rl.rollout.base import GenerationBackend, SamplingSettings


@dataclass(frozen=True)
class PromptSettings:
    """How a problem's prompt becomes token ids.

    ``apply_chat_template``: True wraps the prompt as one user turn with the tokenizer's chat
    template, False feeds the plain text, None (auto) uses the template when the tokenizer has one.
    ``truncation``: what a prompt longer than ``max_prompt_length`` tokens gets: ``"left"`` cuts it
    from the left, as the reference scripts do (the question's end and the answer instruction are
    kept); ``"error"`` raises :class:`PromptTooLongError` naming the problem (verl's default: a
    silently cut question is a data bug). Training uses the ``prompt_truncation`` setting.
    """

    max_prompt_length: int
    apply_chat_template: bool | None = None
    truncation: str = "left"

    def __post_init__(self) -> None:
        if self.truncation not in PROMPT_TRUNCATION_CHOICES:
            raise ValueError(f"truncation must be one of {list(PROMPT_TRUNCATION_CHOICES)}, got {self.truncation!r}")


#: Values of ``PromptSettings.truncation`` (and of the ``prompt_truncation`` setting).
PROMPT_TRUNCATION_CHOICES = ("error", "left")


class PromptTooLongError(ValueError):
    """A prompt has more tokens than ``max_prompt_length`` and truncation is ``"error"``."""


def prompt_too_long_message(problem: Any, length: int, limit: int) -> str:
    where = f"problem {problem.index} (id {problem.problem_id!r}, {problem.data_source})"
    return (f"the prompt of {where} has {length} tokens, over max_prompt_length {limit}: raise max_prompt_length, "
            "or set prompt_truncation='left' to keep each prompt's last max_prompt_length tokens")


class GenerationRunner:
    """Generates and scores G responses for each of a batch of problems.

    Args:
        env: a reasoning environment (``gymnasium.make("dapo/...").unwrapped``): it provides
            ``score(responses, references)`` (see ``dapo_envs.base``).
        tokenizer: the policy's tokenizer.
        backend: a :class:`~dapo_rl.rollout.base.GenerationBackend`.
    """

    def __init__(
        self, env: Any, tokenizer: PreTrainedTokenizerBase, backend: GenerationBackend, prompt_settings: PromptSettings
    ) -> None:
        self.env = env
        self.tokenizer = tokenizer
        self.backend = backend
        self.prompt_settings = prompt_settings
        use_template = prompt_settings.apply_chat_template
        if use_template is None:
            use_template = bool(getattr(tokenizer, "chat_template", None))
        elif use_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("apply_chat_template=True but the tokenizer has no chat template")
        self._use_chat_template = use_template
        self.eos_token_ids = [tokenizer.eos_token_id]

    def encode_prompt(self, problem: Any) -> list[int]:
        """Token ids of a problem's prompt (chat-templated or plain), within ``max_prompt_length``:
        left-truncated, or :class:`PromptTooLongError` (see :class:`PromptSettings`)."""
        ids = self.prompt_token_ids(problem)
        limit = self.prompt_settings.max_prompt_length
        if len(ids) <= limit:
            return ids
        if self.prompt_settings.truncation == "error":
            raise PromptTooLongError(prompt_too_long_message(problem, len(ids), limit))
        return ids[-limit:]

    def prompt_token_ids(self, problem: Any) -> list[int]:
        """Token ids of a problem's whole prompt (chat-templated or plain), however long."""
        if self._use_chat_template:
            ids = self.tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer(problem.prompt, add_special_tokens=True).input_ids
        return list(ids)

    def check_prompt_lengths(self, problems: Sequence[Any]) -> None:
        """Raise :class:`PromptTooLongError` for the first of ``problems`` whose prompt is over the
        limit, with how many are (a no-op when truncation is ``"left"``)."""
        if self.prompt_settings.truncation != "error":
            return
        limit = self.prompt_settings.max_prompt_length
        over = [(problem, length) for problem in problems if (length := len(self.prompt_token_ids(problem))) > limit]
        if over:
            problem, length = over[0]
            raise PromptTooLongError(
                f"{len(over)} of {len(problems)} prompts checked are over max_prompt_length; the first: "
                + prompt_too_long_message(problem, length, limit))

    def sample(self, problems: Sequence[Any], sampling: SamplingSettings, *, seed: int) -> dict[str, Any]:
        """Generate ``sampling.n`` responses for each problem and score them.

        Returns per-response values, prompt-major (responses of problem i are rows i*n .. i*n+n-1):
        ``prompt_token_ids`` / ``response_token_ids`` (lists of lists), ``response_text`` (list),
        ``group_index`` (N,) int64 = i, ``truncated`` (N,) bool (hit the length limit without EOS),
        ``response_length`` (N,) int64, ``score`` (N,) float32 (the verifier's reward, before
        shaping), ``acc`` (N,) bool, ``pred`` (list, the extracted answers), ``reason`` (list, why a
        response was scored wrong without a comparison, else ""), ``verifier_failed`` (N,) bool (the
        verifier raised, returned no verdict, timed out or killed its worker: scored wrong); and
        ``generate_seconds``, ``score_seconds`` (floats).
        """
        generate_start = time.perf_counter()
        prompt_ids = [self.encode_prompt(problem) for problem in problems]
        generated = self.backend.generate(prompt_ids, sampling, seed=seed)
        score_start = time.perf_counter()
        n = sampling.n
        texts = self.tokenizer.batch_decode(generated.token_ids, skip_special_tokens=True)
        references = [problem.answer for problem in problems for _ in range(n)]
        results = self.env.score(texts, references)
        score_end = time.perf_counter()
        rollout = {
            "prompt_token_ids": [prompt_ids[row // n] for row in range(len(generated))],
            "response_token_ids": generated.token_ids,
            "response_text": texts,
            "group_index": np.repeat(np.arange(len(problems), dtype=np.int64), n),
            "truncated": ~np.asarray(generated.finished, dtype=bool),
            "response_length": np.asarray([len(t) for t in generated.token_ids], dtype=np.int64),
            "score": np.asarray([r.score for r in results], dtype=np.float32),
            "acc": np.asarray([r.acc for r in results], dtype=bool),
            "pred": [r.pred for r in results],
            "reason": [r.reason for r in results],
            "verifier_failed": np.asarray([r.failed for r in results], dtype=bool),
            "generate_seconds": score_start - generate_start,
            "score_seconds": score_end - score_start,
        }
        if sampling.logprobs:
            if generated.logprobs is None:
                raise RuntimeError(f"{type(self.backend).__name__} returned no log-probs though they were asked for")
            rollout["behaviour_logprobs"] = [np.asarray(row, dtype=np.float32) for row in generated.logprobs]
        return rollout
