"""Multi-turn reasoning environments: the model answers, the environment replies, the model goes on.

A :class:`MultiTurnReasoningEnv` is a :class:`~dapo_envs.base.ReasoningEnv` whose ``step(response)``
may return ``terminated=False`` and an observation: the environment's next turn (a tool's result,
"wrong, try again"). The episode ends when the environment gives its verdict, or after
``max_turns`` model turns (the environment then concludes on what it has).

Trainer protocol (beyond :class:`~dapo_envs.base.ReasoningEnv`'s)
=================================================================

A trainer runs many episodes at once, so the episode's state lives in an :class:`Episode`, not in
the environment:

``begin_episode(problem) -> Episode``
    A new episode on ``problem``.
``take_turn(episode, response: str, *, cut=False) -> Turn``
    The environment's answer to one model turn: an observation (the episode goes on) or a verdict
    (it ends). It records the turn in ``episode`` and enforces ``max_turns``: when the model has
    used its last turn and the environment would go on, the episode is concluded instead. A turn
    ``cut`` short by the trainer's token budget is not answered: the episode is concluded.
``stop_episode(episode) -> VerifierResult``
    End an episode the trainer stops (no token left for the model's next turn): ``conclude``.
``conclude(episode) -> VerifierResult``
    The verdict on an episode stopped before the environment's own (by default the verifier's on the
    last response).
``demonstration(problem) -> list[str]``
    A correct episode, model and environment turns alternating (model first), for warm-starts.
``max_turns``
    Model turns per episode at most.

The episode's return is its verdict's ``score`` plus the per-turn ``Turn.reward`` values; ``acc``
(what dynamic sampling filters on) is the verdict's. Subclasses implement :meth:`respond` (and
:meth:`conclude` when an episode can be stopped before the environment's own verdict).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

from dapo_envs.base import Problem, ReasoningEnv, ResponseText, is_number
from dapo_envs.verifiers import VerifierResult, as_text

__all__ = ["Episode", "MultiTurnReasoningEnv", "ToolEnv", "Turn", "is_multi_turn"]


@dataclasses.dataclass(frozen=True)
class Turn:
    """The environment's answer to one model turn: exactly one of ``observation`` and ``result``.

    Attributes:
        observation: The environment's next message; the episode goes on.
        result: The verdict; the episode ends.
        reward: A per-turn reward, added to the episode's return (0 unless the environment shapes).
        turn_limit: The episode ended because the model used its last turn (``max_turns``), not by
            the environment's own rule (Gymnasium's ``truncated``).
    """

    observation: str | None = None
    result: VerifierResult | None = None
    reward: float = 0.0
    turn_limit: bool = False

    def __post_init__(self) -> None:
        if (self.observation is None) == (self.result is None):
            raise ValueError("a Turn holds exactly one of observation (the episode goes on) and result (it ends)")
        if self.observation is not None and not isinstance(self.observation, str):
            raise TypeError(f"Turn.observation must be a string, got {type(self.observation).__name__}")

    @property
    def done(self) -> bool:
        return self.result is not None


@dataclasses.dataclass
class Episode:
    """One episode's state: its problem, the model's responses and the environment's replies so far.

    ``data`` is the environment's own (a subclass keeps what it needs between turns there);
    ``rewards`` the per-turn rewards; ``result`` the verdict once the episode is over.
    """

    problem: Problem
    responses: list[str] = dataclasses.field(default_factory=list)
    observations: list[str] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    result: VerifierResult | None = None

    @property
    def turns(self) -> int:
        """Model turns taken."""
        return len(self.responses)

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def episode_return(self) -> float:
        """The verdict's score plus the per-turn rewards (the verdict must be in)."""
        if self.result is None:
            raise RuntimeError("the episode is not over: it has no verdict yet")
        return float(self.result.score) + float(sum(self.rewards))


def is_multi_turn(env: Any) -> bool:
    """Whether ``env`` (an unwrapped environment) runs multi-turn episodes."""
    return isinstance(env, MultiTurnReasoningEnv)


