"""Tools that multi-turn reasoning environments answer a model's calls with (``dapo/Calculator-v0``).

``calculator``: exact arithmetic over a small grammar (numbers, + - * /, parentheses), never ``eval``.
"""

from dapo_envs.tools.calculator import CalculatorLimits, CalculatorResult, calculate

__all__ = ["CalculatorLimits", "CalculatorResult", "calculate"]
