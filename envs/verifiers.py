"""Verifiers: turn a model's response and a reference answer into a reward, looked up by name.

A verifier is any callable ``fn(response: str, reference: str)`` that returns a :class:`VerifierResult`
(or a bool, a number, or a verl-style ``{"score", "acc", "pred"}`` dict, which are converted).
:func:`register_verifier` adds one under a name; :func:`get_verifier` returns the registered
:class:`Verifier`, which is itself callable with the same signature and also scores whole batches
(:meth:`Verifier.score`). Names are unique: registering a taken name raises ``ValueError``.

Built-in verifiers (every one scores +1.0 when correct and -1.0 otherwise, DAPO's reward):

========================  ========================================================================
``dapo``                  The DAPO paper's rule, as in the authors' verl recipe
                          (``verl/utils/reward_score/math_dapo.py``): the last 300 characters of
                          the response, the last ``Answer\\s*:\\s*(...)`` match, Minerva
                          normalisation of both sides, exact string match.
``boxed``                 The last ``\\boxed{...}`` (or ``\\fbox{...}``) of the response against the
                          reference, both normalised with the Hendrycks MATH ``strip_string`` rules.
``gsm8k``                 The number after the last ``####`` in the last 300 characters of the
                          response against the number after ``####`` in the reference, compared as
                          exact decimals.
``math_verify``           Equivalence through the ``math-verify`` library (LaTeX, fractions,
                          intervals, sets, tuples), for MATH-500-style answers. Runs in worker
                          processes with a hard per-item time limit.
========================  ========================================================================

Safety and time bounds: no verifier executes or evaluates model output. ``dapo``, ``boxed`` and
``gsm8k`` are string rules whose running time is linear in the input (no regular expression that can
backtrack catastrophically sees unbounded text), so they run in-process and return in milliseconds even
on megabytes of input. Anything else, ``math_verify`` and user verifiers by default, runs in a pool of
worker processes (:mod:`dapo_envs.scoring`); an item that exceeds the verifier's ``timeout`` (1 s by
default) has its worker killed and replaced and is scored wrong with ``reason`` saying so.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "VerifierResult",
    "Verifier",
    "register_verifier",
    "get_verifier",
    "list_verifiers",
    "dapo_rule",
    "boxed_rule",
    "gsm8k_rule",
    "math_verify_rule",
    "normalize_final_answer",
    "DEFAULT_TIMEOUT_S",
]

#: Per-item time limit, in seconds, of verifiers that run in worker processes.
DEFAULT_TIMEOUT_S = 1.0

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
    """

    score: float
    acc: bool
    pred: str
    reason: str = ""


def _wrong(reason: str = "", pred: str = "") -> VerifierResult:
    return VerifierResult(score=WRONG_SCORE, acc=False, pred=pred, reason=reason)


def _verdict(correct: bool, pred: str) -> VerifierResult:
    return VerifierResult(score=CORRECT_SCORE if correct else WRONG_SCORE, acc=bool(correct), pred=pred)


def coerce_result(raw: Any, verifier_name: str) -> VerifierResult:
    """Convert what a verifier function returned into a :class:`VerifierResult`.

    Accepted: a VerifierResult; a bool (True -> +1, False -> -1); a real number (the score, correct when
    > 0); a mapping with ``score`` and optionally ``acc`` (default ``score > 0``) and ``pred``, as verl's
    ``compute_score`` returns. Anything else is scored wrong with a reason naming the type.
    """
    if isinstance(raw, VerifierResult):
        # Field types are not enforced by the dataclass; a user's numpy bool or int pred is normalised here.
        return VerifierResult(float(raw.score), bool(raw.acc), str(raw.pred), str(raw.reason))
    if isinstance(raw, bool):
        return _verdict(raw, "")
    if isinstance(raw, (int, float)):
        score = float(raw)
        return VerifierResult(score=score, acc=score > 0, pred="")
    if isinstance(raw, Mapping) and "score" in raw:
        score = float(raw["score"])
        acc = bool(raw["acc"]) if "acc" in raw else score > 0
        pred = raw.get("pred", "")
        return VerifierResult(score=score, acc=acc, pred="" if pred is None else str(pred))
    return _wrong(f"verifier '{verifier_name}' returned {type(raw).__name__}, not a VerifierResult")


def as_text(value: Any, what: str) -> str:
    """Return ``value`` as ``str``; bytes are decoded as UTF-8 with invalid sequences replaced."""
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
        return _wrong(f"verifier '{name}' raised {type(error).__name__}: {str(error)[:200]}")


# Identifies a Verifier's function in worker processes (which cache functions they were sent).
_TOKENS = itertools.count()


