"""Multi-turn episodes through the RLlib algorithm: one DAPO step on dapo/Calculator-v0 with scripted
turns (the environment's tokens out of the loss, the episode metrics), and a user-registered
multi-turn class reaching other processes with the config."""

from __future__ import annotations

import itertools
import pickle
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

import dapo_rl.rllib.dapo as dapo_module
from dapo_envs import ToolEnv, register_reasoning_env
from dapo_envs.arithmetic import ArithmeticEnv
from dapo_rl import DAPOConfig
from dapo_rl.rllib.env_runner import env_registration
from tests.helpers import ScriptedPolicy, built_algo, tool_user

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    group_size=4,
    prompts_per_step=4,
    minibatch_prompts=2,
    max_prompt_length=32,
    max_response_length=64,
    overlong_cache_len=4,
    lr=1e-4,
    lr_warmup_steps=0,
    num_epochs=1,
    dynamic_sampling=False,
)


def calculator_config(**training) -> DAPOConfig:
    return (
        DAPOConfig()
        .rl_module(model_config={"model": "tiny-qwen2"})
        .environment("dapo/Calculator-v0", env_config={"prompt_template": "What is {problem}?\n"})
        .training(**{**TINY, **training})
        .debugging(seed=0)
    )


def half_use_the_tool() -> Callable[[str], tuple[str, bool]]:
    """A policy whose every other sample answers at once (wrong); the others call the calculator, then
    answer right: every group is half right."""
    samples = itertools.count()

    def turn(context: str) -> tuple[str, bool]:
        if "<result>" not in context and next(samples) % 2:
            return "Answer: 0", True
        return tool_user(context)

    return turn


def test_one_dapo_step_trains_on_the_models_tokens_only(ray_session):
    batches = []
    real_build = dapo_module.build_train_batch

    def spy(collected, **kwargs):
        batch = real_build(collected, **kwargs)
        batches.append((collected, batch))
        return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dapo_module, "build_train_batch", spy)
        with built_algo(calculator_config()) as algo:
            tokenizer = algo._tokenizer
            algo.env_runner.backend = algo.env_runner.generation.backend = ScriptedPolicy(
                tokenizer, half_use_the_tool()
            )
            result = algo.train()
    ((collected, batch),) = batches
    dapo = result["dapo"]
    used_tool = np.asarray([len(mask) > int(mask.sum()) for mask in collected["response_loss_mask"]])
    assert used_tool.mean() == 0.5 and bool((batch["advantages"] != 0).all())
    assert dapo["environment_turn_frac"] == pytest.approx(used_tool.mean())
    assert dapo["episode_model_turns_max"] == 2.0
    assert dapo["generated_accuracy"] == pytest.approx(used_tool.mean())  # the tool users answer right
    for row, mask in enumerate(collected["response_loss_mask"]):
        assert batch["token_mask"][row, : len(mask)].tolist() == mask.tolist()
    learner = result["learners"]["default_policy"]
    assert np.isfinite(learner["policy_loss"]) and learner["policy_loss"] != 0
    model_tokens = sum(int(mask.sum()) for mask in collected["response_loss_mask"])
    all_tokens = int(collected["response_length"].sum())
    assert dapo["environment_token_frac"] == pytest.approx(1 - model_tokens / all_tokens)
    assert result["samples"][0]["response"].startswith(("<calc>", "Answer: 0"))


class Doubler(ToolEnv):
    """A tool that doubles a number: defined here, registered only inside a test."""

    tag = "double"

    def __init__(self, **kwargs):
        super().__init__(ArithmeticEnv(operators="+"), **kwargs)

    def tool(self, text):
        return str(2 * int(text)) if text.strip().isdigit() else "error"


def test_a_user_registered_id_travels_with_the_config(tmp_path):
    env_id = f"test/Doubler-{uuid.uuid4().hex[:6]}-v0"
    register_reasoning_env(env_id, Doubler, max_calls=2)
    config = DAPOConfig().environment(env_id, env_config={"max_calls": 1})
    assert config.env_registration["id"] == env_id and config.env_registration["entry_point"] is Doubler
    assert env_registration("dapo/Calculator-v0") is None  # dapo_envs registers its own ids on import
    assert DAPOConfig().environment("dapo/Arithmetic-v0").env_registration is None
    # Another process (a Tune trial, a remote env runner) where the id was never registered. Ray
    # pickles a class of the user's __main__ by value; this module's the same way here.
    module = sys.modules[Doubler.__module__]
    cloudpickle.register_pickle_by_value(module)
    try:
        (tmp_path / "config.pkl").write_bytes(cloudpickle.dumps(config))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    script = (
        "import pickle, sys, gymnasium as gym\n"
        "from dapo_rl.rllib.env_runner import make_reasoning_env\n"
        f"config = pickle.load(open({str(tmp_path / 'config.pkl')!r}, 'rb'))\n"
        f"assert {env_id!r} not in gym.registry\n"
        "env = make_reasoning_env(config)\n"
        "env.reset(seed=0)\n"
        "print(type(env).__name__, env.max_turns, env.step('<double>21</double>')[0])\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "Doubler 2 <result>42</result>"
    assert pickle.loads((tmp_path / "config.pkl").read_bytes()).env_registration["kwargs"] == {"max_calls": 2}
    # An env set without environment() (RLlib's update_from_dict sets the attribute) is captured by validate().
    config = calculator_config().update_from_dict({"env": env_id, "env_config": {}})
    assert config.env_registration is None
    config.validate()
    assert config.env_registration["entry_point"] is Doubler


def test_episodes_from_two_remote_runners_merge_into_one_step(ray_session):
    """Remote env runners run the turn loop in their own processes; their shares merge with the
    multi-turn columns (the random tiny model rarely calls the tool: the columns, not the calls)."""
    merged = []
    real_build = dapo_module.build_train_batch

    def spy(collected, **kwargs):
        merged.append(collected)
        return real_build(collected, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dapo_module, "build_train_batch", spy)
        with built_algo(calculator_config().env_runners(num_env_runners=2)) as algo:
            result = algo.train()
    (collected,) = merged
    dapo = result["dapo"]
    assert dapo["prompts_generated"] == TINY["prompts_per_step"]
    assert len(collected["response_loss_mask"]) == TINY["prompts_per_step"] * TINY["group_size"]
    # The step's episode metrics are those of the merged shares, row for row.
    masks = collected["response_loss_mask"]
    used_environment = np.asarray([len(mask) > int(mask.sum()) for mask in masks])
    assert dapo["environment_turn_frac"] == pytest.approx(used_environment.mean())
    assert dapo["episode_model_turns_max"] == float(np.max(np.asarray(collected["model_turns"])))
    model_tokens = sum(int(mask.sum()) for mask in masks)
    assert dapo["environment_token_frac"] == pytest.approx(1 - model_tokens / int(collected["response_length"].sum()))
    assert np.isfinite(result["learners"]["default_policy"]["policy_loss"])
