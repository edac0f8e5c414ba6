"""dapo/MathRetry-v0: a math problem with more than one try; each try is worth less."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from dapo_envs.base import DEFAULT_MAX_RESPONSE_CHARS
from dapo_envs.math import MathEnv, data_set_held_out
from dapo_envs.multi_turn import Episode, MultiTurnReasoningEnv, Turn
from dapo_envs.verifiers import Verifier, VerifierResult

__all__ = ["MathRetryEnv", "DEFAULT_RETRY_MESSAGE"]

DEFAULT_RETRY_MESSAGE = "That answer is wrong. Try again.\n"


class MathRetryEnv(MultiTurnReasoningEnv):
    """Any data set of ``dapo/Math-v0``, with up to ``max_tries`` tries per problem.

    ## Description

    The problems, prompts and verifier of :class:`~dapo_envs.math.MathEnv` (same arguments). After a
    wrong answer the environment replies ``retry_message`` and the model tries again, up to
    ``max_tries`` tries in all; a correct answer ends the episode. ``max_tries=1`` is exactly
    ``dapo/Math-v0``.

    ## Observation

    The prompt, then the environment's replies: any text (:class:`~dapo_envs.base.ResponseText`).

    ## Action

    One try: a complete response, as text.

    ## Reward

    A correct answer at try k (k = 1, 2, ...) scores ``retry_discount ** (k - 1)`` times the verifier's
    score (+1 correct for the built-in verifiers): 1, 0.5, 0.25 with the default discount 0.5. Wrong
    on every try: the verifier's score of the last try (-1). ``acc`` is the last try's correctness.
    Dynamic sampling filters on ``acc``, so a group correct at different tries is all correct and
    left out, though its rewards differ.

    ## Arguments

    - ``dataset``, ``verifier``, ``prompt_template``, ``split``, ``test_dataset``, ``held_out_share``,
      ``verifier_timeout``, ``max_response_chars``, ``render_mode``: as for ``dapo/Math-v0`` (the same
      train and test splits).
    - ``max_tries``: tries per problem, >= 1 (default 3).
    - ``retry_discount``: factor on a correct answer's reward per further try, in [0, 1] (default 0.5).
    - ``retry_message``: the environment's reply to a wrong answer.
    """

    def __init__(
        self,
        dataset: str | pa.Table | Sequence[Mapping[str, Any]] = "dapo_math_17k",
        verifier: str | Verifier | Callable[[str, str], Any] = "dapo",
        prompt_template: str = "dapo",
        *,
        split: str = "train",
        test_dataset: str | pa.Table | Sequence[Mapping[str, Any]] | None = None,
        held_out_share: float | None = None,
        max_tries: int = 3,
        retry_discount: float = 0.5,
        retry_message: str = DEFAULT_RETRY_MESSAGE,
        verifier_timeout: float | None = None,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(render_mode=render_mode)
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"max_tries must be an integer >= 1, got {max_tries!r}")
        if (
            isinstance(retry_discount, bool)
            or not isinstance(retry_discount, (int, float))
            or not 0 <= retry_discount <= 1
        ):
            raise ValueError(f"retry_discount must be a number in [0, 1], got {retry_discount!r}")
        if not isinstance(retry_message, str) or not retry_message:
            raise ValueError(f"retry_message must be a non-empty string, got {retry_message!r}")
        problems = MathEnv(
            dataset,
            verifier,
            prompt_template,
            split=split,
            test_dataset=test_dataset,
            held_out_share=held_out_share,
            verifier_timeout=verifier_timeout,
            max_response_chars=max_response_chars,
        )
        self._pose(problems, max_response_chars)
        self.dataset_name = problems.dataset_name
        self.split, self.held_out_share = problems.split, problems.held_out_share
        self.max_tries = self.max_turns = max_tries
        self.retry_discount = float(retry_discount)
        self.retry_message = retry_message

    @classmethod
    def held_out_overrides(cls, env_config: Mapping[str, Any]) -> dict[str, Any] | None:
        return data_set_held_out(env_config)

    def respond(self, episode: Episode, response: str) -> Turn:
        result = self._verdict(episode)
        if result.acc or episode.turns >= self.max_tries:  # right, or out of tries: the episode ends
            return Turn(result=result)
        return Turn(observation=self.retry_message)

    def conclude(self, episode: Episode) -> VerifierResult:
        return self._verdict(episode)

    def _verdict(self, episode: Episode) -> VerifierResult:
        """The verifier's verdict on the newest try, a correct one discounted by the tries it took."""
        result = self.verifier(episode.responses[-1], episode.problem.answer)
        if not result.acc:
            return result
        discount = self.retry_discount ** (episode.turns - 1)
        return VerifierResult(
            score=result.score * discount, acc=True, pred=result.pred, reason=result.reason, failed=result.failed
        )
