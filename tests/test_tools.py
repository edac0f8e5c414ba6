"""The calculator tool (dapo_envs.tools.calculator): exact values, and refusals that never hang."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from dapo_envs.tools import CalculatorLimits, calculate


@pytest.mark.parametrize(
    "expression, text",
    [
        ("1+2*3", "7"),
        ("(1+2)*3", "9"),
        ("123*45", "5535"),
        ("987 * 654", "645498"),
        ("7/2", "3.5"),
        ("1/3", "0.333333"),
        ("2/3*3", "2"),
        ("-(2-5)", "3"),
        ("--4", "4"),
        ("+7", "7"),
        (" 1.5 * 2 ", "3"),
        (".5+.5", "1"),
        ("10-20", "-10"),
        ("-1/8", "-0.125"),
        ("-0.0000001", "0"),
        ("((((1))))", "1"),
    ],
)
def test_values_are_exact(expression, text):
    result = calculate(expression)
    assert result.ok and result.text == text, result


def test_value_is_a_fraction():
    assert calculate("1/3 + 1/6").value == Fraction(1, 2)


@pytest.mark.parametrize(
    "expression, error",
    [
        ("9**9**9", "expected a number or '(', got '*'"),
        ("2^3", "unexpected character '^'"),
        ("1/0", "division by zero"),
        ("1/(2-2)", "division by zero"),
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("__import__('os')", "unexpected character '_'"),
        ("1 2", "expected an operator, got a number"),
        ("((1)", "a '(' is never closed"),
        ("1+", "expected a number or '(', got the end"),
        (")", "expected a number or '(', got ')'"),
        ("9" * 1_000_000, "expression longer than 256 characters (1000000)"),
        ("(" * 120 + "1" + ")" * 120, "nested deeper than 32 levels"),
        ("-" * 200 + "1", "nested deeper than 32 levels"),
        ("1" * 41, "a number has more than 40 digits"),
        ("*".join(["99999999999"] * 21), "an intermediate result has more than 200 digits"),
        (None, "expected text, got NoneType"),
    ],
)
def test_bad_expressions_get_an_error_result_quickly(expression, error):
    start = time.perf_counter()
    result = calculate(expression)
    elapsed = time.perf_counter() - start
    assert not result.ok and result.value is None
    assert result.error == error and result.text == f"error: {error}"
    assert elapsed < 1.0, elapsed  # bounds checked before the work: never a hang (a 9**9**9 would take hours)


@pytest.mark.parametrize("depth", [1, 2, 31, 32])
def test_nesting_up_to_the_limit_is_allowed(depth):
    assert calculate("(" * depth + "7" + ")" * depth).text == "7"
    assert calculate("-" * depth + "7").value == (-1) ** depth * 7  # unary signs nest too


@pytest.mark.parametrize(
    "expression", ["(" * 33 + "7" + ")" * 33, "-" * 33 + "7", "(" * 16 + "-" * 17 + "7" + ")" * 16]
)
def test_nesting_one_past_the_limit_is_refused(expression):
    assert CalculatorLimits().max_depth == 32
    assert calculate(expression).error == "nested deeper than 32 levels"


def test_limits_are_settings():
    assert calculate("(((1)))", CalculatorLimits(max_depth=2)).error == "nested deeper than 2 levels"
    assert calculate("1/3", CalculatorLimits(decimals=2)).text == "0.33"
