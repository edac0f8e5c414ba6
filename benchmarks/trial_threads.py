"""Torch threads in the Tune trial: the trial holding every core (the job default) against one CPU.

A Ray actor that holds N CPUs gets ``OMP_NUM_THREADS=N``, so torch inside it runs N threads. With
``num_learners=0`` and ``num_env_runners=0`` (the main job) the learner and the generating env
runner live in the Tune trial's own process, which RLlib sizes at 1 CPU ("auto"): torch then runs one
thread on a machine that has more. ``dapo-rl train`` now gives that trial every core
(``num_cpus_per_learner: null``); ``--set num_cpus_per_learner=1`` is the old sizing.

Both runs are the real ``dapo-rl train`` in subprocesses, one after the other, on the main job's
training settings from the tiny preset warm-started here once, for ``--iterations`` iterations; the
figures are medians over the iterations after the first ``--skip``, read from each run's
``results.jsonl``: seconds per iteration and per phase, and the trial's torch thread count.

    python benchmarks/trial_threads.py [--iterations 12] [--skip 2] [--output benchmarks/results/trial_threads_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.resume import warm_model  # noqa: E402
from dapo_rl.jobs import RESULTS_FILE, iteration_results  # noqa: E402

PHASES = ("generate_and_score", "old_logprobs", "update")


def run(model: Path, iterations: int, output: Path, extra: list[str]) -> list[dict]:
    settings = [
        f"model={model}",
        "warmstart_steps=0",
        f"iterations={iterations}",
        "checkpoint_every=0",
        "eval_problems=8",
        "eval_samples=1",
        *extra,
    ]
    command = [
        sys.executable,
        "-m",
        "dapo_rl.cli",
        "train",
        "--output",
        str(output),
        *[item for setting in settings for item in ("--set", setting)],
    ]
    with open(output.with_suffix(".log"), "w") as log:
        subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
        )
    assert (output / RESULTS_FILE).is_file()
    return iteration_results(output)


def medians(rows: list[dict]) -> dict[str, float]:
    values = {
        "step": statistics.median(row["dapo"]["step_seconds"] for row in rows),
        "threads": statistics.median(row["dapo"]["torch_threads"] for row in rows),
    }
    for phase in PHASES:
        values[phase] = statistics.median(row["timers"][phase] for row in rows)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--warmstart-steps", type=int, default=300)
    parser.add_argument("--output", default="benchmarks/results/trial_threads_cpu.md")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dapo-threads-bench-"))
    model = warm_model(root / "warm", args.warmstart_steps)
    one = medians(run(model, args.iterations, root / "one_cpu", ["num_cpus_per_learner=1"])[args.skip :])
    every = medians(run(model, args.iterations, root / "every_core", [])[args.skip :])
    rows = [("iteration", "step")] + [(phase, phase) for phase in PHASES]
    lines = [
        '# Torch threads in the Tune trial: every core (the default) vs 1 CPU (RLlib\'s "auto")',
        "",
        f"Command: `python benchmarks/trial_threads.py --iterations {args.iterations} --skip {args.skip}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"1-min load average at the end {os.getloadavg()[0]:.1f}  ",
        f"Job: the main job's training settings, local learner and env runner, the tiny preset after "
        f"{args.warmstart_steps} warm-start steps; medians over iterations {args.skip + 1}..{args.iterations}. "
        f"Torch threads in the trial: {one['threads']:.0f} with 1 CPU, {every['threads']:.0f} with every core.",
        "",
        "| seconds per | 1 CPU | every core | every core / 1 CPU |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {one[key]:.3f} | {every[key]:.3f} | {every[key] / one[key]:.3f} |" for label, key in rows],
    ]
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
