"""Time per DAPO training iteration, split by phase, and RLlib's overhead against a plain loop.

Both sides do the same work on the same settings (the `dapo-rl train` default's training settings,
on the tiny preset): generate and score G responses per prompt with dynamic sampling, recompute
old log-probs, run the mini-batch updates, and copy the weights to the generating model. The RLlib
side is `DAPO.train()` (local env runner, local learner); the plain side calls the same Ray-free
pieces (`dapo_rl.training`, `dapo_rl.core`, `dapo_rl.models.policy`) in a loop with no RLlib at all.

    python benchmarks/step.py [--iterations 8] [--warmup 2] [--output benchmarks/results/step_cpu.md]

Overhead = (RLlib s/iter) / (plain s/iter) - 1, over the same iterations after warm-up ones.
Generation dominates both, and its cost depends on the responses sampled; both sides start from
the same weights and seeds, so they sample the same responses while their weights agree.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.tune.trainable.trainable as trainable_module  # noqa: E402
import torch  # noqa: E402

import dapo_envs  # noqa: E402,F401
from dapo_rl.core import policy_loss  # noqa: E402
from dapo_rl.jobs import DEFAULT_JOB, build_config, start_ray  # noqa: E402
from dapo_rl.models.loading import load_policy  # noqa: E402
from dapo_rl.models.policy import response_logprobs  # noqa: E402
from dapo_rl.rollout.base import SamplingSettings  # noqa: E402
from dapo_rl.rollout.hf import HFGenerationBackend  # noqa: E402
from dapo_rl.rollout.prompt_sampler import PromptSampler  # noqa: E402
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings  # noqa: E402
from dapo_rl.training import (  # noqa: E402
    build_train_batch,
    collect_groups,
    minibatch_indices,
    minibatch_with_loss_normalizer,
)


def plain_loop_iteration(state: dict, config) -> dict[str, float]:
    """One DAPO step without RLlib; returns seconds per phase."""
    times = {}
    start = time.perf_counter()
    rounds_seed = state["rng"]

    def generate_round(count: int) -> dict:
        problems = state["sampler"].next(count)
        return state["runner"].sample(problems, state["sampling"], seed=int(rounds_seed.integers(2**31 - 1)))

    collected, _, rounds = collect_groups(
        generate_round,
        prompts_per_step=config.prompts_per_step,
        generation_batch_prompts=config.generation_round_prompts,
        dynamic_sampling=config.dynamic_sampling,
        max_sampling_rounds=config.max_sampling_rounds,
        on_sampling_limit=config.on_sampling_limit,
    )
    times["generate"] = sum(r["generate_seconds"] for r in rounds)
    times["score"] = sum(r["score_seconds"] for r in rounds)
    mark = time.perf_counter()
    batch = build_train_batch(
        collected,
        pad_token_id=state["pad"],
        max_response_length=config.max_response_length,
        overlong_cache_len=config.overlong_cache_len,
        overlong_penalty_factor=config.overlong_penalty_factor,
        overlong_filter=config.overlong_filter,
        advantage_scale=config.advantage_scale,
    )
    model = state["learner_model"]
    with torch.no_grad():
        batch["old_logprobs"], _ = response_logprobs(model, batch, temperature=config.temperature)
    times["old_logprobs"] = time.perf_counter() - mark
    mark = time.perf_counter()
    for rows in minibatch_indices(
        batch["group_index"], minibatch_prompts=config.minibatch_prompts, generator=state["shuffle"]
    ):
        mini = minibatch_with_loss_normalizer(
            batch, rows, loss_agg=config.loss_agg, max_response_length=config.max_response_length
        )
        logprobs, _entropy = response_logprobs(
            model, mini, temperature=config.temperature, return_entropy=config.compute_entropy
        )
        loss, _ = policy_loss(
            logprobs,
            mini["old_logprobs"],
            mini["advantages"],
            mini["token_mask"],
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            dual_clip=config.dual_clip,
            agg=config.loss_agg,
            normalizer=float(mini["loss_normalizer"][0]),
        )
        state["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        state["optimizer"].step()
    times["update"] = time.perf_counter() - mark
    mark = time.perf_counter()
    state["runner_model"].load_state_dict(model.state_dict())
    times["sync_weights"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    return times


def make_plain_state(config, model_name: str, seed: int) -> dict:
    learner_model, tokenizer = load_policy(model_name, seed=seed)
    runner_model = copy.deepcopy(learner_model)
    env = gym.make(config.env, **config.env_config).unwrapped
    backend = HFGenerationBackend(
        runner_model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=[tokenizer.eos_token_id],
        prompts_per_call=config.generation_prompts_per_call,
    )
    return {
        "learner_model": learner_model,
        "runner_model": runner_model,
        "runner": GenerationRunner(
            env, tokenizer, backend, PromptSettings(config.max_prompt_length, config.apply_chat_template)
        ),
        "sampler": PromptSampler(env, seed),
        "rng": np.random.default_rng(seed + 1),
        "shuffle": torch.Generator().manual_seed(seed + 2),
        "pad": tokenizer.pad_token_id,
        "sampling": SamplingSettings(
            n=config.group_size,
            max_new_tokens=config.max_response_length,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
        ),
        "optimizer": torch.optim.AdamW(learner_model.parameters(), lr=config.lr, weight_decay=config.weight_decay),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default=None, help="model folder (default: the tiny preset, random init)")
    parser.add_argument(
        "--dynamic-sampling",
        action="store_true",
        help="keep dynamic sampling on (with a random-init model every group is all-wrong)",
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    job = copy.deepcopy(DEFAULT_JOB)
    model_name = args.model or job["model"]
    if not args.dynamic_sampling:
        job["training"]["dynamic_sampling"] = False
    config = build_config(job, model_name)
    trainable_module.DEFAULT_STORAGE_PATH = str(
        Path(args.output or "benchmarks/results").resolve().parent / "ray_results_tmp"
    )
    start_ray()

    algo = config.build_algo()
    plain = make_plain_state(config, model_name, int(config.seed or 0))
    rllib_times, plain_times, phases = [], [], []
    for iteration in range(args.warmup + args.iterations):
        start = time.perf_counter()
        result = algo.train()
        rllib_seconds = time.perf_counter() - start
        plain_phase = plain_loop_iteration(plain, config)
        if iteration >= args.warmup:
            rllib_times.append(rllib_seconds)
            plain_times.append(plain_phase["total"])
            dapo = result["dapo"]
            timers = result["timers"]
            phases.append(
                {
                    "rllib": {
                        "generate": dapo["generate_seconds"],
                        "score": dapo["score_seconds"],
                        "old_logprobs": timers["old_logprobs"],
                        "update": timers["update"],
                        "sync_weights": timers["sync_weights"],
                        "total": rllib_seconds,
                    },
                    "plain": plain_phase,
                }
            )
    algo.stop()
    ray.shutdown()

    rllib_mean = statistics.mean(rllib_times)
    plain_mean = statistics.mean(plain_times)

    def mean(side: str, key: str) -> float:
        return statistics.mean(p[side][key] for p in phases)

    lines = [
        "| phase | RLlib s/iter | plain loop s/iter |",
        "| --- | --- | --- |",
        *(
            f"| {key} | {mean('rllib', key):.3f} | {mean('plain', key):.3f} |"
            for key in ("generate", "score", "old_logprobs", "update", "sync_weights", "total")
        ),
        "",
        f"| | s/iter (mean of {args.iterations} after {args.warmup} warm-up) |",
        "| --- | --- |",
        f"| RLlib `DAPO.train()` | {rllib_mean:.3f} |",
        f"| plain loop, same work | {plain_mean:.3f} |",
        f"| RLlib overhead | {100 * (rllib_mean / plain_mean - 1):+.1f}% |",
        "",
        "RLlib's old_logprobs / update / sync_weights are its MetricsLogger timers (smoothed over iterations).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            f"# DAPO step breakdown and RLlib overhead\n\nCommand: `python benchmarks/step.py {' '.join(sys.argv[1:])}`\n"
            f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, ray {ray.__version__}.\n"
            f"Settings: the `dapo-rl train` default's training settings, model {model_name}, "
            f"dynamic sampling {'on' if config.dynamic_sampling else 'off'}.\n\n{table}\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
