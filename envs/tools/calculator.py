"""A calculator a model may call: exact arithmetic over a small grammar, never ``eval``.

Grammar (whitespace ignored)::

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := ("+" | "-") factor | number | "(" expression ")"
    number     := digits ["." digits] | "." digits

Arithmetic is exact (:class:`fractions.Fraction`); a result is written as an integer when it is one,
else as a decimal rounded to ``decimals`` places. Every bound is checked before the work it guards,
so no input can make the calculator slow: the text's length first (a megabyte of digits is refused
without being read), then each number's digits, the nesting depth of parentheses and signs (the
parser's recursion), and the size of every intermediate result. There is no power operator:
``9**9**9`` is a syntax error, not a number with 370 million digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["CalculatorLimits", "CalculatorResult", "calculate"]

_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(.))")


@dataclass(frozen=True)
class CalculatorLimits:
    """Bounds on what the calculator accepts (all checked before the work they guard)."""

    max_chars: int = 256  # length of the expression text
    max_number_digits: int = 40  # digits of one number in the text
    max_depth: int = 32  # nesting of parentheses and unary signs
    max_result_digits: int = 200  # digits of any intermediate numerator or denominator
    decimals: int = 6  # places of a non-integer result

    def __post_init__(self) -> None:
        for field, value in vars(self).items():
            least = 0 if field == "decimals" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"CalculatorLimits.{field} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class CalculatorResult:
    """``value`` and its ``text`` when the expression is valid; else ``error`` says why (one line)."""

    text: str
    value: Fraction | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _CalculatorError(ValueError):
    pass


def calculate(expression: str, limits: CalculatorLimits = CalculatorLimits()) -> CalculatorResult:
    """Evaluate ``expression`` under ``limits``; never raises for bad input (the error is in the result)."""
    try:
        if not isinstance(expression, str):
            raise _CalculatorError(f"expected text, got {type(expression).__name__}")
        if len(expression) > limits.max_chars:
            raise _CalculatorError(f"expression longer than {limits.max_chars} characters ({len(expression)})")
        value = _Parser(_tokens(expression, limits), limits).parse()
    except _CalculatorError as error:
        return CalculatorResult(text=f"error: {error}", error=str(error))
    return CalculatorResult(text=_format(value, limits.decimals), value=value)


def _tokens(expression: str, limits: CalculatorLimits) -> list[str | Fraction]:
    tokens: list[str | Fraction] = []
    for number, symbol in _TOKEN.findall(expression.strip()):
        if number:
            if sum(character.isdigit() for character in number) > limits.max_number_digits:
                raise _CalculatorError(f"a number has more than {limits.max_number_digits} digits")
            tokens.append(Fraction(number))
        elif symbol in "+-*/()":
            tokens.append(symbol)
        else:
            raise _CalculatorError(f"unexpected character {symbol!r}")
    if not tokens:
        raise _CalculatorError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str | Fraction], limits: CalculatorLimits) -> None:
        self.tokens = tokens
        self.position = 0
        self.limits = limits
        self.depth = 0

    def parse(self) -> Fraction:
        value = self.expression()
        if self.position < len(self.tokens):
            raise _CalculatorError(f"expected an operator, got {_describe(self.tokens[self.position])}")
        return value

    def peek(self) -> str | Fraction | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str | Fraction | None:
        token = self.peek()
        self.position += 1
        return token

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            operator = self.take()
            right = self.term()
            value = self.checked(value + right if operator == "+" else value - right)
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            operator = self.take()
            right = self.factor()
            if operator == "/" and right == 0:
                raise _CalculatorError("division by zero")
            value = self.checked(value * right if operator == "*" else value / right)
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if isinstance(token, Fraction):
            return token
        if token in ("+", "-", "("):
            self.depth += 1
            if self.depth > self.limits.max_depth:
                raise _CalculatorError(f"nested deeper than {self.limits.max_depth} levels")
            if token == "(":
                value = self.expression()
                if self.take() != ")":
                    raise _CalculatorError("a '(' is never closed")
            else:
                value = self.factor()
                value = -value if token == "-" else value
            self.depth -= 1
            return value
        raise _CalculatorError(f"expected a number or '(', got {_describe(token)}")

    def checked(self, value: Fraction) -> Fraction:
        limit = self.limits.max_result_digits
        # bit_length bounds the digits from above without converting a huge integer to text.
        if max(value.numerator.bit_length(), value.denominator.bit_length()) > limit * 3.33 + 4:
            raise _CalculatorError(f"an intermediate result has more than {limit} digits")
        return value


def _describe(token: str | Fraction | None) -> str:
    return "the end" if token is None else repr(token) if isinstance(token, str) else "a number"


def _format(value: Fraction, decimals: int) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    scaled = round(value * 10**decimals)
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), 10**decimals)
    text = f"{sign}{whole}.{fraction:0{decimals}d}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"
