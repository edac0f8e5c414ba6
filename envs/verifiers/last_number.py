"""The ``last_number`` verifier: the last number in the response, compared numerically with the reference.

For small instruct models that answer in prose ("... so she has 1,250 apples.") and do not follow the
``Answer:`` or ``####`` formats. It is the "flexible" extraction of the common GSM8K scorers, verl's
``extract_solution(method="flexible")`` (``verl/utils/reward_score/gsm8k.py``) and lm-evaluation-harness's
``flexible-extract`` filter (``lm_eval/tasks/gsm8k/gsm8k.yaml``): the answer is the last number in the
text. Those compare strings and take any run of digits, dots and commas; here a number has a strict
grammar and numbers compare by value:

- an optional sign, then digits, either plain (``1250``) or in comma-separated groups of three
  (``1,250``), then optionally a decimal point and digits (``3.75``);
- a ``-`` or ``+`` right after a letter or digit is an operator or a dash, not a sign: ``3-5`` holds
  ``3`` and ``5``, ``x = -5`` holds ``-5``;
- a number does not start right after another number or a ``.``: ``1.2.3`` holds only ``1.2``, and
  ``.5`` holds none (write ``0.5``);
- a sentence's final period is not a decimal point: ``42.`` is ``42``.

The reference is one such number (surrounding white space allowed), or a GSM8K-style worked solution
whose answer follows its last ``####`` (``... = 18\n#### 18``), so that ``dapo/GSM8K-v0`` can be scored
with this rule too. ``3.0`` equals ``3``, ``1,000`` equals ``1000``, ``-0`` equals ``0``. Linear time,
in-process.
"""

from __future__ import annotations

import re
from decimal import Decimal

from dapo_envs.verifiers.gsm8k import last_final_number
from dapo_envs.verifiers.result import VerifierResult, verdict, wrong

__all__ = ["last_number_rule"]

# A sign counts only where it cannot be a minus or a dash: not right after a letter or digit ("3-5",
# "x-5"). Digits do not start right after another digit or a "." (the "3" of "1.2.3"). The comma groups
# come first so that "1,250" is one number, not "1" and "250"; the lookahead keeps "1,2345" from reading
# as "1,234". Each branch backtracks a bounded distance, so matching is linear in the text.
_NUMBER = re.compile(
    r"(?:(?<![0-9A-Za-z.])[-+]|(?<![0-9.]))"  # the start: a sign, or digits with nothing numeric before
    r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)"  # the integer part: comma groups of three, or plain digits
    r"(?:\.[0-9]+)?(?![0-9])"  # the decimals; a "." not followed by a digit ends a sentence
)


def _value(number: str) -> Decimal:
    # Without its thousands separators, a number the pattern matched is always a valid decimal literal.
    return Decimal(number.replace(",", ""))


def last_number_rule(response: str, reference: str) -> VerifierResult:
    """+1 if the last number in the response equals the reference number; ``pred`` is it as written."""
    expected = _NUMBER.fullmatch(reference.strip())
    if expected is None:
        final = last_final_number(reference)  # a GSM8K solution: the number after its last "####"
        expected = _NUMBER.fullmatch(final.strip()) if final is not None else None
    if expected is None:
        return wrong("the reference is not a number")
    numbers = _NUMBER.findall(response)
    if not numbers:
        return wrong("no number in the response")
    pred = numbers[-1]
    return verdict(_value(pred) == _value(expected.group()), pred)
