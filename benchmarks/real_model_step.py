"""Tokens per second of one DAPO iteration on a real model, with and without the shared prompt forward.

A DAPO group is G responses to one prompt. Without sharing, generation prefills the prompt G times
and every log-prob pass runs it G times; with ``share_prompt_forward`` (the default) each distinct
prompt goes through the model once and its G responses attend to its key/value cache
(:mod:`dapo_rl.models.kv_cache`). The arithmetic is the same; this measures what it saves.

Both sides run the same job (default: ``configs/smollm2-arithmetic.yaml``) from the same weights
and seeds, one iteration of each in turn so that a change in the machine's load hits both; each
side has its own copy of the model and optimizer. The loop is the Ray-free pieces the RLlib
algorithm calls (as in ``benchmarks/step.py``), so this also runs on a GPU machine without Ray::

    python benchmarks/real_model_step.py [--config configs/smollm2-arithmetic.yaml] [--iterations 4]
        [--device cpu|cuda] [--output benchmarks/results/real_model_step_cpu.md]

Throughputs: generation = response tokens sampled per second of generation; old log-probs and
update = real (unpadded) prompt + response tokens per second of that phase, the update counting
forward and backward once per token.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch
import transformers
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dapo_envs  # noqa: E402,F401  (registers the environments)
from dapo_rl.core import policy_loss  # noqa: E402
from dapo_rl.models.loading import load_policy  # noqa: E402
from dapo_rl.models.policy import response_logprobs  # noqa: E402
from dapo_rl.rollout.base import SamplingSettings  # noqa: E402
from dapo_rl.rollout.hf import HFGenerationBackend  # noqa: E402
from dapo_rl.rollout.prompt_sampler import PromptSampler  # noqa: E402
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings  # noqa: E402
from dapo_rl.settings import DAPO_SETTINGS, GENERATION_ROUND_FACTOR, OPTIMIZER_DEFAULTS  # noqa: E402
from dapo_rl.training import build_train_batch, collect_groups, minibatch_indices, minibatch_with_loss_normalizer  # noqa: E402

PHASES = ("generate", "score", "old_logprobs", "update")


def job_settings(job: dict) -> SimpleNamespace:
    """The job's training settings over the defaults, as attributes (what DAPOConfig would hold)."""
    settings = SimpleNamespace(**{**DAPO_SETTINGS, **OPTIMIZER_DEFAULTS, **job.get("training", {})})
    settings.generation_round_prompts = (
        settings.generation_batch_prompts or GENERATION_ROUND_FACTOR * settings.prompts_per_step
    )
    return settings


