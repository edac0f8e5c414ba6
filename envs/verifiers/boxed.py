"""The ``boxed`` verifier: the last ``\\boxed{}`` of the response, Hendrycks MATH normalisation.

The rule of the MATH benchmark (Hendrycks et al., 2021, "Measuring Mathematical Problem Solving With the
MATH Dataset", arXiv 2103.03874), as its reference code does it: the answer is the content of the last
``\\boxed{...}`` or ``\\fbox{...}`` (``last_boxed_only_string`` in ``modeling/dataset/util.py`` of
github.com/hendrycks/math), and two answers are equal when they are equal strings after
``_strip_string`` (``modeling/math_equivalence.py``: units, ``\\left``/``\\right``, ``\\dfrac``,
shorthand fractions and roots, ``a/b``, ``0.5``). Everything runs in linear time, in-process.
"""

from __future__ import annotations

import re

from dapo_envs.verifiers.result import VerifierResult, verdict, wrong

__all__ = ["boxed_rule", "last_boxed_content", "strip_string"]

_BRACE = re.compile(r"[{}]")
_BOX_OPENERS = ("\\boxed{", "\\fbox{", "\\boxed ")


def last_boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced) or ``\\boxed x``.

    Returns None when there is none, or when the last one is never closed.
    """
    start, opener = max(((text.rfind(o), o) for o in _BOX_OPENERS), key=lambda pair: pair[0])
    if start < 0:
        return None
    inner = start + len(opener)
    if opener == "\\boxed ":
        # "\boxed 5$" style: up to the next "$" (or the end).
        return text[inner:].split("$", 1)[0].strip()
    depth = 1
    for match in _BRACE.finditer(text, inner):
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return text[inner : match.start()]
    return None


def _fix_fracs(text: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2} (Hendrycks ``_fix_fracs``, never raising)."""
    parts = text.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        out.append("\\frac")
        if not part or part[0] == "{":
            out.append(part)
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_sqrt(text: str) -> str:
    """\\sqrt3 -> \\sqrt{3} (Hendrycks ``_fix_sqrt``)."""
    if "\\sqrt" not in text:
        return text
    parts = text.split("\\sqrt")
    out = [parts[0]]
    for part in parts[1:]:
        if part and part[0] != "{":
            out.append("\\sqrt{" + part[0] + "}" + part[1:])
        else:
            out.append("\\sqrt" + part)
    return "".join(out)


_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")


def _fix_a_slash_b(text: str) -> str:
    """3/4 -> \\frac{3}{4} when both sides are plain integers."""
    parts = text.split("/")
    if len(parts) == 2 and all(_CANONICAL_INT.fullmatch(p) and p != "-0" for p in parts):
        return "\\frac{" + parts[0] + "}{" + parts[1] + "}"
    return text


def strip_string(text: str) -> str:
    """Hendrycks MATH answer normalisation (``strip_string`` of the MATH repository), linear time."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "")
    if "\\text{ " in text:  # units written as "5 \text{ cm}"
        text = text.split("\\text{ ")[0]
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        text = sides[1]
    text = _fix_sqrt(text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def boxed_rule(response: str, reference: str) -> VerifierResult:
    """+1 if the last ``\\boxed{}`` of the response equals the reference after Hendrycks normalisation.

    A reference that itself contains ``\\boxed{}`` is compared by its last boxed content. ``pred`` is the
    boxed content as written (before normalisation).
    """
    boxed = last_boxed_content(response)
    if boxed is None:
        return wrong("no \\boxed{} answer in the response")
    reference_boxed = last_boxed_content(reference)
    reference_answer = reference if reference_boxed is None else reference_boxed
    return verdict(strip_string(boxed) == strip_string(reference_answer), boxed)