@dataclasses.dataclass(frozen=True)
class Verifier:
    """A named verifier: callable as ``verifier(response, reference) -> VerifierResult``.

    Attributes:
        name: The registry name.
        fn: The scoring function ``fn(response, reference)``.
        isolate: Run ``fn`` in worker processes with a hard time limit (``timeout``). Off only for rules
            whose running time is bounded by construction.
        timeout: Per-item time limit in seconds when ``isolate``; an item over it is scored wrong.
        answer_format: How a correct final answer is written for this verifier; ``{answer}`` is replaced
            by the reference (see :meth:`format_answer`).
        warmup: Called once in each worker process before its first item (imports, caches), so that the
            time limit never pays for start-up.
    """

    name: str
    fn: Callable[[str, str], Any]
    isolate: bool = True
    timeout: float = DEFAULT_TIMEOUT_S
    answer_format: str = "{answer}"
    warmup: Callable[[], None] | None = None
    token: int = dataclasses.field(default_factory=lambda: next(_TOKENS), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"verifier '{self.name}': fn must be callable, got {type(self.fn).__name__}")
        if not self.timeout > 0:
            raise ValueError(f"verifier '{self.name}': timeout must be > 0 seconds, got {self.timeout!r}")
        if "{answer}" not in self.answer_format:
            raise ValueError(f"verifier '{self.name}': answer_format must contain '{{answer}}'")

    def __call__(self, response: str, reference: str) -> VerifierResult:
        return self.score([response], [reference])[0]

    def score(
        self, responses: Sequence[str], references: Sequence[str], *, timeout: float | None = None
    ) -> list[VerifierResult]:
        """Score many responses at once; ``references[i]`` is the reference of ``responses[i]``.

        Isolated verifiers spread the items over the worker pool, each item under ``timeout`` seconds
        (default: this verifier's). The result list is in input order.
        """
        if isinstance(responses, (str, bytes)) or isinstance(references, (str, bytes)):
            raise TypeError("score() takes lists of responses and references; for one item call the verifier")
        if len(responses) != len(references):
            raise ValueError(f"score() got {len(responses)} responses but {len(references)} references")
        responses = [as_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
        references = [as_text(r, f"references[{i}]") for i, r in enumerate(references)]
        if not self.isolate:
            return [run_verifier_fn(self.fn, self.name, r, g) for r, g in zip(responses, references)]
        from dapo_envs.scoring import get_pool

        return get_pool().map(self, list(zip(responses, references)), timeout or self.timeout)

    def format_answer(self, answer: str) -> str:
        """The shortest response this verifier accepts for ``answer`` (e.g. ``"Answer: 19"``)."""
        return self.answer_format.replace("{answer}", answer)

    def with_timeout(self, timeout: float) -> Verifier:
        """A copy with another per-item time limit (same name, not registered)."""
        return dataclasses.replace(self, timeout=timeout, token=next(_TOKENS))


_REGISTRY: dict[str, Verifier] = {}
_REGISTRY_LOCK = threading.Lock()


def register_verifier(
    name: str,
    fn: Callable[[str, str], Any],
    *,
    isolate: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    answer_format: str = "{answer}",
    warmup: Callable[[], None] | None = None,
) -> Verifier:
    """Register ``fn(response, reference)`` under ``name`` and return the :class:`Verifier`.

    By default the function runs in worker processes with a hard ``timeout`` per item, so a slow or
    hanging check costs one wrong verdict, never the training run. The function is sent to the workers
    with cloudpickle, so lambdas and functions defined in ``__main__`` work. Pass ``isolate=False`` for a
    function that is cheap and bounded by construction (it then runs in the calling process, without a
    time limit) or that cannot be pickled.

    Raises:
        ValueError: ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"verifier name must be a non-empty string, got {name!r}")
    verifier = Verifier(
        name=name, fn=fn, isolate=isolate, timeout=timeout, answer_format=answer_format, warmup=warmup
    )
    with _REGISTRY_LOCK:
        if name in _REGISTRY:
            raise ValueError(f"a verifier named '{name}' is already registered; choose another name")
        _REGISTRY[name] = verifier
    return verifier


def get_verifier(name: str) -> Verifier:
    """The verifier registered under ``name``.

    Raises:
        KeyError: no verifier has that name (the message lists the registered ones).
    """
    if isinstance(name, Verifier):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise KeyError(f"no verifier named {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def list_verifiers() -> list[str]:
    """Names of the registered verifiers, sorted."""
    return sorted(_REGISTRY)


def resolve_verifier(verifier: str | Verifier | Callable[[str, str], Any]) -> Verifier:
    """A registered name, a Verifier, or a bare function (wrapped as an unregistered, isolated verifier)."""
    if isinstance(verifier, Verifier):
        return verifier
    if isinstance(verifier, str):
        return get_verifier(verifier)
    if callable(verifier):
        return Verifier(name=getattr(verifier, "__name__", "custom"), fn=verifier)
    raise TypeError(f"verifier must be a registered name, a Verifier or a function, got {type(verifier).__name__}")


# ---------------------------------------------------------------------------------------------------
# dapo: the DAPO paper's rule (Minerva normalisation, "Answer:" extraction), as in the authors' recipe.
# ---------------------------------------------------------------------------------------------------

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
        return _wrong(f"no 'Answer:' in the last {DAPO_RESPONSE_TAIL_CHARS} characters")
    pred = normalize_final_answer(matches[-1])
    return _verdict(pred == _normalize_reference(reference), pred)


# ---------------------------------------------------------------------------------------------------
# boxed: the last \boxed{} answer, Hendrycks MATH normalisation.
# ---------------------------------------------------------------------------------------------------

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

    A reference that itself contains ``\\boxed{}`` is compared by its last boxed content.
    """
    boxed = last_boxed_content(response)
    if boxed is None:
        return _wrong("no \\boxed{} answer in the response")
    reference_boxed = last_boxed_content(reference)
    reference_answer = reference if reference_boxed is None else reference_boxed
    return _verdict(strip_string(boxed) == strip_string(reference_answer), boxed)


# ---------------------------------------------------------------------------------------------------
# gsm8k: "#### <number>", compared numerically.
# ---------------------------------------------------------------------------------------------------

GSM8K_RESPONSE_TAIL_CHARS = 300
# A number after "####": optional "$", sign, digits with thousands separators, optional decimals.
# Every quantifier is over a disjoint character class, so matching is linear.
_GSM8K_FINAL = re.compile(r"####\s*(?:\$\s*)?(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def _gsm8k_number(text: str) -> Decimal | None:
    matches = _GSM8K_FINAL.findall(text)
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return None


def gsm8k_rule(response: str, reference: str) -> VerifierResult:
    """+1 if the number after the response's last "####" equals the one after the reference's "####".

    Only the response's last 300 characters are read (as verl's gsm8k scorer does). Numbers compare as
    exact decimals, so "18", "18.00" and "$18" agree; thousands separators are ignored.
    """
    tail = response[-GSM8K_RESPONSE_TAIL_CHARS:]
    matches = _GSM8K_FINAL.findall(tail)
    if not matches:
        return _wrong(f"no '#### <number>' in the last {GSM8K_RESPONSE_TAIL_CHARS} characters")
    pred = matches[-1]
    # The reference is a worked solution ending in "#### n"; it is trusted data, so all of it is read.
    expected = _gsm8k_number(reference)
    if expected is None:
        return _wrong("the reference has no '#### <number>'", pred=pred)
    try:
        value = Decimal(pred.replace(",", ""))
    except InvalidOperation:
        return _wrong("unreadable number", pred=pred)
    return _verdict(value == expected, pred)


# ---------------------------------------------------------------------------------------------------
# math_verify: symbolic equivalence through the math-verify library (runs in worker processes).
# ---------------------------------------------------------------------------------------------------


def _math_verify_configs():
    from math_verify import LatexExtractionConfig

    # The prediction side as open-r1's accuracy reward reads it: boxed answers first, LaTeX only with an
    # anchor ("the answer is ..."), so that a number in the middle of the reasoning is not taken as the
    # answer. The library's default normalisation (units, \frac43, ...) matches the reference side's.
    return [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]


def _math_verify_warmup() -> None:
    import logging

    # The library logs a warning when its signal-based timeout is off; the worker pool is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify_rule("\\boxed{\\frac{1}{2}}", "0.5")


def math_verify_rule(response: str, reference: str) -> VerifierResult:
    """+1 if math-verify finds the response's final answer equivalent to the reference.

    The reference is parsed as LaTeX (wrapped in ``\\boxed{}`` unless it has one); the response's
    answer is its last ``\\boxed{}`` or anchored LaTeX expression. The library's own signal-based timeouts
    are off because they cannot interrupt C code (``9^{9^{9^9}}`` hangs them); call this through the
    registered ``math_verify`` verifier, which runs it in a worker process with a hard time limit.
    """
    from math_verify import parse, verify

    gold_text = reference if "\\boxed" in reference else "\\boxed{" + reference + "}"
    gold = parse(gold_text, parsing_timeout=None)
    if not gold:
        return _wrong("math-verify could not parse the reference")
    prediction = parse(response, extraction_config=_math_verify_configs(), parsing_timeout=None)
    if not prediction:
        return _wrong("no answer math-verify could extract")
    pred = str(prediction[-1])
    return _verdict(verify(gold, prediction, timeout_seconds=None), pred)


# ---------------------------------------------------------------------------------------------------
# The built-in registry entries.
# ---------------------------------------------------------------------------------------------------

register_verifier("dapo", dapo_rule, isolate=False, answer_format="Answer: {answer}")
register_verifier("boxed", boxed_rule, isolate=False, answer_format="\\boxed{{answer}}")
# A GSM8K reference is the worked solution ending in "#### n": it is itself a correct response.
register_verifier("gsm8k", gsm8k_rule, isolate=False, answer_format="{answer}")
register_verifier(
    "math_verify", math_verify_rule, isolate=True, answer_format="\\boxed{{answer}}", warmup=_math_verify_warmup
)
