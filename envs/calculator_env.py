"""dapo/Calculator-v0: arithmetic harder than a model can do in its head, with a calculator tool."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from dapo_envs.arithmetic import ArithmeticEnv
from dapo_envs.base import DEFAULT_MAX_RESPONSE_CHARS, Problem
from dapo_envs.multi_turn import ToolEnv
from dapo_envs.tools.calculator import CalculatorLimits, calculate
from dapo_envs.verifiers import Verifier

__all__ = ["CalculatorEnv", "DEFAULT_CALCULATOR_TEMPLATE", "calculator_reply"]

DEFAULT_CALCULATOR_TEMPLATE = (
    "What is {problem}? To use a calculator, write <calc>expression</calc> and end your turn; "
    "it replies <result>value</result>. End with Answer: value.\n"
)


def calculator_reply(expression: str, limits: CalculatorLimits = CalculatorLimits()) -> str:
    """The calculator's output for one call: the value, or ``error: why``."""
    result = calculate(expression, limits)
    return result.text if result.ok else f"error: {result.error}"


def _calculator_limits(limits: CalculatorLimits | dict[str, Any] | None) -> CalculatorLimits:
    if limits is None or isinstance(limits, CalculatorLimits):
        return limits or CalculatorLimits()
    if not isinstance(limits, dict):
        raise TypeError(f"limits must be a CalculatorLimits or a mapping of its fields, got {limits!r}")
    unknown = sorted(set(limits) - set(CalculatorLimits.__dataclass_fields__), key=str)
    if unknown:
        raise ValueError(
            f"limits has unknown field(s) {unknown}; fields: {', '.join(CalculatorLimits.__dataclass_fields__)}"
        )
    try:
        return CalculatorLimits(**limits)
    except (TypeError, ValueError) as error:
        raise ValueError(f"limits: {error}") from None


class CalculatorEnv(ToolEnv):
    """Multiplication of 3-digit numbers (by default), with a calculator the model may call.

    ## Description

    Each problem is an integer expression from :class:`~dapo_envs.arithmetic.ArithmeticEnv` (by default
    two 3-digit operands and ``*``: hard to do in one's head, trivial with a tool). In a turn the model
    either calls the calculator, writing ``<calc>123*456</calc>`` and ending its turn, or answers,
    ``Answer: 56088``. The environment replies to a call with ``<result>56088</result>`` and the model
    goes on; an answer (or a turn with neither) ends the episode and is verified. The calculator is
    :func:`dapo_envs.tools.calculate`: numbers, ``+ - * /`` and parentheses, exact, never ``eval``,
    with bounds on length, digits, nesting and result size (``9**9**9``, a megabyte of digits or a
    deep nest of parentheses gets ``<result>error: ...</result>`` at once).

    ## Observation

    The prompt, then the calculator's replies: any text (:class:`~dapo_envs.base.ResponseText`).

    ## Action

    One model turn, as text.

    ## Reward

    At the end of the episode, the verifier's score of the answering turn (``dapo``: +1 correct, -1
    otherwise), plus ``call_reward`` for each call (default 0). After ``max_calls`` calls the next
    turn is the last: if it calls again, the episode ends (``truncated``) and is scored on that turn.
    The final info holds ``acc``, ``score``, ``pred``, ``ground_truth``, ``reason`` and ``turn``.

    ## Arguments

    - ``operands``, ``digits``, ``operators``, ``split``, ``num_problems``, ``allow_negative``: as for
      ``dapo/Arithmetic-v0`` (defaults 2, 3, ``"*"``, ``"train"``); ``held_out_env_config`` is the
      ``test`` split, disjoint from ``train``.
    - ``max_calls``: calculator calls per episode (default 3; ``max_turns`` is one more).
    - ``call_reward``: reward per call (default 0.0; negative to make calls cost).
    - ``demonstration_tool_share``: share of problems whose ``demonstration`` (the warm-start's
      episodes) calls the calculator; the others answer at once (default 1.0).
    - ``limits``: a :class:`~dapo_envs.tools.CalculatorLimits` (or a dict of its fields).
    - ``prompt_template``, ``verifier``, ``verifier_timeout``, ``max_response_chars``, ``render_mode``:
      as for ``dapo/Arithmetic-v0``.
    """

    held_out_env_config: ClassVar[dict[str, Any]] = {"split": "test"}
    tag: ClassVar[str] = "calc"

    def __init__(
        self,
        *,
        operands: int = 2,
        digits: int = 3,
        operators: str | Sequence[str] = "*",
        allow_negative: bool = False,
        split: str = "train",
        num_problems: int | None = None,
        max_calls: int = 3,
        call_reward: float = 0.0,
        demonstration_tool_share: float = 1.0,
        limits: CalculatorLimits | dict[str, Any] | None = None,
        prompt_template: str = DEFAULT_CALCULATOR_TEMPLATE,
        verifier: str | Verifier | Callable[[str, str], Any] = "dapo",
        verifier_timeout: float | None = None,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
        render_mode: str | None = None,
    ) -> None:
        problems = ArithmeticEnv(
            operands=operands,
            digits=digits,
            operators=operators,
            allow_negative=allow_negative,
            split=split,
            num_problems=num_problems,
            prompt_template=prompt_template,
            verifier=verifier,
            verifier_timeout=verifier_timeout,
            max_response_chars=max_response_chars,
        )
        super().__init__(problems, max_calls=max_calls, call_reward=call_reward, render_mode=render_mode)
        if (
            isinstance(demonstration_tool_share, bool)
            or not isinstance(demonstration_tool_share, (int, float))
            or not (0 <= demonstration_tool_share <= 1)
        ):
            raise ValueError(f"demonstration_tool_share must be a number in [0, 1], got {demonstration_tool_share!r}")
        self.split = split
        self.demonstration_tool_share = float(demonstration_tool_share)
        self.limits = _calculator_limits(limits)

    def tool(self, text: str) -> str:
        return calculator_reply(text, self.limits)

    def problem(self, index: int) -> Problem:
        problem = super().problem(index)  # the posed ArithmeticEnv's
        return Problem(
            index=problem.index,
            problem_id=problem.problem_id,
            data_source="calculator",
            question=problem.question,
            prompt=problem.prompt,
            answer=problem.answer,
        )

    def demonstration(self, problem: Problem) -> list[str]:
        """Call the calculator on the expression, then answer with its result; or, for the problems
        outside ``demonstration_tool_share`` (chosen by a hash of the problem), answer at once."""
        if zlib.crc32(problem.problem_id.encode()) % 1000 >= round(self.demonstration_tool_share * 1000):
            return [self.solution_text(problem)]
        expression = problem.question.replace(" ", "")
        return [f"<calc>{expression}</calc>", f"<result>{self.tool(expression)}</result>", self.solution_text(problem)]