class MultiTurnReasoningEnv(ReasoningEnv):
    """Base class of the multi-turn environments (see the module docstring for the protocol).

    Subclasses set ``self.max_turns`` and implement :meth:`respond`; Gymnasium's ``reset`` / ``step``
    and the turn limit are here. Observations are any text (the prompt, then the environment's replies),
    in a :class:`~dapo_envs.base.ResponseText` space.
    """

    max_turns: int
    #: The environment whose problems this one poses, when it poses another's (see :meth:`_pose`).
    problems: ReasoningEnv | None = None

    # -- for subclasses ------------------------------------------------------------------------------

    def _pose(self, problems: ReasoningEnv, max_response_chars: int) -> None:
        """Pose the problems of another reasoning environment, with its verifier and prompt template."""
        self.problems = problems
        self.verifier = problems.verifier
        self.prompt_template = problems.prompt_template
        self._set_spaces(frozenset(), problems.observation_space.max_length, max_response_chars)

    @property
    def num_problems(self) -> int:
        if self.problems is None:
            raise NotImplementedError(
                f"{type(self).__name__} poses no other environment's problems: define num_problems"
            )
        return self.problems.num_problems

    def problem(self, index: int) -> Problem:
        if self.problems is None:
            raise NotImplementedError(f"{type(self).__name__} poses no other environment's problems: define problem()")
        return self.problems.problem(index)

    def respond(self, episode: Episode, response: str) -> Turn:
        """The environment's answer to ``response``, the episode's newest model turn (already recorded
        in ``episode.responses``)."""
        raise NotImplementedError

    def conclude(self, episode: Episode) -> VerifierResult:
        """The verdict on an episode stopped before the environment gave one: by default the verifier's
        on the last response."""
        if not episode.responses:
            raise ValueError("an episode without a model turn cannot be concluded")
        return self.verifier(episode.responses[-1], episode.problem.answer)

    def demonstration(self, problem: Problem) -> list[str]:
        """A correct episode: model and environment turns, alternating, model first (default: the one
        correct response)."""
        return [self.solution_text(problem)]

    def _set_spaces(self, prompt_charset: frozenset[str], max_prompt_length: int, max_response_chars: int) -> None:
        super()._set_spaces(prompt_charset, max_prompt_length, max_response_chars)
        # Observations include the environment's replies (a tool's output, an error naming any character).
        self.observation_space = ResponseText(max_length=max(max_prompt_length, max_response_chars))

    # -- trainer protocol ----------------------------------------------------------------------------

    def begin_episode(self, problem: Problem) -> Episode:
        turns = getattr(self, "max_turns", None)
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
            raise ValueError(
                f"{type(self).__name__}.max_turns must be an integer >= 1 (set it in __init__), got {turns!r}"
            )
        return Episode(problem=problem)

    def take_turn(self, episode: Episode, response: str, *, cut: bool = False) -> Turn:
        """Record ``response``, answer it, and end the episode at its verdict or its last turn.

        ``cut``: the trainer's token budget cut the response short. It is recorded and the episode
        concluded (:meth:`conclude`) without the environment answering it: a half-written tool call
        is not run.
        """
        if episode.done:
            raise RuntimeError("the episode is over; begin a new one")
        episode.responses.append(as_text(response, "the response"))
        if cut:
            turn = Turn(result=self.conclude(episode))
        else:
            turn = self.respond(episode, episode.responses[-1])
            if not isinstance(turn, Turn):
                raise TypeError(f"{type(self).__name__}.respond must return a Turn, got {type(turn).__name__}")
            if not turn.done and episode.turns >= self.max_turns:
                turn = Turn(result=self.conclude(episode), reward=turn.reward, turn_limit=True)
        episode.rewards.append(float(turn.reward))
        if turn.result is not None:
            episode.result = turn.result
        else:
            assert turn.observation is not None  # a Turn holds exactly one of the two
            episode.observations.append(turn.observation)
        return turn

    def stop_episode(self, episode: Episode) -> VerifierResult:
        """End an episode from outside (no token left for the model's next turn): the environment concludes."""
        if episode.result is None:
            episode.result = self.conclude(episode)
        return episode.result

    # -- gymnasium API ----------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        prompt, info = super().reset(seed=seed, options=options)
        assert self._current is not None  # set by ReasoningEnv.reset
        self._episode = self.begin_episode(self._current)
        return prompt, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._current is None:
            raise RuntimeError("call reset() before step()")
        if self._episode.done:
            raise RuntimeError("the episode is over; call reset() for the next problem")
        turn = self.take_turn(self._episode, action)
        info = self._problem_info(self._current)
        info["turn"] = self._episode.turns
        result = turn.result
        if result is None:
            assert turn.observation is not None  # a Turn holds exactly one of the two
            return turn.observation, float(turn.reward), False, False, info
        self._last_response, self._last_result = self._episode.responses[-1], result
        info.update(
            acc=result.acc,
            score=result.score,
            pred=result.pred,
            ground_truth=self._current.answer,
            reason=result.reason,
        )
        reward = float(turn.reward) + float(result.score)
        return self._current.prompt, reward, not turn.turn_limit, turn.turn_limit, info

    def render(self) -> str | None:  # type: ignore[override]  # "ansi" frames are text
        if self.render_mode != "ansi":
            return None
        if self._current is None:
            return ""
        text = self._current.prompt
        episode = self._episode
        for index, response in enumerate(episode.responses):
            text += f"\n--- model, turn {index + 1} ---\n{response}"
            if index < len(episode.observations):
                text += f"\n--- environment ---\n{episode.observations[index]}"
        if episode.result is not None:
            text += f"\n--- reward {episode.episode_return:+g} (pred {episode.result.pred!r}, "
            text += f"reference {self._current.answer!r}) ---"
        return text


