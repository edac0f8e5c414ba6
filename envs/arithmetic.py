"""dapo/Arithmetic-v0: procedurally generated integer arithmetic, for tiny models trained from scratch."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from dapo_envs import prompts
from dapo_envs.base import DEFAULT_MAX_RESPONSE_CHARS, Problem, ReasoningEnv, is_integer
from dapo_envs.verifiers import Verifier

__all__ = ["ArithmeticEnv", "DIFFICULTY_PRESETS", "DEFAULT_ARITHMETIC_TEMPLATE"]

#: difficulty -> the operands / digits / operators it stands for (explicit keyword arguments win).
DIFFICULTY_PRESETS: dict[int, dict[str, Any]] = {
    1: {"operands": 2, "digits": 1, "operators": "+"},
    2: {"operands": 2, "digits": 2, "operators": "+-"},
    3: {"operands": 3, "digits": 2, "operators": "+-"},
    4: {"operands": 2, "digits": 2, "operators": "+-*"},
    5: {"operands": 3, "digits": 3, "operators": "+-*"},
}
_DEFAULT_DIFFICULTY = 2

#: Short and plain: a character-level model reads every character.
DEFAULT_ARITHMETIC_TEMPLATE = "What is {problem}?\n"

_OPERATORS = "+-*"
_SPLITS = {"train": 0, "test": 1}
# One problem in _TEST_SHARE lands in the test split, decided by a hash of its text, so the splits are
# disjoint whatever the seeds and sizes.
_TEST_SHARE = 5
# Problem spaces up to this size are enumerated (exact, finite splits); larger ones are sampled by index.
_ENUMERATE_LIMIT = 200_000
_DEFAULT_SAMPLED_SIZE = {"train": 100_000, "test": 2_000}
_MAX_NUM_PROBLEMS = 2**62


def _in_test_split(expression: str) -> bool:
    return zlib.crc32(expression.encode()) % _TEST_SHARE == 0


def _evaluate(values: Sequence[int], operators: Sequence[str]) -> int:
    """Exact integer value with the usual precedence ("*" before "+" and "-", then left to right)."""
    terms, signs = [values[0]], []
    for operator, value in zip(operators, values[1:]):
        if operator == "*":
            terms[-1] *= value
        else:
            signs.append(operator)
            terms.append(value)
    total = terms[0]
    for sign, term in zip(signs, terms[1:]):
        total = total + term if sign == "+" else total - term
    return total


def _render(values: Sequence[int], operators: Sequence[str]) -> str:
    parts = [str(values[0])]
    for operator, value in zip(operators, values[1:]):
        parts += [operator, str(value)]
    return " ".join(parts)


class ArithmeticEnv(ReasoningEnv):
    """Integer arithmetic problems generated from a seed; no data and no pretrained model needed.

    ## Description

    Each problem is an expression such as ``12 + 7`` or ``40 - 3 * 5``; the model must reply with its
    value in the DAPO answer format, ``Answer: 19``. Problems are a deterministic function of the
    configuration, the split and the problem index, so runs are reproducible, and the ``train`` and
    ``test`` splits are disjoint (a problem's split is fixed by a hash of its text), so evaluation uses
    problems never trained on. Small problem spaces (the default has 20,000 expressions) are enumerated
    and shuffled once, larger ones are drawn per index. The default, two operands of up to two digits
    with ``+`` and ``-`` and no negative results, is learnable in minutes by a tiny character-level model
    trained from scratch on two CPU cores; ``difficulty`` steps it up.

    ## Observation

    The prompt, by default ``"What is 12 + 7?\\n"``, in a ``gymnasium.spaces.Text`` over exactly the
    characters the prompts use, ``max_length`` the longest possible prompt.

    ## Action

    The response text (:class:`~dapo_envs.base.ResponseText`), e.g. ``"Answer: 19"``.

    ## Reward

    The verifier's score, by default the DAPO rule (``dapo``): +1.0 when the last ``Answer:`` of the
    response (within its last 300 characters) equals the value, -1.0 otherwise. The episode ends after
    the one step; the info holds ``acc``, ``score``, ``pred``, ``ground_truth`` and ``reason``.
    ``env.unwrapped.solution_text(problem)`` gives the correct response (for supervised warm-starts).

    ## Arguments

    - ``operands``: numbers per expression, 2..6 (default 2).
    - ``operators``: the operators to draw from, a string over ``"+-*"`` (default ``"+-"``).
    - ``digits``: at most this many digits per operand, 1..6; operands are uniform in
      ``0 .. 10**digits - 1`` (default 2).
    - ``difficulty``: a preset 1..5 for the three above (see ``DIFFICULTY_PRESETS``: 1 = one-digit
      addition, 2 = the default, 3 = three operands, 4 = adds ``*``, 5 = three 3-digit operands with
      ``*``); explicitly passed ``operands`` / ``operators`` / ``digits`` override it.
    - ``allow_negative``: allow negative results (default False: such expressions are left out).
    - ``split``: ``"train"`` (default) or ``"test"``.
    - ``num_problems``: size of the split (default: all of it when the space is enumerated, else
      100,000 for train and 2,000 for test).
    - ``prompt_template``: a string containing ``{problem}`` (the expression) or a template name
      (default ``"What is {problem}?\\n"``).
    - ``verifier``: verifier name, ``Verifier`` or function (default ``"dapo"``).
    - ``verifier_timeout``, ``max_response_chars``, ``render_mode``: as for ``dapo/Math-v0``.
    """

    # Evaluation reads the test split: problems disjoint from the train split it was trained on.
    held_out_env_config: ClassVar[dict[str, Any]] = {"split": "test"}

    def __init__(
        self,
        *,
        operands: int | None = None,
        operators: str | Sequence[str] | None = None,
        digits: int | None = None,
        difficulty: int | None = None,
        allow_negative: bool = False,
        split: str = "train",
        num_problems: int | None = None,
        prompt_template: str = DEFAULT_ARITHMETIC_TEMPLATE,
        verifier: str | Verifier | Callable[[str, str], Any] = "dapo",
        verifier_timeout: float | None = None,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(render_mode=render_mode)
        if difficulty is not None and not (is_integer(difficulty) and difficulty in DIFFICULTY_PRESETS):
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY_PRESETS)}, got {difficulty!r}")
        preset = DIFFICULTY_PRESETS[_DEFAULT_DIFFICULTY if difficulty is None else difficulty]
        self.operands = preset["operands"] if operands is None else operands
        self.digits = preset["digits"] if digits is None else digits
        self.operators = _check_operators(preset["operators"] if operators is None else operators)
        if not (is_integer(self.operands) and 2 <= self.operands <= 6):
            raise ValueError(f"operands must be an integer in 2..6, got {self.operands!r}")
        if not (is_integer(self.digits) and 1 <= self.digits <= 6):
            raise ValueError(f"digits must be an integer in 1..6, got {self.digits!r}")
        if not isinstance(split, str) or split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(allow_negative, bool):  # bool("no") is True
            raise TypeError(f"allow_negative must be true or false, got {allow_negative!r}")
        self.split = split
        self.allow_negative = allow_negative
        self._set_verifier(verifier, verifier_timeout)
        self.prompt_template = prompts.resolve_template(prompt_template)

        space_size = (10**self.digits) ** self.operands * len(self.operators) ** (self.operands - 1)
        self._enumerated: list[tuple[tuple[int, ...], tuple[str, ...]]] | None = None
        if space_size <= _ENUMERATE_LIMIT:
            self._enumerated = self._enumerate_split()
            available = len(self._enumerated)
            if available == 0:
                raise ValueError(f"this configuration has no {split} problems; use more digits or operands")
        else:
            available = None
        if num_problems is None:
            self._num_problems = available if available is not None else _DEFAULT_SAMPLED_SIZE[split]
        else:
            # The upper bound keeps a drawn index within numpy's int64 (larger sizes could not be sampled).
            if not (is_integer(num_problems) and 1 <= num_problems <= _MAX_NUM_PROBLEMS):
                raise ValueError(f"num_problems must be an integer in 1..2**62, got {num_problems!r}")
            if available is not None and num_problems > available:
                raise ValueError(f"num_problems={num_problems} but the {split} split has only {available} problems")
            self._num_problems = num_problems

        longest_expression = self.operands * self.digits + 3 * (self.operands - 1)
        placeholders = self.prompt_template.count(prompts.PLACEHOLDER)
        max_prompt_length = len(self.prompt_template) + placeholders * (longest_expression - len(prompts.PLACEHOLDER))
        charset = frozenset(self.prompt_template.replace(prompts.PLACEHOLDER, "")) | frozenset(
            "0123456789 " + "".join(self.operators)
        )
        self._set_spaces(charset, max_prompt_length, max_response_chars)

    @property
    def num_problems(self) -> int:
        return self._num_problems

    def problem(self, index: int) -> Problem:
        if not 0 <= index < self._num_problems:
            raise IndexError(f"problem index {index} is outside 0..{self._num_problems - 1}")
        if self._enumerated is not None:
            values, operators = self._enumerated[index]
        else:
            values, operators = self._draw(np.random.default_rng([0xA217, _SPLITS[self.split], index]))
        expression = _render(values, operators)
        return Problem(
            index=index,
            problem_id=f"{self.split}-{index}",
            data_source="arithmetic",
            question=expression,
            prompt=prompts.render(self.prompt_template, expression),
            answer=str(_evaluate(values, operators)),
        )

    def _acceptable(self, values: Sequence[int], operators: Sequence[str]) -> bool:
        if not self.allow_negative and _evaluate(values, operators) < 0:
            return False
        return _in_test_split(_render(values, operators)) == (self.split == "test")

    def _enumerate_split(self) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
        numbers = range(10**self.digits)
        problems = [
            (values, operators)
            for values in itertools.product(numbers, repeat=self.operands)
            for operators in itertools.product(self.operators, repeat=self.operands - 1)
            if self._acceptable(values, operators)
        ]
        # A fixed shuffle, so that index order carries no pattern (and prefixes are representative).
        order = np.random.default_rng([0xA217, _SPLITS[self.split]]).permutation(len(problems))
        return [problems[i] for i in order]

    def _draw(self, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[str, ...]]:
        for _ in range(10_000):
            values = tuple(int(v) for v in rng.integers(0, 10**self.digits, size=self.operands))
            operators = tuple(str(o) for o in rng.choice(list(self.operators), size=self.operands - 1))
            if self._acceptable(values, operators):
                return values, operators
        raise RuntimeError("could not draw a problem for this configuration in 10,000 tries")


def _check_operators(operators: str | Sequence[str]) -> tuple[str, ...]:
    """The distinct operators of a string such as ``"+-"`` (or a list of one-character strings)."""
    given = list(operators) if isinstance(operators, (str, list, tuple)) else None
    if not given or any(not isinstance(o, str) or o not in _OPERATORS for o in given):
        raise ValueError(f'operators must be a non-empty string over "{_OPERATORS}" (e.g. "+-"), got {operators!r}')
    return tuple(dict.fromkeys(given))
