"""dapo_envs: reasoning tasks as Gymnasium environments whose reward comes from a verifier.

Importing the package registers these Gymnasium ids (``gymnasium.make(id)``):

=========================  =============================================================================
``dapo/Math-v0``           Problems from any data set (``dataset=``), verifier and prompt by name.
``dapo/DAPOMath17k-v0``    DAPO-Math-17k (17,917 training problems), DAPO prompt, ``dapo`` verifier.
``dapo/AIME24-v0``         AIME 2024 (30), DAPO prompt, ``dapo`` verifier.
``dapo/AIME25-v0``         AIME 2025 (30), DAPO prompt, ``dapo`` verifier.
``dapo/MATH500-v0``        MATH-500 (500), ``\\boxed{}`` prompt, ``math_verify`` verifier.
``dapo/GSM8K-v0``          GSM8K test (1,319), ``####`` prompt, ``gsm8k`` verifier.
``dapo/Arithmetic-v0``     Procedural integer arithmetic (seeded, ``split="train"|"test"``), ``dapo``.
``dapo/Calculator-v0``     Multi-turn: 3-digit multiplication with a calculator tool (``<calc>...</calc>``).
``dapo/MathRetry-v0``      Multi-turn: any ``dapo/Math-v0`` data set, with more tries after a wrong answer.
=========================  =============================================================================

Multi-turn environments (:mod:`dapo_envs.multi_turn`) answer a model turn with another observation
(a tool's result, "try again") until their verdict; the trainer generates again after each reply.

Add your own task with :func:`register_reasoning_env` (a data set, or an environment class such as a
:class:`~dapo_envs.multi_turn.ToolEnv` subclass; or ``gymnasium.register`` with entry point
``"dapo_envs.math:MathEnv"``) and your own verifier with :func:`register_verifier`. The trainer
protocol (batched prompts and scoring) is documented in :mod:`dapo_envs.base`;
:func:`held_out_env_config` gives the configuration to evaluate a registered id on, and
:func:`held_out_overrides` whether it has held-out problems at all (:mod:`dapo_envs.held_out`). No Ray needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium

# Submodules are attributes of the package (dapo_envs.datasets.load(...) works after `import dapo_envs`).
from dapo_envs import (  # noqa: F401
    arithmetic,
    base,
    calculator_env,
    datasets,
    held_out,
    math,
    math_retry,
    multi_turn,
    prompts,
    tools,
    verifier_pool,
    verifiers,
)
from dapo_envs.base import Problem, ReasoningEnv, ResponseText
from dapo_envs.held_out import held_out_overrides
from dapo_envs.multi_turn import Episode, MultiTurnReasoningEnv, ToolEnv, Turn, is_multi_turn
from dapo_envs.verifiers import (
    Verifier,
    VerifierResult,
    get_verifier,
    list_verifiers,
    register_verifier,
    resolve_verifier,
)

__all__ = [
    "ENV_IDS",
    "Episode",
    "MultiTurnReasoningEnv",
    "Problem",
    "ReasoningEnv",
    "ResponseText",
    "ToolEnv",
    "Turn",
    "Verifier",
    "VerifierResult",
    "get_verifier",
    "held_out_env_config",
    "held_out_overrides",
    "is_multi_turn",
    "list_verifiers",
    "register_reasoning_env",
    "register_verifier",
]

_MATH_ENTRY_POINT = "dapo_envs.math:MathEnv"

# A benchmark's kwargs: every problem is in its (training) split, none held out.
_ALL: dict[str, Any] = {"held_out_share": 0.0}

# id -> (entry point, kwargs). gymnasium.make(id, **overrides) may change any of the kwargs.
_BUILTIN_ENVS: dict[str, tuple[str, dict[str, Any]]] = {
    "dapo/Math-v0": (_MATH_ENTRY_POINT, {"dataset": "dapo_math_17k", "verifier": "dapo", "prompt_template": "dapo"}),
    # The paper's recipe: trained on all of DAPO-Math-17k, evaluated on AIME 2024 (its held-out problems).
    "dapo/DAPOMath17k-v0": (
        _MATH_ENTRY_POINT,
        {"dataset": "dapo_math_17k", "verifier": "dapo", "prompt_template": "dapo", "test_dataset": "aime24"},
    ),
    # The benchmarks are evaluation sets: all of their problems, none held out of them.
    "dapo/AIME24-v0": (_MATH_ENTRY_POINT, {"dataset": "aime24", "verifier": "dapo", "prompt_template": "dapo", **_ALL}),
    "dapo/AIME25-v0": (_MATH_ENTRY_POINT, {"dataset": "aime25", "verifier": "dapo", "prompt_template": "dapo", **_ALL}),
    "dapo/MATH500-v0": (
        _MATH_ENTRY_POINT,
        {"dataset": "math500", "verifier": "math_verify", "prompt_template": "boxed", **_ALL},
    ),
    "dapo/GSM8K-v0": (
        _MATH_ENTRY_POINT,
        {"dataset": "gsm8k", "verifier": "gsm8k", "prompt_template": "gsm8k", **_ALL},
    ),
    "dapo/Arithmetic-v0": ("dapo_envs.arithmetic:ArithmeticEnv", {}),
    "dapo/Calculator-v0": ("dapo_envs.calculator_env:CalculatorEnv", {}),
    "dapo/MathRetry-v0": (
        "dapo_envs.math_retry:MathRetryEnv",
        {"dataset": "dapo_math_17k", "verifier": "dapo", "prompt_template": "dapo"},
    ),
}

#: The Gymnasium ids this package registers.
ENV_IDS: tuple[str, ...] = tuple(_BUILTIN_ENVS)

for _env_id, (_entry_point, _kwargs) in _BUILTIN_ENVS.items():
    if _env_id not in gymnasium.registry:  # importing twice (e.g. a reload) must not warn or fail
        gymnasium.register(id=_env_id, entry_point=_entry_point, kwargs=dict(_kwargs))


_REGISTER_OPTIONS = (
    "max_episode_steps",
    "reward_threshold",
    "nondeterministic",
    "order_enforce",
    "disable_env_checker",
)


def register_reasoning_env(
    env_id: str,
    env_class: type[ReasoningEnv] | None = None,
    *,
    dataset: str | Any | Sequence[Mapping[str, Any]] | None = None,
    verifier: str | Verifier | Callable[[str, str], Any] | None = None,
    prompt_template: str | None = None,
    **kwargs: Any,
) -> None:
    """Register a Gymnasium id for a reasoning task, so ``gymnasium.make(env_id)`` works.

    Two forms:

    - ``register_reasoning_env(id, dataset=..., verifier=..., prompt_template=...)``: your own data
      with ``dapo/Math-v0``'s environment (one prompt, one response).
    - ``register_reasoning_env(id, MyEnv, **kwargs)``: your own environment class, a
      :class:`ReasoningEnv` subclass, one-turn or multi-turn (:class:`~dapo_envs.multi_turn.MultiTurnReasoningEnv`,
      :class:`~dapo_envs.multi_turn.ToolEnv`); ``make`` calls ``MyEnv(**kwargs)``. It is built once
      here, so that a broken class fails at registration rather than inside a training run.

    Args:
        env_id: The new id, e.g. ``"my/Capitals-v0"`` (Gymnasium's ``[namespace/]name-vN`` form).
        env_class: Your environment class (None: ``dapo/Math-v0``'s, on ``dataset``).
        dataset: What :func:`dapo_envs.datasets.load` accepts: a bundled name, a ``.parquet`` / ``.jsonl``
            path, a ``pyarrow.Table`` or a list of ``{"prompt", "answer"}`` dicts.
        verifier: A registered verifier name, a ``Verifier``, or a function
            ``(response, reference) -> VerifierResult`` (bool, number or verl-style dict also accepted).
        prompt_template: A template name (``dapo``, ``boxed``, ``gsm8k``, ``plain``) or a string containing
            ``{problem}``.
        **kwargs: Further arguments of the environment (``verifier_timeout``, ``max_response_chars``...)
            and ``gymnasium.register`` options (``max_episode_steps``, ``order_enforce``, ...).

    Raises:
        ValueError: ``env_id`` is already registered, or the template or dataset path is invalid.
        TypeError: ``env_class`` is not a ReasoningEnv subclass, or the data-set form lacks an argument.
        KeyError: ``verifier`` names no registered verifier.
    """
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id must be a non-empty string, got {env_id!r}")
    if env_id in gymnasium.registry:
        raise ValueError(f"an environment with id '{env_id}' is already registered; choose another id or version")
    register_options = {key: kwargs.pop(key) for key in _REGISTER_OPTIONS if key in kwargs}
    given = {
        name: value
        for name, value in (("dataset", dataset), ("verifier", verifier), ("prompt_template", prompt_template))
        if value is not None
    }
    if env_class is not None:
        if not (isinstance(env_class, type) and issubclass(env_class, ReasoningEnv)):
            raise TypeError(f"env_class must be a subclass of dapo_envs.ReasoningEnv, got {env_class!r}")
        env_kwargs = {**given, **kwargs}
        env = env_class(**env_kwargs)  # fail here, at registration, rather than at the first make()
        if is_multi_turn(env):
            turns = getattr(env, "max_turns", None)
            if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
                raise ValueError(f"{env_class.__name__}.max_turns must be an integer >= 1, got {turns!r}")
        env.close()  # type: ignore[no-untyped-call]  # gymnasium leaves Env.close unannotated
        # A class is a creator; gymnasium's EnvCreator protocol types only a **kwargs call.
        gymnasium.register(id=env_id, entry_point=env_class, kwargs=env_kwargs, **register_options)  # type: ignore[arg-type]
        return
    missing = [name for name in ("dataset", "verifier", "prompt_template") if name not in given]
    if missing:
        raise TypeError(
            f"register_reasoning_env without env_class needs dataset, verifier and prompt_template; "
            f"missing: {', '.join(missing)}"
        )
    assert verifier is not None and prompt_template is not None  # none is missing (above)
    # Fail here, at registration, rather than at the first make().
    resolve_verifier(verifier)
    prompts.resolve_template(prompt_template)
    for data in (dataset, kwargs.get("test_dataset")):
        if isinstance(data, str) and data not in datasets.BUNDLED:
            datasets.load(data)  # a path: check that it exists and parses (the result is cached for make)
    gymnasium.register(
        id=env_id,
        entry_point=_MATH_ENTRY_POINT,
        kwargs={"dataset": dataset, "verifier": verifier, "prompt_template": prompt_template, **kwargs},
        **register_options,
    )


def held_out_env_config(env_id: str, env_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``env_config`` to evaluate ``env_id`` on: ``env_config`` with the held-out overrides on top.

    Returns a new dict, ``{**env_config, **cls.held_out_env_config}``, where ``cls`` is the class that
    ``gymnasium.registry[env_id].entry_point`` names (a ``"module:Class"`` string) or is (a callable). A
    :class:`ReasoningEnv` subclass declares its overrides in :attr:`ReasoningEnv.held_out_env_config`
    (``{"split": "test"}`` for ``dapo/Arithmetic-v0``) or :meth:`ReasoningEnv.held_out_overrides` (the
    data-set environments: ``{"split": "test"}``, a test file or a carved share, unless
    ``held_out_share=0``); other entry points, a factory function for instance, have none, and then the
    result is ``env_config`` itself: check :func:`held_out_overrides` first to know whether the problems
    are held out. Use it as ``gymnasium.make(env_id, **held_out_env_config(env_id, env_config))``.

    Raises:
        ValueError: no environment is registered under ``env_id``.
    """
    return {**(env_config or {}), **(held_out_overrides(env_id, env_config) or {})}
