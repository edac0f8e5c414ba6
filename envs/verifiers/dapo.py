"""The ``dapo`` verifier: the DAPO paper's reward rule, "Answer:" extraction and Minerva normalisation.

DAPO (Yu et al., 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv
2503.14476) rewards +1 / -1 by a rule, as the authors' verl recipe implements it in
``verl/utils/reward_score/math_dapo.py`` (``compute_score``): read the last 300 characters of the
response, take the last ``Answer\\s*:\\s*(...)`` match, normalise it and the reference with
``normalize_final_answer`` and compare the strings exactly. That normaliser is Minerva's (Lewkowycz et
al., 2022, "Solving Quantitative Reasoning Problems with Language Models", arXiv 2206.14858), as
lm-evaluation-harness writes it in ``lm_eval/tasks/minerva_math/utils.py``.

The recipe's four backtracking regular expressions are replaced here by linear-time rewrites with the
same results, so the rule runs in-process, in milliseconds, on any input.
"""

from __future__ import annotations

import functools
import re

from dapo_envs.verifiers.result import VerifierResult, verdict, wrong

__all__ = ["DAPO_RESPONSE_TAIL_CHARS", "dapo_rule", "normalize_final_answer"]

#: How much of the response the rule reads (the recipe's comment: the longest MATH-500 answer is shorter).
DAPO_RESPONSE_TAIL_CHARS = 300

# The recipe's answer pattern. It only ever sees DAPO_RESPONSE_TAIL_CHARS characters, so even its
# quadratic worst case is tiny. Note that \s* after the colon may cross a newline, as in the recipe.
_DAPO_ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# The Minerva / lm-eval-harness substitutions, applied in this order with str.replace.
_DAPO_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# ... then these are deleted, in this order.
_DAPO_REMOVED_EXPRESSIONS = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)

# Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}. Fixed-width after a literal: linear time.
_SHORT_FRAC = re.compile(r"(frac)([^{])(.)")
_SHORT_SQRT = re.compile(r"(sqrt)([^{])")


def _keep_first_dollar_pair_per_line(text: str) -> str:
    """``re.sub(r"(.*?)(\\$)(.*?)(\\$)(.*)", "$\\3$", text)`` in linear time.

    That regex rewrites every line (``.`` stops at newlines) holding at least two ``$`` into ``$`` + the
    text between its first two ``$`` + ``$``, and leaves other lines alone; but it backtracks
    quadratically on long lines, so the rule is applied line by line here.
    """
    if "$" not in text:
        return text
    lines = text.split("\n")
    for index, line in enumerate(lines):
        first = line.find("$")
        if first >= 0:
            second = line.find("$", first + 1)
            if second >= 0:
                lines[index] = "$" + line[first + 1 : second] + "$"
    return "\n".join(lines)


def _unwrap_to_first_brace(text: str, opener: str) -> str:
    """``re.sub(re.escape(opener) + r"(.*?)\\}", r"\\1", text)`` in linear time, ``opener`` ending in "{".

    Each ``opener`` is replaced, together with the first "}" after it on the same line, by the text in
    between; an opener with no "}" later on its line is left as it is (and so is the rest of that line,
    since no later opener on it can find a "}" either).
    """
    if opener not in text:
        return text
    pieces: list[str] = []
    emitted = search_from = 0
    next_close = next_newline = -2  # cached positions of the next "}" / "\n"; only ever move forward
    while True:
        start = text.find(opener, search_from)
        if start < 0:
            break
        inner = start + len(opener)
        if next_close != -1 and next_close < inner:
            next_close = text.find("}", inner)
        if next_newline != -1 and next_newline < inner:
            next_newline = text.find("\n", inner)
        if next_close >= 0 and (next_newline < 0 or next_close < next_newline):
            pieces.append(text[emitted:start])
            pieces.append(text[inner:next_close])
            emitted = search_from = next_close + 1
        elif next_newline >= 0:
            search_from = next_newline + 1
        else:
            break
    pieces.append(text[emitted:])
    return "".join(pieces)


def _unwrap_to_last_brace_on_line(text: str, opener: str) -> str:
    """``re.sub(re.escape(opener) + r"(.*)\\}", r"\\1", text)`` (greedy) in linear time.

    Each line's first ``opener`` that has a "}" after it on the line is replaced, together with the
    line's last "}", by the text in between; nothing else on that line can match afterwards.
    """
    if opener not in text:
        return text
    pieces: list[str] = []
    emitted = search_from = 0
    while True:
        start = text.find(opener, search_from)
        if start < 0:
            break
        inner = start + len(opener)
        line_end = text.find("\n", inner)
        if line_end < 0:
            line_end = len(text)
        close = text.rfind("}", inner, line_end)
        if close >= 0:
            pieces.append(text[emitted:start])
            pieces.append(text[inner:close])
            emitted = close + 1
        search_from = line_end + 1
        if search_from > len(text):
            break
    pieces.append(text[emitted:])
    return "".join(pieces)


def normalize_final_answer(final_answer: str) -> str:
    """Normalise an answer the way the DAPO recipe does (Minerva's ``normalize_final_answer``).

    Steps, in the recipe's order: keep the text after the last "="; the substitutions (drop "an "/"a ",
    spaces, "\\$", ...); delete unit words and TeX noise (degrees, \\text{}, \\dots, ...); keep what
    is inside the first $...$ pair of a line; unwrap \\text{}, \\textbf{}, \\overline{}, \\boxed{};
    expand \\fracab and \\sqrta; drop "$"; remove thousands separators from all-digit numbers; strip.
    """
    final_answer = final_answer.split("=")[-1]
    for before, after in _DAPO_SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expression in _DAPO_REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expression, "")
    final_answer = _keep_first_dollar_pair_per_line(final_answer)
    final_answer = _unwrap_to_first_brace(final_answer, "\\text{")
    final_answer = _unwrap_to_first_brace(final_answer, "\\textbf{")
    final_answer = _unwrap_to_first_brace(final_answer, "\\overline{")
    final_answer = _unwrap_to_last_brace_on_line(final_answer, "\\boxed{")
    final_answer = _SHORT_FRAC.sub("frac{\\2}{\\3}", final_answer)
    final_answer = _SHORT_SQRT.sub("sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if final_answer.replace(",", "").isdigit():
        final_answer = final_answer.replace(",", "")
    return final_answer.strip()


# References repeat (G responses per prompt, and across epochs); normalising each once is enough.
_normalize_short_reference = functools.lru_cache(maxsize=1 << 16)(normalize_final_answer)


def _normalize_reference(reference: str) -> str:
    # Only short references are cached, so a pathological long one cannot pin megabytes in the cache.
    if len(reference) <= 1024:
        return _normalize_short_reference(reference)
    return normalize_final_answer(reference)


def dapo_rule(response: str, reference: str) -> VerifierResult:
    """The DAPO reward rule: +1 if the last "Answer:" of the response's tail matches the reference.

    Only the last 300 characters of the response are read. ``pred`` is the normalised answer. A response
    with no "Answer:" match is wrong (the recipe compares the placeholder "[INVALID]" instead, which only
    differs for a reference that normalises to "[INVALID]").
    """
    matches = _DAPO_ANSWER_PATTERN.findall(response[-DAPO_RESPONSE_TAIL_CHARS:])
    if not matches:
        return wrong(f"no 'Answer:' in the last {DAPO_RESPONSE_TAIL_CHARS} characters")
    pred = normalize_final_answer(matches[-1])
    return verdict(pred == _normalize_reference(reference), pred)
