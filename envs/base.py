"""The reasoning environment base class, its problem record and its text spaces.

One episode is one prompt: ``reset`` shows a problem, ``step(response)`` scores the whole response with
the environment's verifier and ends the episode.

Trainer protocol
================

A trainer (the RLlib loop in ``dapo_rl``) does not step episodes one by one: it draws prompts in
batches, generates G responses per prompt and scores them all at once. Every environment made with
``gymnasium.make("dapo/...")`` offers, on ``env.unwrapped`` (a :class:`ReasoningEnv`):

``num_problems -> int``
    How many problems the environment indexes (procedural environments: the configured size).
``problem(index: int) -> Problem``
    Problem ``index`` (0 <= index < num_problems): ``prompt`` (the rendered plain text, exactly the
    observation), ``messages`` (the same text as a one-user-turn chat list, for a tokenizer's chat
    template), ``answer`` (the reference to pass to ``score``), ``problem_id``, ``data_source``.
``sample_problems(n: int, rng: numpy.random.Generator | int | None = None, *, replace: bool = False)
-> list[Problem]``
    ``n`` problems drawn uniformly (without replacement unless ``replace``), reproducible for a seed.
``score(responses: Sequence[str], references: Sequence[str]) -> list[VerifierResult]``
    Vectorised verification, in input order: ``result.score`` is the reward (+1 / -1), ``result.acc``
    the correctness that dynamic sampling filters on, ``result.pred`` the extracted answer,
    ``result.reason`` why a response was scored wrong without a comparison (e.g. a time-out).
``solution_text(problem: Problem) -> str``
    A minimal correct response (``"Answer: 19"`` for the ``dapo`` verifier), for supervised warm-starts
    and tests.
``verifier`` / ``prompt_template``
    The :class:`~dapo_envs.verifiers.Verifier` and the template (a string with ``{problem}``).

``held_out_env_config`` (class attribute) and ``held_out_overrides(env_config)`` (class method)
    The ``env_config`` overrides that select the environment's held-out problems (``{"split": "test"}``
    for ``dapo/Arithmetic-v0``, whose ``train`` and ``test`` splits are disjoint); ``{}`` / None where the
    environment declares no held-out problems (``dapo-rl train`` then refuses it unless told where to
    evaluate). Data-set environments override the method: their ``split="test"`` is a test file or a
    share carved out of the data (:mod:`dapo_envs.held_out`). Trainers evaluate on
    ``gymnasium.make(env_id, **dapo_envs.held_out_env_config(env_id, env_config))``, after checking
    ``dapo_envs.held_out_overrides(env_id, env_config)`` is not None.

Spaces
======

Observations are a :class:`gymnasium.spaces.Text` whose charset is exactly the characters the
environment's prompts use (for DAPO-Math-17k that includes Chinese) and whose ``max_length`` is the
longest prompt. Actions are a :class:`ResponseText`: a ``Text`` space that contains *any* string up to
``max_length`` characters (a model may answer in any script) and samples short printable-ASCII strings.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from dapo_envs.verifiers import Verifier, VerifierResult, as_text, resolve_verifier

__all__ = [
    "Problem",
    "ReasoningEnv",
    "ResponseText",
    "DEFAULT_MAX_RESPONSE_CHARS",
    "is_integer",
    "is_number",
    "printable",
]

#: Default ``max_length`` of the action space: DAPO's 20,480-token responses at a few characters each.
DEFAULT_MAX_RESPONSE_CHARS = 200_000


def is_integer(value: object) -> bool:
    """An int, not a bool (YAML and JSON give True for "yes": it must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float that is not a bool and not NaN (every comparison with NaN is False)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def printable(text: str) -> str:
    """``text`` with control characters escaped: a newline in a value must not break a one-line error."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of an environment.

    Attributes:
        index: Its index in the environment (``env.problem(index)``).
        problem_id: Stable id within its data source (the data set's id, or ``split-index``).
        data_source: Where it comes from (``"DAPO-17k"``, ``"aime24"``, ``"arithmetic"``...).
        question: The bare problem text.
        prompt: The rendered prompt: the template around the question. This is the observation.
        answer: The reference answer, as the verifier receives it.
    """

    index: int
    problem_id: str
    data_source: str
    question: str
    prompt: str
    answer: str

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt as a chat: one user turn (apply a tokenizer's chat template to it)."""
        return [{"role": "user", "content": self.prompt}]


class ResponseText(spaces.Text):
    """A text action space: any ``str`` of at most ``max_length`` characters, in any script.

    ``contains`` accepts every Unicode string up to ``max_length``; the charset (printable ASCII) is used
    only by ``sample``, which draws strings of at most ``sample_max_length`` characters unless a length
    is given in the mask, so that API checks stay quick.
    """

    SAMPLE_CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n"

    def __init__(self, max_length: int, *, sample_max_length: int = 64, seed: int | None = None) -> None:
        super().__init__(max_length=max_length, min_length=0, charset=self.SAMPLE_CHARSET, seed=seed)
        self.sample_max_length = min(int(sample_max_length), int(max_length))

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        length_given = (mask is not None and mask[0] is not None) or (
            probability is not None and probability[0] is not None
        )
        if not length_given:
            length = int(self.np_random.integers(0, self.sample_max_length + 1))
            if mask is not None:
                mask = (length, mask[1])
            elif probability is not None:
                probability = (length, probability[1])
            else:
                mask = (length, None)
        return super().sample(mask=mask, probability=probability)

    def __repr__(self) -> str:
        return f"ResponseText(max_length={self.max_length})"


class ReasoningEnv(gym.Env[str, str]):
    """Base class of the reasoning environments: one prompt per episode, reward from a verifier.

    Subclasses set ``self.verifier`` and ``self.prompt_template`` and call :meth:`_set_spaces`, and
    implement :attr:`num_problems` and :meth:`problem`. Everything else (reset, step, rendering, batched
    sampling and scoring) is here. See the module docstring for the trainer protocol.

    ``reset(seed=None, options=None)`` draws a problem with ``self.np_random`` (``options={"index": i}``
    picks problem ``i``) and returns ``(prompt, {"problem_id", "data_source", "index"})``.
    ``step(response)`` returns ``(prompt, reward, True, False, info)`` with ``info`` holding ``acc``,
    ``score``, ``pred``, ``ground_truth``, ``reason`` and the reset keys.
    """

    # render_fps only silences Gymnasium's checker: "ansi" rendering returns text and never sleeps.
    # A plain attribute, not a ClassVar, as gymnasium.Env declares it.
    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # noqa: RUF012

    #: env_config overrides that select this environment's held-out problems; {} when the environment
    #: declares none (``dapo-rl train`` then refuses it without ``eval_env`` or an explicit opt-in). Read
    #: it through :func:`dapo_envs.held_out_env_config`, which resolves a registered id to its class.
    held_out_env_config: ClassVar[dict[str, Any]] = {}

    @classmethod
    def held_out_overrides(cls, env_config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The ``env_config`` overrides that select the held-out problems of this class made with
        ``env_config`` (the registered keyword arguments and the user's), None when it has none.

        Default: :attr:`held_out_env_config`, None when it is empty. Override it when the held-out
        source depends on the configuration (a data set with or without a test file).
        """
        return dict(cls.held_out_env_config) if cls.held_out_env_config else None

    verifier: Verifier
    prompt_template: str
    # Set by _set_spaces: narrower than gym.Env's Space[str] (code reads their max_length).
    observation_space: spaces.Text
    action_space: ResponseText

    def __init__(self, *, render_mode: str | None = None) -> None:
        if render_mode is not None and (
            not isinstance(render_mode, str) or render_mode not in self.metadata["render_modes"]
        ):
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self._current: Problem | None = None
        self._last_response: str | None = None
        self._last_result: VerifierResult | None = None

    # -- for subclasses ------------------------------------------------------------------------------

    def _set_verifier(self, verifier: str | Verifier | Callable[[str, str], Any], timeout: float | None) -> None:
        # At most a day: the worker pool waits with select(), which overflows on far larger timeouts.
        if timeout is not None and not (is_number(timeout) and 0 < timeout <= 86_400):
            raise ValueError(f"verifier_timeout must be None or a number of seconds in (0, 86400], got {timeout!r}")
        resolved = resolve_verifier(verifier)
        self.verifier = resolved if timeout is None else resolved.with_timeout(timeout)

    def _set_spaces(self, prompt_charset: frozenset[str], max_prompt_length: int, max_response_chars: int) -> None:
        if isinstance(max_response_chars, bool) or not isinstance(max_response_chars, int) or max_response_chars < 1:
            raise ValueError(f"max_response_chars must be a positive integer, got {max_response_chars!r}")
        # A sorted string, not a set: Text numbers its characters in charset order, and a set's order
        # changes between processes (hash randomisation), which garbles AsyncVectorEnv's shared memory.
        self.observation_space = spaces.Text(
            max_length=max_prompt_length, min_length=1, charset="".join(sorted(prompt_charset))
        )
        self.action_space = ResponseText(max_length=max_response_chars)

    @property
    def num_problems(self) -> int:
        raise NotImplementedError

    def problem(self, index: int) -> Problem:
        raise NotImplementedError

    # -- trainer protocol ----------------------------------------------------------------------------

    def sample_problems(
        self, n: int, rng: np.random.Generator | int | None = None, *, replace: bool = False
    ) -> list[Problem]:
        """``n`` problems drawn uniformly; without replacement unless ``replace`` (then n may exceed the set)."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if not replace and n > self.num_problems:
            raise ValueError(f"cannot draw {n} distinct problems from {self.num_problems}; pass replace=True")
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        indices: Sequence[int] | np.ndarray[Any, Any]
        if replace:
            indices = generator.integers(0, self.num_problems, size=n)
        elif n * 4 <= self.num_problems:
            # Rejection keeps this O(n) for huge procedural index spaces (choice would build a permutation).
            chosen: dict[int, None] = {}
            while len(chosen) < n:
                for index in generator.integers(0, self.num_problems, size=n - len(chosen)):
                    chosen.setdefault(int(index), None)
            indices = list(chosen)
        else:
            indices = generator.choice(self.num_problems, size=n, replace=False)
        return [self.problem(int(i)) for i in indices]

    def score(self, responses: Sequence[str], references: Sequence[str]) -> list[VerifierResult]:
        """Verify ``responses[i]`` against ``references[i]`` for all i at once, with this env's verifier."""
        return self.verifier.score(responses, references)

    def solution_text(self, problem: Problem) -> str:
        """A minimal response the verifier scores correct for ``problem``."""
        return self.verifier.format_answer(problem.answer)

    # -- gymnasium API ----------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"index"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; the only option is 'index'")
        if "index" in options:
            index = options["index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                raise TypeError(f"options['index'] must be an integer, got {type(index).__name__}")
            if not 0 <= index < self.num_problems:
                raise IndexError(f"options['index'] = {index} is outside 0..{self.num_problems - 1}")
            index = int(index)
        else:
            index = int(self.np_random.integers(0, self.num_problems))
        self._current = self.problem(index)
        self._last_response = self._last_result = None
        return self._current.prompt, self._problem_info(self._current)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._current is None:
            raise RuntimeError("call reset() before step(); an episode is one prompt and one response")
        if self._last_result is not None:
            raise RuntimeError("the episode is over (one response per prompt); call reset() for the next problem")
        response = as_text(action, "the action (the response text)")
        result = self.verifier(response, self._current.answer)
        self._last_response, self._last_result = response, result
        info = self._problem_info(self._current)
        info.update(
            acc=result.acc,
            score=result.score,
            pred=result.pred,
            ground_truth=self._current.answer,
            reason=result.reason,
        )
        return self._current.prompt, float(result.score), True, False, info

    def render(self) -> str | None:  # type: ignore[override]  # "ansi" frames are text
        if self.render_mode != "ansi":
            return None
        if self._current is None:
            return ""
        text = self._current.prompt
        if self._last_result is not None:
            text += f"\n--- response ---\n{self._last_response}\n--- reward {self._last_result.score:+g}"
            text += f" (pred {self._last_result.pred!r}, reference {self._current.answer!r}) ---"
        return text

    @staticmethod
    def _problem_info(problem: Problem) -> dict[str, Any]:
        return {"problem_id": problem.problem_id, "data_source": problem.data_source, "index": problem.index}
