"""The ``math_verify`` verifier: symbolic equivalence through Hugging Face's ``math-verify`` library.

For MATH-500-style answers that a string rule cannot compare (LaTeX fractions, radicals, intervals, sets,
tuples, expressions), the reference and the response's final answer are parsed and compared by
``math_verify.parse`` / ``math_verify.verify`` (github.com/huggingface/Math-Verify). The response is read
the way open-r1's accuracy reward reads it (``src/open_r1/rewards.py``, ``accuracy_reward``): the last
``\\boxed{}`` first, other LaTeX only after an anchor such as "the final answer is".

Parsing runs sympy, which can hang in C code that no signal interrupts (``9^{9^{9^9}}``), so the
library's own signal-based timeouts are off and the registered verifier runs this rule in the worker
pool (:mod:`dapo_envs.verifier_pool`), whose hard per-item time limit replaces them.
"""

from __future__ import annotations

from typing import Any

from dapo_envs.verifiers.result import VerifierResult, verdict, wrong

__all__ = ["math_verify_rule", "math_verify_warmup"]


def _prediction_extraction_config() -> list[Any]:
    from math_verify import LatexExtractionConfig

    # Boxed answers first, LaTeX only with an anchor ("the answer is ..."), so that a number in the middle
    # of the reasoning is not taken as the answer. The library's default normalisation (units, \frac43,
    # ...) matches the reference side's.
    return [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]


def math_verify_warmup() -> None:
    """Import the library and run one comparison, so that a worker's first item does not pay for either."""
    import logging

    # The library logs a warning when its signal-based timeout is off; the worker pool is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify_rule("\\boxed{\\frac{1}{2}}", "0.5")


def math_verify_rule(response: str, reference: str) -> VerifierResult:
    """+1 if math-verify finds the response's final answer equivalent to the reference.

    The reference is parsed as LaTeX (wrapped in ``\\boxed{}`` unless it has one); the response's
    answer is its last ``\\boxed{}`` or anchored LaTeX expression; ``pred`` is that answer as the library
    parsed it. Without a time limit of its own: call it through the registered ``math_verify`` verifier,
    which runs it in a worker process with a hard one.
    """
    # Imported here, not at the top: the library (and sympy) load in the worker processes that run this
    # rule, never in a trainer process that only imports the registry.
    from math_verify import parse, verify

    gold_text = reference if "\\boxed" in reference else "\\boxed{" + reference + "}"
    gold = parse(gold_text, parsing_timeout=None)
    if not gold:
        return wrong("math-verify could not parse the reference")
    prediction = parse(response, extraction_config=_prediction_extraction_config(), parsing_timeout=None)
    if not prediction:
        return wrong("no answer math-verify could extract")
    pred = str(prediction[-1])
    return verdict(verify(gold, prediction, timeout_seconds=None), pred)
