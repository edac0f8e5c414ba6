"""The ``gsm8k`` verifier: the number after the last ``####``, compared numerically with the reference's.

GSM8K (Cobbe et al., 2021, "Training Verifiers to Solve Math Word Problems", arXiv 2110.14168) writes each
reference solution as worked steps ending in ``#### <number>``. The rule follows verl's GSM8K scorer
(``verl/utils/reward_score/gsm8k.py``, ``extract_solution(method="strict")``): only the last 300
characters of the response are read and the answer is the number after its last ``####``. Unlike verl,
which compares the strings, the numbers are compared as exact decimals, so ``18``, ``18.00`` and ``$18``
agree; thousands separators are ignored. Linear time, in-process.
"""

from __future__ import annotations

import re
from decimal import Decimal

from dapo_envs.verifiers.result import VerifierResult, verdict, wrong

__all__ = ["GSM8K_RESPONSE_TAIL_CHARS", "gsm8k_rule", "last_final_number"]

#: How much of the response the rule reads, as verl's scorer does.
GSM8K_RESPONSE_TAIL_CHARS = 300

# A number after "####": optional "$", sign, digits with thousands separators, optional decimals.
# Every quantifier is over a disjoint character class, so matching is linear.
_GSM8K_FINAL = re.compile(r"####\s*(?:\$\s*)?(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def last_final_number(text: str) -> str | None:
    """The number after the last ``####`` of ``text``, as written; None when there is none."""
    matches = _GSM8K_FINAL.findall(text)
    return matches[-1] if matches else None


def gsm8k_rule(response: str, reference: str) -> VerifierResult:
    """+1 if the number after the response's last "####" equals the one after the reference's "####".

    Only the response's last 300 characters are read. ``pred`` is the response's number as written.
    """
    pred = last_final_number(response[-GSM8K_RESPONSE_TAIL_CHARS:])
    if pred is None:
        return wrong(f"no '#### <number>' in the last {GSM8K_RESPONSE_TAIL_CHARS} characters")
    # The reference is a worked solution ending in "#### n"; it is trusted data, so all of it is read.
    expected = last_final_number(reference)
    if expected is None:
        return wrong("the reference has no '#### <number>'", pred=pred)
    # Without the commas, what the pattern matched is always a valid decimal literal.
    return verdict(Decimal(pred.replace(",", "")) == Decimal(expected.replace(",", "")), pred)