class ToolEnv(MultiTurnReasoningEnv):
    """The problems of another reasoning environment, and one tool the model may call between answers.

    In a turn the model either calls the tool, ``<TAG>input</TAG>`` (``TAG`` is the class's ``tag``),
    and the environment replies ``<result>output</result>`` with :meth:`tool`'s output; or it answers,
    and the verifier of ``problems`` scores that turn and ends the episode. ``max_calls`` calls at
    most (``max_turns = max_calls + 1``); each call adds ``call_reward`` to the return. A subclass sets
    ``tag`` and implements ``tool(text) -> str`` (return an error as text: the model reads it).
    """

    tag: ClassVar[str] = "tool"

    def __init__(
        self, problems: ReasoningEnv, *, max_calls: int = 3, call_reward: float = 0.0, render_mode: str | None = None
    ) -> None:
        super().__init__(render_mode=render_mode)
        if not isinstance(problems, ReasoningEnv):
            raise TypeError(f"problems must be a ReasoningEnv (the problems to pose), got {type(problems).__name__}")
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
            raise ValueError(f"max_calls must be a non-negative integer, got {max_calls!r}")
        if not re.fullmatch(r"[A-Za-z_][\w-]*", self.tag):
            raise ValueError(f"{type(self).__name__}.tag must be a plain tag name, got {self.tag!r}")
        self.max_calls = max_calls
        self.max_turns = max_calls + 1
        if not (is_number(call_reward) and math.isfinite(call_reward)):
            raise ValueError(f"call_reward must be a finite number, got {call_reward!r}")
        self.call_reward = float(call_reward)
        self._call = re.compile(f"<{self.tag}>(.*?)</{self.tag}>", re.DOTALL)
        self._pose(problems, problems.action_space.max_length)

    def tool(self, text: str) -> str:
        """The tool's output for the text of one call."""
        raise NotImplementedError

    def tool_call(self, response: str) -> str | None:
        """The text of the first call in ``response``, or None when it makes none."""
        match = self._call.search(response)
        return None if match is None else match.group(1)

    def respond(self, episode: Episode, response: str) -> Turn:
        call = self.tool_call(response)
        if call is None:
            return Turn(result=self.verifier(response, episode.problem.answer))
        episode.data["calls"] = episode.data.get("calls", 0) + 1
        try:
            output = self.tool(call)
        except Exception as error:  # a bug in the tool, not the model's: stop with what was called
            raise RuntimeError(
                f"{type(self).__name__}.tool raised {type(error).__name__} on the call "
                f"<{self.tag}>{call[:200]}</{self.tag}>: {error}"
            ) from error
        if not isinstance(output, str):
            raise TypeError(f"{type(self).__name__}.tool must return a string, got {type(output).__name__}")
        return Turn(observation=f"<result>{output}</result>", reward=self.call_reward)
