"""Which problems ``dapo-rl train`` measures accuracy on, before and after DAPO, and what it calls them.

Held-out problems, never the training problems, unless the user says so:

- no ``eval_env``: the training environment's own held-out split (``dapo_envs.held_out_overrides``);
  an environment that declares none is refused, naming the ways out;
- ``eval_env``: that environment, on its held-out split when it declares one, else on all its
  problems (a benchmark such as ``dapo/AIME24-v0``); the training environment itself with its
  training config is refused like the above;
- ``eval_on_training_problems: true``: the training environment's own training problems, and then
  every printed line and ``summary.json`` say "training problems", not "held-out".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium

import dapo_envs
from dapo_envs.held_out import missing_held_out

__all__ = ["EvalProblems", "choose_eval_problems"]


@dataclasses.dataclass(frozen=True)
class EvalProblems:
    """The environment a run is evaluated on, and whether its problems are held out."""

    env_id: str
    env_config: dict[str, Any]
    held_out: bool  # False: the training problems (eval_on_training_problems)
    chosen_by: str  # how: "the training environment's held-out split", "eval_env", "eval_on_training_problems"

    @property
    def accuracy(self) -> str:
        """What its accuracy is called on a printed line."""
        return "held-out accuracy" if self.held_out else "accuracy on training problems"

    @property
    def episodes(self) -> str:
        """What its episodes are called on a printed line."""
        return "held-out episodes" if self.held_out else "episodes on training problems"

    def name(self, base_config: dict[str, Any]) -> str:
        """``env_id`` and the settings that differ from ``base_config`` (e.g. ``split=test``), for the metric's text."""
        changed = [f"{key}={value}" for key, value in self.env_config.items() if base_config.get(key) != value]
        if not self.held_out:
            changed.append("its training problems")
        return self.env_id + (f" ({', '.join(changed)})" if changed else "")

    def record(self, count: int) -> dict[str, Any]:
        """``summary.json``'s ``evaluated_on``: environment, config, split and the number of problems."""
        return {
            "env": self.env_id,
            "env_config": dict(self.env_config),
            "split": "held-out" if self.held_out else "training problems",
            "chosen_by": self.chosen_by,
            "problems": count,
        }


def choose_eval_problems(
    env_id: str, env_config: dict[str, Any], *, eval_env: str | None, on_training_problems: bool
) -> EvalProblems:
    """The problems a run training ``env_id`` with ``env_config`` is evaluated on (see the module docstring).

    Raises:
        ValueError: no held-out problems (the message names the environment and the ways out), or
            both ``eval_env`` and ``on_training_problems``.
    """
    if not isinstance(on_training_problems, bool):
        raise ValueError(f"eval_on_training_problems must be true or false, got {on_training_problems!r}")
    if on_training_problems:
        if eval_env is not None:
            raise ValueError(
                f"give eval_env ({eval_env}) or eval_on_training_problems, not both: eval_on_training_problems "
                f"evaluates on the training environment {env_id}'s own problems"
            )
        return EvalProblems(env_id, dict(env_config), held_out=False, chosen_by="eval_on_training_problems")
    if eval_env is None:
        if dapo_envs.held_out_overrides(env_id, env_config) is None:
            raise ValueError(_refusal(env_id, missing_held_out(env_id, env_config)))
        config = dapo_envs.held_out_env_config(env_id, env_config)
        return EvalProblems(env_id, config, held_out=True, chosen_by="the training environment's held-out split")
    config = dapo_envs.held_out_env_config(eval_env, {})
    if eval_env == env_id and _made_with(env_id, config) == _made_with(env_id, env_config):
        reason = "eval_env names the training environment, and evaluating it gives its training problems"
        raise ValueError(_refusal(env_id, reason))
    return EvalProblems(eval_env, config, held_out=True, chosen_by="eval_env")


def _made_with(env_id: str, env_config: dict[str, Any]) -> dict[str, Any]:
    return {**(gymnasium.registry[env_id].kwargs or {}), **env_config}


def _refusal(env_id: str, reason: str) -> str:
    return (
        f"environment {env_id!r} has no held-out problems ({reason}): dapo-rl train would measure 'held-out' "
        "accuracy on the problems it trains on. Set eval_env to an environment of held-out problems "
        "(--set eval_env=ID), or evaluate on the training problems knowingly with "
        "--set eval_on_training_problems=true (the output then says 'training problems')"
    )
