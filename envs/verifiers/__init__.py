"""Verifiers: turn a model's response and a reference answer into a reward, looked up by name.

A verifier is any callable ``fn(response: str, reference: str)`` that returns a :class:`VerifierResult`
(or a bool, a number, or a verl-style ``{"score", "acc", "pred"}`` dict, which are converted).
:func:`register_verifier` adds one under a name; :func:`get_verifier` returns the registered
:class:`Verifier`, which is itself callable with the same signature and also scores whole batches
(:meth:`Verifier.score`). Names are unique: registering a taken name raises ``ValueError``.

Built-in verifiers, each in the module of its name, ``dapo_envs.verifiers.<name>``, whose docstring
cites the paper or reference implementation it follows (every one scores +1.0 when correct and -1.0
otherwise, DAPO's reward):

===============  ========================================================================================
``dapo``         The DAPO paper's rule, as in the authors' verl recipe: the last ``Answer:`` in the
                 response's last 300 characters, Minerva normalisation, exact string match.
``boxed``        The last ``\\boxed{...}`` against the reference, both normalised with the Hendrycks MATH
                 ``strip_string`` rules.
``gsm8k``        The number after the last ``####`` in the response's last 300 characters against the
                 reference's, as exact decimals.
``last_number``  The last number anywhere in the response against the reference number, by value, for
                 models that answer in prose.
``math_verify``  Equivalence through the ``math-verify`` library (LaTeX, fractions, intervals, sets,
                 tuples), for MATH-500-style answers.
===============  ========================================================================================

Safety and time bounds: no verifier executes or evaluates model output. ``dapo``, ``boxed``, ``gsm8k``
and ``last_number`` are string rules whose running time is linear in the input (no regular expression
that can backtrack catastrophically sees unbounded text), so they run in-process and return well within
a second even on a megabyte of input. Anything else, ``math_verify`` and user verifiers by default,
runs in the pool of worker processes of :mod:`dapo_envs.verifier_pool`; an item that exceeds the
verifier's ``timeout`` (1 s by default) has its worker killed and replaced and is scored wrong with
``reason`` saying so.

Dependencies go one way: this registry uses the rules and the pool; the rules and the pool use only
:mod:`dapo_envs.verifiers.result` (the verdict type and its conversions, re-exported here).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from dapo_envs.verifier_pool import get_pool
from dapo_envs.verifiers.boxed import boxed_rule
from dapo_envs.verifiers.dapo import dapo_rule, normalize_final_answer
from dapo_envs.verifiers.gsm8k import gsm8k_rule
from dapo_envs.verifiers.last_number import last_number_rule
from dapo_envs.verifiers.math_verify import math_verify_rule, math_verify_warmup
from dapo_envs.verifiers.result import VerifierResult, as_text, coerce_result, run_verifier_fn

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "UnknownVerifierError",
    "Verifier",
    "VerifierResult",
    "as_text",
    "boxed_rule",
    "coerce_result",
    "dapo_rule",
    "get_verifier",
    "gsm8k_rule",
    "last_number_rule",
    "list_verifiers",
    "math_verify_rule",
    "normalize_final_answer",
    "register_verifier",
    "resolve_verifier",
    "run_verifier_fn",
]

#: Per-item time limit, in seconds, of verifiers that run in worker processes.
DEFAULT_TIMEOUT_S = 1.0

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
        token: Identifies ``fn`` in the worker processes' caches; unique per Verifier object.
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
    verifier = Verifier(name=name, fn=fn, isolate=isolate, timeout=timeout, answer_format=answer_format, warmup=warmup)
    with _REGISTRY_LOCK:
        if name in _REGISTRY:
            raise ValueError(f"a verifier named '{name}' is already registered; choose another name")
        _REGISTRY[name] = verifier
    return verifier


class UnknownVerifierError(KeyError, ValueError):
    """No verifier is registered under the name: a KeyError (a failed look-up, as documented) and a
    ValueError (bad input, which callers such as ``dapo-rl`` report in one line)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError's own would quote the message


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
        raise UnknownVerifierError(f"no verifier named {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


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


# The built-in rules. The string rules are linear-time by construction, so they skip the worker pool.
register_verifier("dapo", dapo_rule, isolate=False, answer_format="Answer: {answer}")
register_verifier("boxed", boxed_rule, isolate=False, answer_format="\\boxed{{answer}}")
# A GSM8K reference is the worked solution ending in "#### n": it is itself a correct response.
register_verifier("gsm8k", gsm8k_rule, isolate=False, answer_format="{answer}")
register_verifier("last_number", last_number_rule, isolate=False, answer_format="{answer}")
register_verifier(
    "math_verify", math_verify_rule, isolate=True, answer_format="\\boxed{{answer}}", warmup=math_verify_warmup
)
