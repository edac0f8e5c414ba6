"""benchmarks/vs_trl.py: the mapping of dapo-rl's geometry onto TRL's GRPOConfig, the reward TRL is
given, and TRL's prompts. Offline and fast; the checks against TRL itself skip where TRL (the bench
extra) is not installed."""

from __future__ import annotations

import gymnasium as gym
import pytest

from benchmarks.vs_trl import (
    UnmatchedSettingError,
    load_workload,
    make_reward_function,
    resolved_training,
    trl_dataset_rows,
    trl_grpo_settings,
    updates_per_rollout,
)
from dapo_rl.models.loading import build_char_tokenizer
from dapo_rl.rollout.prompt_sampler import PromptSampler
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings

WORKLOADS = ("tiny", "smollm2")


def mapped(training, rollout_steps=20):
    return trl_grpo_settings(training, seed=0, rollout_steps=rollout_steps, output_dir="unused")


@pytest.mark.parametrize("workload", WORKLOADS)
def test_one_rollout_step_generates_prompts_times_group_and_takes_one_update_per_minibatch(workload):
    training = resolved_training(load_workload(workload))
    settings = mapped(training, rollout_steps=5)
    prompts, group = training["prompts_per_step"], training["group_size"]
    assert settings["num_generations"] == group
    # TRL's generation batch: per-step batch x steps per generation (one process, no accumulation).
    assert settings["per_device_train_batch_size"] * settings["steps_per_generation"] == prompts * group
    assert settings["gradient_accumulation_steps"] == 1
    # Optimizer steps per rollout step = dapo-rl's mini-batches (x epochs), and max_steps counts them.
    minibatches = prompts // training["minibatch_prompts"]
    assert settings["steps_per_generation"] * settings["num_iterations"] == minibatches * training["num_epochs"]
    assert updates_per_rollout(training) == minibatches * training["num_epochs"]
    assert settings["max_steps"] == 5 * minibatches * training["num_epochs"]
    assert settings["per_device_train_batch_size"] == training["minibatch_prompts"] * group


@pytest.mark.parametrize("workload", WORKLOADS)
def test_objective_optimizer_and_sampling_are_the_jobs(workload):
    training = resolved_training(load_workload(workload))
    settings = mapped(training)
    assert settings["loss_type"] == "dapo" and settings["beta"] == 0.0
    assert (settings["epsilon"], settings["epsilon_high"]) == (training["clip_low"], training["clip_high"])
    assert settings["mask_truncated_completions"] is training["overlong_filter"]
    assert settings["scale_rewards"] == "group"  # advantage_scale "std" in both jobs
    assert settings["learning_rate"] == training["lr"] and settings["weight_decay"] == training["weight_decay"]
    assert settings["max_grad_norm"] == training["grad_clip"]
    assert (settings["lr_scheduler_type"], settings["warmup_steps"]) == ("constant", 0)
    assert settings["max_completion_length"] == training["max_response_length"]
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (1.0, 1.0, 0)
    assert settings["gradient_checkpointing"] is False and settings["bf16"] is False
    assert settings["shuffle_dataset"] is False and settings["use_vllm"] is False


def test_the_two_workloads_differ_where_their_jobs_do():
    tiny, smollm2 = (mapped(resolved_training(load_workload(name))) for name in WORKLOADS)
    assert tiny["mask_truncated_completions"] is True and smollm2["mask_truncated_completions"] is False
    assert (tiny["max_completion_length"], smollm2["max_completion_length"]) == (16, 4)
    assert (tiny["steps_per_generation"], smollm2["steps_per_generation"]) == (4, 2)


def test_warmup_schedule_and_unscaled_advantages_map_through():
    training = {
        **resolved_training(load_workload("tiny")),
        "lr_warmup_steps": 10,
        "advantage_scale": "none",
        "top_k": 5,
    }
    settings = mapped(training)
    assert (settings["lr_scheduler_type"], settings["warmup_steps"]) == ("constant_with_warmup", 10)
    assert settings["scale_rewards"] == "none" and settings["top_k"] == 5