class Side:
    """One copy of the training loop: its own model, optimizer, prompt order and RNGs."""

    def __init__(
        self, model, tokenizer, env, settings: SimpleNamespace, *, share: bool, seed: int, device: torch.device
    ):
        self.model = model.to(device)
        self.settings = settings
        self.share = share
        self.device = device
        self.tokenizer = tokenizer
        backend = HFGenerationBackend(
            self.model,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_ids=[tokenizer.eos_token_id],
            prompts_per_call=settings.generation_prompts_per_call,
            share_prompt_prefill=share,
        )
        self.runner = GenerationRunner(
            env, tokenizer, backend, PromptSettings(settings.max_prompt_length, settings.apply_chat_template)
        )
        self.sampler = PromptSampler(env, seed)
        self.rounds_rng = np.random.default_rng(seed + 1)
        self.shuffle = torch.Generator().manual_seed(seed + 2)
        self.sampling = SamplingSettings(
            n=settings.group_size,
            max_new_tokens=settings.max_response_length,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def iteration(self) -> dict[str, float]:
        """One DAPO step; seconds and token counts per phase, and the step's accuracy."""
        settings = self.settings
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def generate_round(count: int) -> dict:
            problems = self.sampler.next(count)
            return self.runner.sample(problems, self.sampling, seed=int(self.rounds_rng.integers(2**31 - 1)))

        collected, _, rounds = collect_groups(
            generate_round,
            prompts_per_step=settings.prompts_per_step,
            generation_batch_prompts=settings.generation_round_prompts,
            dynamic_sampling=settings.dynamic_sampling,
            max_sampling_rounds=settings.max_sampling_rounds,
            on_sampling_limit=settings.on_sampling_limit,
        )
        out = {
            "generate": sum(r["generate_seconds"] for r in rounds),
            "score": sum(r["score_seconds"] for r in rounds),
            "generated_tokens": float(sum(int(r["response_length"].sum()) for r in rounds)),
            "acc": float(np.mean(np.concatenate([r["acc"] for r in rounds]))),
        }
        batch = build_train_batch(
            collected,
            pad_token_id=self.tokenizer.pad_token_id,
            max_response_length=settings.max_response_length,
            overlong_cache_len=settings.overlong_cache_len,
            overlong_penalty_factor=settings.overlong_penalty_factor,
            overlong_filter=settings.overlong_filter,
            advantage_scale=settings.advantage_scale,
        )
        batch = {
            key: value.to(self.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
        }
        out["train_tokens"] = float(batch["attention_mask"].sum())
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            old = []
            for first in range(0, len(batch["input_ids"]), settings.logprob_batch_rows):
                rows = slice(first, first + settings.logprob_batch_rows)
                chunk = {
                    key: batch[key][rows] for key in ("input_ids", "attention_mask", "position_ids", "response_mask")
                }
                old.append(
                    response_logprobs(self.model, chunk, temperature=settings.temperature, share_prompts=self.share)[0]
                )
            batch["old_logprobs"] = torch.cat(old)
        sync()
        out["old_logprobs"] = time.perf_counter() - start
        start = time.perf_counter()
        for rows in minibatch_indices(
            batch["group_index"].cpu(), minibatch_prompts=settings.minibatch_prompts, generator=self.shuffle
        ):
            mini = minibatch_with_loss_normalizer(
                batch,
                rows.to(self.device),
                loss_agg=settings.loss_agg,
                max_response_length=settings.max_response_length,
            )
            logprobs, _ = response_logprobs(
                self.model,
                mini,
                temperature=settings.temperature,
                return_entropy=settings.compute_entropy,
                share_prompts=self.share,
            )
            loss, _ = policy_loss(
                logprobs,
                mini["old_logprobs"],
                mini["advantages"],
                mini["token_mask"],
                clip_low=settings.clip_low,
                clip_high=settings.clip_high,
                dual_clip=settings.dual_clip,
                agg=settings.loss_agg,
                normalizer=float(mini["loss_normalizer"][0]),
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
            self.optimizer.step()
        sync()
        out["update"] = time.perf_counter() - start
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smollm2-arithmetic.yaml", help="a dapo-rl train job file")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="iterations per side left out of the means")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="write the tables to this markdown file")
    args = parser.parse_args()

    job = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    settings = job_settings(job)
    seed = int(job.get("seed", 0))
    device = torch.device(args.device)
    env = gym.make(job["env"], **job.get("env_config", {})).unwrapped
    model, tokenizer = load_policy(job["model"], seed=seed)
    sides = {
        "per response (before)": Side(
            copy.deepcopy(model), tokenizer, env, settings, share=False, seed=seed, device=device
        ),
        "shared prompt (after)": Side(model, tokenizer, env, settings, share=True, seed=seed, device=device),
    }
    records: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for iteration in range(args.warmup + args.iterations):
        for name, side in sides.items():
            record = side.iteration()
            print(f"iteration {iteration} {name}: " + " ".join(f"{k}={v:.3f}" for k, v in record.items()), flush=True)
            if iteration >= args.warmup:
                records[name].append(record)

    def total(name: str, key: str) -> float:
        return sum(r[key] for r in records[name])

    rows = []
    for name in sides:
        seconds = {phase: total(name, phase) / args.iterations for phase in PHASES}
        rows.append(
            {
                "name": name,
                "seconds": seconds,
                "iteration": sum(seconds.values()),
                "generation_tps": total(name, "generated_tokens") / total(name, "generate"),
                "old_logprobs_tps": total(name, "train_tokens") / total(name, "old_logprobs"),
                "update_tps": total(name, "train_tokens") / total(name, "update"),
                "acc": statistics.mean(r["acc"] for r in records[name]),
            }
        )
    before, after = rows
    lines = [
        "| side | generate s | score s | old log-probs s | update s | s/iter | generation tok/s | old log-probs tok/s | update tok/s | generated acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['name']} | {r['seconds']['generate']:.2f} | {r['seconds']['score']:.3f} | {r['seconds']['old_logprobs']:.2f} | "
            f"{r['seconds']['update']:.2f} | {r['iteration']:.2f} | {r['generation_tps']:.0f} | {r['old_logprobs_tps']:.0f} | "
            f"{r['update_tps']:.0f} | {r['acc']:.3f} |"
            for r in rows
        ),
        f"| after / before speed | {before['seconds']['generate'] / after['seconds']['generate']:.2f}x | | "
        f"{before['seconds']['old_logprobs'] / after['seconds']['old_logprobs']:.2f}x | "
        f"{before['seconds']['update'] / after['seconds']['update']:.2f}x | {before['iteration'] / after['iteration']:.2f}x | | | | |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        threads = torch.get_num_threads()
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            "# One DAPO iteration on a real model: prompt forward per response vs shared per group\n\n"
            f"Command: `python benchmarks/real_model_step.py {' '.join(sys.argv[1:])}`\n"
            f"Machine: {os.cpu_count()} CPU cores ({threads} torch threads), device {device}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}.\n"
            f"Job: `{args.config}` (model {job['model']}, G={settings.group_size}, {settings.prompts_per_step} prompts/step, "
            f"{settings.max_response_length} new tokens, dynamic sampling {'on' if settings.dynamic_sampling else 'off'}).\n"
            f"Means over {args.iterations} iterations per side after {args.warmup} warm-up; the sides alternate iteration by iteration.\n\n"
            f"{table}\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
