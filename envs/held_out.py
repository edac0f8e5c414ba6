"""Held-out problems: how each environment declares the problems it is evaluated on.

Every registered environment either declares a held-out source or has none:

- ``dapo/Arithmetic-v0`` and ``dapo/Calculator-v0``: ``split="test"``, disjoint from ``split="train"``
  by a hash of the problem's text (class attribute ``held_out_env_config``).
- Data-set environments (``dapo/Math-v0``, ``dapo/MathRetry-v0``, ``register_reasoning_env(dataset=...)``):
  ``split="test"`` is the ``test_dataset`` when one is given (the ``train`` split then leaves out any
  problem also in it), else a share ``held_out_share`` (default :data:`DEFAULT_HELD_OUT_SHARE`) of the
  data set carved out by :func:`in_held_out_share`; ``split="train"`` is the rest. The benchmarks
  (``dapo/AIME24-v0``, ...) are registered with ``held_out_share=0``: they are evaluation sets, with no
  held-out part of their own.
- Any other class: its ``held_out_env_config`` (or its :meth:`~dapo_envs.ReasoningEnv.held_out_overrides`);
  a factory function, or a class that declares nothing, has no held-out source.

:func:`held_out_overrides` says which, for an id and its ``env_config``. No Ray needed.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from typing import Any

import gymnasium
from gymnasium.envs.registration import load_env_creator

from dapo_envs.base import ReasoningEnv, is_number

__all__ = [
    "DEFAULT_HELD_OUT_SHARE",
    "check_share",
    "held_out_fraction",
    "held_out_overrides",
    "in_held_out_share",
    "missing_held_out",
    "normalized_problem",
    "resolved_share",
]

#: The share of a data set carved out as its held-out problems when no ``test_dataset`` is given.
DEFAULT_HELD_OUT_SHARE = 0.1


def normalized_problem(text: str) -> str:
    """A problem's text as its held-out hash reads it: case-folded, runs of white space made one space."""
    return " ".join(text.casefold().split())


def held_out_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the problem's normalized text: the first 8 bytes of its SHA-256.

    The same in every process, run and seed (Python's ``hash`` of a string is not); the same for
    copies of a problem that differ only in case or spacing.
    """
    digest = hashlib.sha256(normalized_problem(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_held_out_share(text: str, share: float) -> bool:
    """Whether a problem belongs to the held-out share ``share`` of its data set (its hash falls below it)."""
    return held_out_fraction(text) < share


def resolved_share(held_out_share: float | None, test_dataset: Any) -> float:
    """``held_out_share`` as a data-set environment applies it: None means :data:`DEFAULT_HELD_OUT_SHARE`
    without a ``test_dataset``, 0 with one (the test file is then the held-out source)."""
    if held_out_share is None:
        return 0.0 if test_dataset is not None else DEFAULT_HELD_OUT_SHARE
    return float(held_out_share)


def check_share(held_out_share: float | None, test_dataset: Any) -> None:
    """A data-set environment's ``held_out_share`` is None or a number in [0, 1), and not given with a
    ``test_dataset`` (which would make two held-out sources)."""
    if held_out_share is None:
        return
    if not (is_number(held_out_share) and 0 <= held_out_share < 1):
        raise ValueError(f"held_out_share must be a number in [0, 1) or null (the default), got {held_out_share!r}")
    if test_dataset is not None and held_out_share > 0:
        raise ValueError(
            "give test_dataset or held_out_share, not both: with a test_dataset, the held-out problems are its own"
        )


def _env_class(env_id: str) -> Any:
    if env_id not in gymnasium.registry:
        raise ValueError(f"no environment is registered under the id {env_id!r}")
    entry_point = gymnasium.registry[env_id].entry_point
    return load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point


def _effective_config(env_id: str, env_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments ``gymnasium.make(env_id, **env_config)`` passes: the registered ones, then ``env_config``."""
    return {**(gymnasium.registry[env_id].kwargs or {}), **(env_config or {})}


def held_out_overrides(env_id: str, env_config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``env_config`` overrides that select ``env_id``'s held-out problems, or None when it has none.

    None when the environment's class declares no held-out source (a factory function, a class without
    ``held_out_env_config``, a data set with ``held_out_share=0`` and no ``test_dataset``), and when
    ``env_config`` already selects the held-out problems (training on ``split="test"``): in both cases,
    evaluating "held-out" would evaluate on the problems trained on.

    Raises:
        ValueError: no environment is registered under ``env_id``.
    """
    creator = _env_class(env_id)
    if not (isinstance(creator, type) and issubclass(creator, ReasoningEnv)):
        return None
    config = _effective_config(env_id, env_config)
    overrides = creator.held_out_overrides(config)
    if not overrides or all(key in config and config[key] == value for key, value in overrides.items()):
        return None
    return dict(overrides)


def missing_held_out(env_id: str, env_config: Mapping[str, Any] | None = None) -> str:
    """Why ``env_id`` (with ``env_config``) has no held-out problems and how it could declare some, for
    a message; "" when it has them."""
    if held_out_overrides(env_id, env_config) is not None:
        return ""
    creator = _env_class(env_id)
    config = _effective_config(env_id, env_config)
    if isinstance(creator, type) and issubclass(creator, ReasoningEnv):
        overrides = creator.held_out_overrides(config)
        if overrides:  # it has a split, but the training config already selects it
            chosen = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
            return f"its env_config already selects its held-out problems ({chosen}), so it would train on them"
        if "held_out_share" in _parameters(creator):
            return (
                "its data set has no held-out part (held_out_share is 0 and it has no test_dataset); give it one "
                "with env_config.test_dataset=FILE or env_config.held_out_share=0.1"
            )
        return f"its class {creator.__name__} declares no held_out_env_config"
    name = getattr(creator, "__qualname__", None) or repr(creator)
    return f"its entry point {name} is not a dapo_envs.ReasoningEnv class, so it declares no held-out split"


def _parameters(creator: type) -> set[str]:
    try:
        return set(inspect.signature(creator).parameters)
    except (TypeError, ValueError):
        return set()