@pytest.mark.parametrize(
    "change, named",
    [
        ({"dual_clip": 10.0}, "dual_clip"),
        ({"loss_agg": "seq-mean-token-mean"}, "loss_agg"),
        ({"minibatch_prompts": 5}, "minibatch_prompts"),
        ({"generation_backend": "vllm"}, "generation_backend"),
    ],
)
def test_settings_trl_cannot_express_are_refused_by_name(change, named):
    training = {**resolved_training(load_workload("tiny")), **change}
    with pytest.raises(UnmatchedSettingError, match=named):
        mapped(training)


def test_reward_is_the_verifiers_score_plus_dapo_rls_overlong_penalty():
    env = gym.make("dapo/Arithmetic-v0", operators="+").unwrapped
    training = resolved_training(load_workload("tiny"))  # 16 new tokens, cache 4: penalty from 13 tokens on
    seen = []
    reward = make_reward_function(env, training, seen.append)
    rewards = reward(
        prompts=["p"] * 4,
        completions=["Answer: 19", "Answer: 18", "Answer: 19", "Answer: 19"],
        completion_ids=[[0] * 11, [0] * 11, [0] * 14, [0] * 16],
        answer=["19"] * 4,
    )
    assert rewards == pytest.approx([1.0, -1.0, 1.0 - 0.5, 1.0 - 1.0])  # (12 - 14) / 4 and (12 - 16) / 4
    assert seen == [[True, False, True, True]]
    # Conversational completions (chat template on) are scored on their text.
    chat = reward(
        prompts=["p"],
        completions=[[{"role": "assistant", "content": "Answer: 7"}]],
        completion_ids=[[0] * 3],
        answer=["7"],
    )
    assert chat == [1.0]


def test_trl_prompts_are_dapo_rls_prompts_in_its_order_and_token_for_token():
    job = load_workload("tiny")
    env = gym.make(job["env"], **job["env_config"]).unwrapped
    tokenizer = build_char_tokenizer()  # no chat template: plain prompts, as the main job
    rows = trl_dataset_rows(env, tokenizer, job, 40)
    expected = PromptSampler(env, job["seed"]).next(40)
    assert [row["prompt"] for row in rows] == [problem.prompt for problem in expected]
    assert [row["answer"] for row in rows] == [problem.answer for problem in expected]
    runner = GenerationRunner(env, tokenizer, None, PromptSettings(64, None))
    assert tokenizer(rows[0]["prompt"]).input_ids == runner.encode_prompt(expected[0])


def test_a_prompt_dapo_rl_would_cut_is_refused():
    job = load_workload("tiny")
    job["training"]["max_prompt_length"] = 8  # "What is 12 + 7?\n" is 16 characters, one token each
    env = gym.make(job["env"], **job["env_config"]).unwrapped
    with pytest.raises(UnmatchedSettingError, match="max_prompt_length=8"):
        trl_dataset_rows(env, build_char_tokenizer(), job, 4)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_trl_reads_the_mapping_as_intended(workload):
    trl = pytest.importorskip("trl")
    training = resolved_training(load_workload(workload))
    config = trl.GRPOConfig(**mapped(training))
    assert config.generation_batch_size == training["prompts_per_step"] * training["group_size"]
    assert config.steps_per_generation == training["prompts_per_step"] // training["minibatch_prompts"]
    assert config.epsilon == training["clip_low"] and config.epsilon_high == training["clip_high"]
    assert config.beta == 0.0 and config.loss_type == "dapo" and config.scale_rewards == "group"
    assert not config.bf16 and not config.gradient_checkpointing  # TRL's defaults are the opposite
    assert not getattr(config, "activation_checkpointing", False)  # its new name in transformers 5
