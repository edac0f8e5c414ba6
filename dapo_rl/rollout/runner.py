"""The generation runner: prompts in, G scored responses (or episodes) per prompt out. No Ray import.

The RLlib env runner (:mod:`dapo_rl.rllib.env_runner`) wraps one of these; the plain-loop benchmark and
evaluation use it directly. Nothing here steps an environment token by token: prompts are drawn in
batches and generated for in one batched call. A one-turn episode is one prompt and one whole
response, verified with the environment's vectorised ``score``.

A multi-turn environment (:class:`dapo_envs.multi_turn.MultiTurnReasoningEnv`) answers a model turn
with its own turn; the runner appends that to the episode and generates again for the episodes
still going, in batches, until each ends (the environment's verdict, its turn limit, or the token
budget ``max_new_tokens``, which counts the whole episode after the prompt). An episode's response
is then every token after the prompt, model and environment turns alike; ``response_loss_mask``
marks the model's tokens (1) and the environment's (0), which carry no loss.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from dapo_envs.multi_turn import is_multi_turn
from dapo_rl.rollout.base import GenerationBackend, SamplingSettings
from dapo_rl.settings import PROMPT_TRUNCATION_CHOICES


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


#: The conversation an environment turn is rendered after, to find the tokens the template adds for it.
_ONE_EXCHANGE = ({"role": "user", "content": "?"}, {"role": "assistant", "content": "!"})

#: Values of ``PromptSettings.truncation`` (and of the ``prompt_truncation`` setting).


class PromptTooLongError(ValueError):
    """A prompt has more tokens than ``max_prompt_length`` and truncation is ``"error"``."""


def prompt_too_long_message(problem: Any, length: int, limit: int) -> str:
    where = f"problem {problem.index} (id {problem.problem_id!r}, {problem.data_source})"
    return (
        f"the prompt of {where} has {length} tokens, over max_prompt_length {limit}: raise max_prompt_length, "
        "or set prompt_truncation='left' to keep each prompt's last max_prompt_length tokens"
    )


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
        self.multi_turn = is_multi_turn(env)
        # Chat template: a one-exchange conversation's ids, and what the template writes after its
        # assistant turn's EOS (found on the first environment turn; the same for every turn).
        self._exchange_ids: list[int] | None = None
        self._turn_separator: list[int] = []

    def encode_environment_turn(self, observation: str) -> list[int]:
        """Token ids of an environment turn, to append after a model turn that ended with its EOS.

        With the chat template: a user turn with the observation and the generation prompt of the next
        assistant turn, as the template writes them after an assistant turn (found by rendering a
        conversation with and without the turn); plain text: the observation's tokens.
        """
        if not self._use_chat_template:
            return list(self.tokenizer(observation, add_special_tokens=False).input_ids)
        if self._exchange_ids is None:
            before = self._template_ids(list(_ONE_EXCHANGE), add_generation_prompt=False)
            eos = self.tokenizer.eos_token_id
            if eos not in before:
                raise ValueError(
                    f"the chat template never writes the EOS token {self.tokenizer.eos_token!r} at the end of an assistant "
                    "turn, so a generated turn cannot be continued in the template's format; set apply_chat_template=False"
                )
            last_eos = len(before) - 1 - before[::-1].index(eos)
            self._exchange_ids, self._turn_separator = before, before[last_eos + 1 :]
        before = self._exchange_ids
        after = self._template_ids(
            [*_ONE_EXCHANGE, {"role": "user", "content": observation}], add_generation_prompt=True
        )
        if after[: len(before)] != before:
            raise ValueError(
                "the tokenizer's chat template does not extend a conversation by appending to it, so "
                "environment turns cannot be placed after generated tokens; set apply_chat_template=False"
            )
        return self._turn_separator + after[len(before) :]

    def _template_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

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
            return self._template_ids(problem.messages, add_generation_prompt=True)
        return list(self.tokenizer(problem.prompt, add_special_tokens=True).input_ids)

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
                + prompt_too_long_message(problem, length, limit)
            )

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

        A multi-turn environment's episodes (see the module docstring) come back in the same columns,
        ``response_token_ids`` holding the whole episode after the prompt, and ``score`` its return;
        with ``response_loss_mask`` (list of (length,) float32 arrays: 1 on model tokens, 0 on the
        environment's), ``model_turns`` and ``environment_turns`` (N,) int64. Generator log-probs are
        NaN on environment tokens.
        """
        if self.multi_turn:
            return self._sample_episodes(problems, sampling, seed=seed)
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
            rollout["behaviour_logprobs"] = [np.asarray(row, dtype=np.float32) for row in self._logprobs_of(generated)]
        return rollout

    def _logprobs_of(self, generated: Any) -> list[list[float]]:
        """The generator's log-probs, asked for in the sampling settings."""
        if generated.logprobs is None:
            raise RuntimeError(f"{type(self.backend).__name__} returned no log-probs though they were asked for")
        return generated.logprobs

    def _sample_episodes(self, problems: Sequence[Any], sampling: SamplingSettings, *, seed: int) -> dict[str, Any]:
        """:meth:`sample` for a multi-turn environment: G episodes per problem, turn by turn."""
        start = time.perf_counter()
        env, n, budget = self.env, sampling.n, sampling.max_new_tokens
        prompt_ids = [self.encode_prompt(problem) for problem in problems]
        rows = len(problems) * n
        episodes = [env.begin_episode(problems[row // n]) for row in range(rows)]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        loss_mask: list[list[float]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        truncated = np.zeros(rows, dtype=bool)
        environment_turns = np.zeros(rows, dtype=np.int64)
        score_seconds = 0.0
        # Turn 1: G samples per prompt, sharing the prompt's prefill; then one per episode still going.
        generated = self.backend.generate(prompt_ids, sampling, seed=seed)
        active = list(range(rows))
        turn = 1
        while True:
            generated_logprobs = self._logprobs_of(generated) if sampling.logprobs else None
            step_start = time.perf_counter()
            going = []
            for position, row in enumerate(active):
                response, finished = generated.token_ids[position], generated.finished[position]
                room = budget - len(tokens[row])
                if len(response) > room:  # a batch generates up to its longest budget: cut to this episode's
                    response, finished = response[:room], False
                tokens[row] += response
                loss_mask[row] += [1.0] * len(response)
                if generated_logprobs is not None:
                    logprobs[row] += list(generated_logprobs[position][: len(response)])
                # A turn out of tokens mid-way is not answered (a half-written call is not run): the
                # environment concludes on it.
                text = self.tokenizer.decode(response, skip_special_tokens=True)
                reply = env.take_turn(episodes[row], text, cut=not finished)
                if reply.done:
                    truncated[row] = not finished
                    continue
                observation = self.encode_environment_turn(reply.observation)
                room = budget - len(tokens[row])
                fits = len(observation) < room  # the model needs a token of room to answer
                observation = observation[:room]
                tokens[row] += observation
                loss_mask[row] += [0.0] * len(observation)
                logprobs[row] += [float("nan")] * len(observation)
                environment_turns[row] += bool(observation)
                if fits:
                    going.append(row)
                else:
                    truncated[row] = True
                    env.stop_episode(episodes[row])
            score_seconds += time.perf_counter() - step_start
            if not going:
                break
            active, turn = going, turn + 1
            contexts = [prompt_ids[row // n] + tokens[row] for row in active]
            longest_room = max(budget - len(tokens[row]) for row in active)
            next_turn = dataclasses.replace(sampling, n=1, max_new_tokens=longest_room)
            # Not seed + turn: calls with neighbouring seeds (the shares of one round) would reuse streams.
            turn_seed = int(np.random.SeedSequence([seed, turn]).generate_state(1)[0] >> 1)
            generated = self.backend.generate(contexts, next_turn, seed=turn_seed)
        results = [episode.result for episode in episodes]
        rollout = {
            "prompt_token_ids": [prompt_ids[row // n] for row in range(rows)],
            "response_token_ids": tokens,
            "response_text": self.tokenizer.batch_decode(tokens, skip_special_tokens=True),
            "group_index": np.repeat(np.arange(len(problems), dtype=np.int64), n),
            "truncated": truncated,
            "response_length": np.asarray([len(t) for t in tokens], dtype=np.int64),
            "score": np.asarray([episode.episode_return for episode in episodes], dtype=np.float32),
            "acc": np.asarray([r.acc for r in results], dtype=bool),
            "pred": [r.pred for r in results],
            "reason": [r.reason for r in results],
            "verifier_failed": np.asarray([r.failed for r in results], dtype=bool),
            "response_loss_mask": [np.asarray(mask, dtype=np.float32) for mask in loss_mask],
            "model_turns": np.asarray([episode.turns for episode in episodes], dtype=np.int64),
            "environment_turns": environment_turns,
            "generate_seconds": time.perf_counter() - start - score_seconds,
            "score_seconds": score_seconds,
        }
        if sampling.logprobs:
            rollout["behaviour_logprobs"] = [np.asarray(row, dtype=np.float32) for row in logprobs]
        return rollout
