"""The verdict every verifier returns, and the conversions that the registry, the rules and the worker
pool share.

This module imports nothing from ``dapo_envs``: the rules (``dapo_envs.verifiers.<rule>``), the registry
(:mod:`dapo_envs.verifiers`) and the worker pool (:mod:`dapo_envs.verifier_pool`) all build on it, which
keeps their dependencies one way (registry -> pool -> this module, registry -> rules -> this module).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "CORRECT_SCORE",
    "WRONG_SCORE",
    "VerifierResult",
    "as_text",
    "coerce_result",
    "run_verifier_fn",
    "verdict",
    "verifier_failure",
    "wrong",
]

#: The reward of a correct and of a wrong response: DAPO's +1 / -1, shared by every built-in rule.
CORRECT_SCORE = 1.0
WRONG_SCORE = -1.0


@dataclasses.dataclass(frozen=True)
class VerifierResult:
    """The verdict on one response.

    Attributes:
        score: The reward (+1.0 / -1.0 for the built-in verifiers).
        acc: Whether the response is correct; what DAPO's dynamic sampling filters on.
        pred: The answer extracted from the response ("" when none was found).
        reason: Why the response was scored wrong without a comparison (no answer found, time limit
            exceeded, verifier error); "" when the answer was compared.
        failed: The verifier itself failed on this response (it raised, returned something that is not
            a verdict or a finite score, ran past its time limit, or killed its worker process), so the
            response was scored wrong without a verdict on it; training counts these.
    """

    score: float
    acc: bool
    pred: str
    reason: str = ""
    failed: bool = False


def wrong(reason: str = "", pred: str = "") -> VerifierResult:
    """A wrong verdict reached without comparing answers (``reason`` says why)."""
    return VerifierResult(score=WRONG_SCORE, acc=False, pred=pred, reason=reason)


def verifier_failure(reason: str) -> VerifierResult:
    """A wrong score given because the verifier failed on the response (``reason`` says how)."""
    return VerifierResult(score=WRONG_SCORE, acc=False, pred="", reason=reason, failed=True)


def verdict(correct: bool, pred: str) -> VerifierResult:
    """The verdict of a comparison: +1 when ``correct``, else -1, with the extracted answer ``pred``."""
    return VerifierResult(score=CORRECT_SCORE if correct else WRONG_SCORE, acc=bool(correct), pred=pred)


def coerce_result(raw: Any, verifier_name: str) -> VerifierResult:
    """Convert what a verifier function returned into a :class:`VerifierResult`.

    Accepted: a VerifierResult; a bool (True -> +1, False -> -1); a real number (the score, correct when
    > 0); a mapping with ``score`` and optionally ``acc`` (default ``score > 0``) and ``pred``, as verl's
    ``compute_score`` returns. Anything else is scored wrong with a reason naming the type.
    """
    if isinstance(raw, VerifierResult):
        # Field types are not enforced by the dataclass; a user's numpy bool or int pred is normalised here.
        result = VerifierResult(float(raw.score), bool(raw.acc), str(raw.pred), str(raw.reason), bool(raw.failed))
    elif isinstance(raw, bool):
        return verdict(raw, "")
    elif isinstance(raw, (int, float)):
        result = VerifierResult(score=float(raw), acc=float(raw) > 0, pred="")
    elif isinstance(raw, Mapping) and "score" in raw:
        score = float(raw["score"])
        acc = bool(raw["acc"]) if "acc" in raw else score > 0
        pred = raw.get("pred", "")
        result = VerifierResult(score=score, acc=acc, pred="" if pred is None else str(pred))
    else:
        return verifier_failure(f"verifier '{verifier_name}' returned {type(raw).__name__}, not a VerifierResult")
    if not math.isfinite(result.score):  # a NaN reward would reach the loss
        return verifier_failure(f"verifier '{verifier_name}' returned a non-finite score ({result.score})")
    return result


def as_text(value: Any, what: str) -> str:
    """Return ``value`` as ``str``; bytes are decoded as UTF-8 with invalid sequences replaced.

    Raises:
        TypeError: ``value`` is neither text nor bytes (``what`` names it in the message).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    raise TypeError(f"{what} must be a str (or UTF-8 bytes), got {type(value).__name__}")


def run_verifier_fn(fn: Callable[[str, str], Any], name: str, response: str, reference: str) -> VerifierResult:
    """Call a verifier function, turning any exception into a wrong verdict with the reason."""
    try:
        return coerce_result(fn(response, reference), name)
    except Exception as error:  # noqa: BLE001 - a verifier bug must cost one reward, not the training run
        return verifier_failure(f"verifier '{name}' raised {type(error).__name__}: {str(error)[:200]}")
