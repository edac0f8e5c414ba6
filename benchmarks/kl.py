"""What the optional KL penalty costs: the learner's time and memory with ``kl_coef > 0`` in the loss
and in the reward, against DAPO without it (``kl_coef=0``), in one process, on the same work.

Three DAPO Algorithms are built from the main job's training settings (``dapo_rl.jobs.DEFAULT_JOB``,
the tiny preset, dynamic sampling off so that every step trains on the same number of groups, same
seed): ``off`` (``kl_coef=0``, DAPO), ``loss`` (``kl_coef=0.05``, ``kl_placement="loss"``: a reference
forward pass per micro-batch) and ``reward`` (``kl_placement="reward"``: one reference pass per step).
Their ``train()`` calls alternate, so a drift in the machine's load touches all three alike. Per side:
the median and quartiles of the step's wall time over the measured steps (generation included: the
whole price a user pays), and the bytes of the reference model the learner holds (a frozen copy of the starting weights; none with LoRA, where the reference
is the model with its adapters switched off).

    python benchmarks/kl.py [--steps 40] [--warmup 2] [--output benchmarks/results/kl_cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import ray.tune.trainable.trainable as trainable_module  # noqa: E402
import torch  # noqa: E402
from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402

import dapo_envs  # noqa: E402,F401
from dapo_rl.jobs import DEFAULT_JOB, build_config, start_ray  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SIDES = {
    "off": {"kl_coef": 0.0},
    "loss": {"kl_coef": 0.05, "kl_placement": "loss"},
    "reward": {"kl_coef": 0.05, "kl_placement": "reward"},
}


def reference_bytes(algo: Any) -> int:
    """Bytes of the frozen reference copy the local learner holds (0 when it holds none)."""
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
    forward = module.__dict__.get("reference_forward")
    model = getattr(forward, "causal_lm", None)
    if model is None or model is module.causal_lm:
        return 0
    return sum(param.numel() * param.element_size() for param in model.parameters())


def model_bytes(algo: Any) -> int:
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
    return sum(param.numel() * param.element_size() for param in module.causal_lm.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps per side before measuring")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks/results/kl_cpu.md"))
    args = parser.parse_args()

    trainable_module.DEFAULT_STORAGE_PATH = str(Path(args.output).resolve().parent / "ray_results_tmp")
    start_ray()
    algos = {}
    for side, settings in SIDES.items():
        job = copy.deepcopy(DEFAULT_JOB)
        job["training"].update(dynamic_sampling=False, **settings)
        algos[side] = build_config(job, job["model"]).build_algo()
    samples: dict[str, list[float]] = {side: [] for side in SIDES}
    for step in range(args.warmup + args.steps):
        for side, algo in algos.items():
            start = time.perf_counter()
            algo.train()
            if step >= args.warmup:
                samples[side].append(time.perf_counter() - start)
        print(f"[kl] step {step + 1}/{args.warmup + args.steps}", flush=True)
    sizes = {side: (reference_bytes(algo), model_bytes(algo)) for side, algo in algos.items()}
    for algo in algos.values():
        algo.stop()
    ray.shutdown()

    quartiles = {side: statistics.quantiles(values, n=4) for side, values in samples.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    lines = [
        "# What the KL penalty costs: `benchmarks/kl.py`",
        "",
        f"Command: `python benchmarks/kl.py --steps {args.steps} --warmup {args.warmup}`, commit "
        f"{commit.stdout.strip()}, {datetime.now(UTC).strftime('%Y-%m-%d')}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch {torch.__version__}, ray "
        f"{ray.__version__}; 1-minute load average at the end {os.getloadavg()[0]:.1f}.",
        "Work: the main job's training settings on the tiny preset (32 prompts x 8 responses per step, 4 updates, "
        "dynamic sampling off), seed 0; the three sides' steps alternate in one process. Medians over the "
        "measured steps; ratios against `off`.",
        "",
        "| side | reference model held | seconds per step: median (quartiles) | median / off |",
        "| --- | --- | --- | --- |",
    ]
    for side in SIDES:
        held, whole = sizes[side]
        low, median, high = quartiles[side]
        lines.append(
            f"| `{side}` ({', '.join(f'{k}={v}' for k, v in SIDES[side].items())}) | "
            f"{held / 2**20:.2f} MiB ({held / whole:.2f} x the model) | {median:.3f} s ({low:.3f} to {high:.3f}) | "
            f"{median / quartiles['off'][1]:.3f} |"
        )
    lines += [
        "",
        "The penalty changes the updates, so the sides' responses, and generation's share of a step, drift "
        "apart over the steps; the reference passes themselves are one per micro-batch (`loss`, 4 updates a "
        "step here) against one per step (`reward`). With LoRA the reference is the model with its adapters "
        "switched off: no copy is held (tests/test_lora.py), and the passes cost as above.",
        "",
    ]
    Path(args.output).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
