"""Asynchronous rollouts (``max_staleness``) against synchronous DAPO, on the main job, in one invocation.

Every run is the real ``dapo-rl train`` in a subprocess (its own Ray cluster), on the main job's
settings (32 prompts x 8 responses per step, 4 updates, dynamic sampling), from the tiny preset
warm-started here once with the main job's warm-start, for ``--iterations`` rollout steps:

- ``sync``: the main job as it is (``num_env_runners=0``: the learner and the generating env runner
  share the Tune trial's process, which holds every core);
- ``sync, 1 runner``: synchronous with one remote env runner (generation in its own process, one
  core each), to tell the placement's cost from the overlap's gain;
- ``async S``: ``max_staleness=S`` (S = 1, 2) with one remote env runner generating while the
  learner updates.

Per run: seconds per rollout step (median of Tune's ``time_this_iter_s`` after the first ``--skip``
steps, and DAPO's total), held-out accuracy (the job's avg@4 on 200 held-out problems) after the same
number of steps, and held-out accuracy of every checkpoint (each ``--checkpoint-every`` steps) against
DAPO's wall-clock time at that step, plotted.

    python benchmarks/async.py [--iterations 150] [--checkpoint-every 30] [--seed 0] [--runs RUN ...] \\
        [--output benchmarks/results/async_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import dapo_envs  # noqa: E402
from benchmarks.resume import warm_model  # noqa: E402
from dapo_rl.jobs import DEFAULT_JOB, experiment_folder, iteration_results, start_ray  # noqa: E402
from dapo_rl.jobs.evaluation import evaluate_model  # noqa: E402
from dapo_rl.rllib.checkpoints import complete_checkpoints, export_checkpoint  # noqa: E402

RUNS = {
    "sync": [],
    "sync, 1 runner": ["num_env_runners=1"],
    "async 1": ["num_env_runners=1", "max_staleness=1"],
    "async 2": ["num_env_runners=1", "max_staleness=2"],
    "sync, generator log-probs": ["recompute_old_logprobs=false"],
    "async 1, generator log-probs": ["num_env_runners=1", "max_staleness=1", "recompute_old_logprobs=false"],
    "async 2, generator log-probs": ["num_env_runners=1", "max_staleness=2", "recompute_old_logprobs=false"],
}


def folder_name(run: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in run)


def train(model: Path, output: Path, iterations: int, checkpoint_every: int, seed: int, extra: list[str]) -> dict:
    settings = [
        f"model={model}",
        "warmstart_steps=0",
        f"iterations={iterations}",
        f"checkpoint_every={checkpoint_every}",
        f"keep_checkpoints={iterations // checkpoint_every + 1}",
        f"seed={seed}",
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
    return json.loads((output / "summary.json").read_text(encoding="utf-8"))


def held_out_accuracy(model_folder: Path, seed: int) -> float:
    """The job's held-out metric (avg@4 on the first 200 held-out problems, T = 1), sampled with the
    run's seed as the job's own evaluation is."""
    job = DEFAULT_JOB
    test_config = dapo_envs.held_out_env_config(job["env"], dict(job["env_config"]))
    return evaluate_model(
        model_folder,
        job["env"],
        env_config=test_config,
        samples=job["eval_samples"],
        num_problems=job["eval_problems"],
        max_new_tokens=job["training"]["max_response_length"],
        max_prompt_length=job["training"]["max_prompt_length"],
        seed=seed,
    ).avg_at_k


def curve(output: Path, summary: dict, scratch: Path, seed: int) -> list[tuple[int, float, float]]:
    """(step, DAPO seconds, held-out accuracy) at the start and at every checkpoint."""
    seconds_at = {row["training_iteration"]: row["time_total_s"] for row in iteration_results(output)}
    points = [(0, 0.0, summary["eval_accuracy_before"])]
    for record in complete_checkpoints(experiment_folder(output)):
        folder = scratch / f"{output.name}-{record.iteration}"
        export_checkpoint(record.path, folder)
        points.append((record.iteration, seconds_at[record.iteration], held_out_accuracy(folder, seed)))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=DEFAULT_JOB["iterations"])
    parser.add_argument("--checkpoint-every", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="DAPO's seed (the warm-start is seeded 0 either way)")
    parser.add_argument("--warmstart-steps", type=int, default=DEFAULT_JOB["warmstart_steps"])
    parser.add_argument("--output", default="benchmarks/results/async_cpu.md")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        choices=list(RUNS),
        metavar="RUN",
        help=f"runs to make, the first being the baseline (default: all of {list(RUNS)})",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dapo-async-bench-"))
    model = warm_model(root / "warm", args.warmstart_steps)
    measured = {}
    for name in args.runs:
        extra = RUNS[name]
        output = root / folder_name(name)
        summary = train(model, output, args.iterations, args.checkpoint_every, args.seed, extra)
        rows = iteration_results(output)
        measured[name] = {
            "step": statistics.median(row["time_this_iter_s"] for row in rows[args.skip :]),
            "total": rows[-1]["time_total_s"],
            "after": summary["eval_accuracy_after"],
            "before": summary["eval_accuracy_before"],
            "staleness": statistics.mean(row["dapo"].get("staleness_mean", 0.0) for row in rows),
            "dropped": rows[-1]["dapo"].get("stale_rounds_dropped_total", 0),
            "wait": statistics.median(row["dapo"].get("wait_seconds", float("nan")) for row in rows[args.skip :]),
        }
        print(name, measured[name], flush=True)
    start_ray()
    curves = {
        name: curve(root / folder_name(name), {"eval_accuracy_before": m["before"]}, root, args.seed)
        for name, m in measured.items()
    }

    output = Path(args.output)
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        axes.plot(
            [seconds for _, seconds, _ in points], [accuracy for _, _, accuracy in points], marker="o", label=name
        )
    axes.set_xlabel("DAPO wall-clock seconds (Tune's time_total_s)")
    axes.set_ylabel("held-out avg@4 (200 problems)")
    axes.set_title(f"Main job, {os.cpu_count()} CPU cores: checkpoints every {args.checkpoint_every} steps")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    plot = output.with_suffix(".png")
    figure.savefig(plot, dpi=120)

    base = measured[args.runs[0]]
    lines = [
        "# Asynchronous rollouts (max_staleness) vs synchronous DAPO on the main job",
        "",
        f"Command: `python benchmarks/async.py --iterations {args.iterations} --checkpoint-every {args.checkpoint_every} "
        f"--seed {args.seed}"
        + (f" --runs {' '.join(repr(run) for run in args.runs)}" if args.runs != list(RUNS) else "")
        + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"1-min load average at the end {os.getloadavg()[0]:.1f}  ",
        f"Job: the main job (`dapo-rl train` defaults) from the tiny preset after {args.warmstart_steps} warm-start steps "
        f"(the same model for every run), {args.iterations} rollout steps each, one after another in this invocation. "
        f"Seconds per step: median of Tune's `time_this_iter_s` over steps {args.skip + 1}..{args.iterations}. "
        "Held-out: avg@4 on the job's 200 held-out problems.",
        "",
        f"| run | s / step | step speed-up vs {args.runs[0]} | DAPO s | held-out after | vs {args.runs[0]} (points) | "
        "mean staleness | "
        "rounds dropped | median wait for generation (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in measured.items():
        lines.append(
            f"| {name} | {m['step']:.3f} | {base['step'] / m['step']:.2f}x | {m['total']:.0f} | {m['after']:.3f} | "
            f"{100 * (m['after'] - base['after']):+.1f} | {m['staleness']:.2f} | {m['dropped']:.0f} | "
            + ("-" if m["wait"] != m["wait"] else f"{m['wait']:.3f}")
            + " |"
        )
    lines += [
        "",
        f"Held-out accuracy against DAPO's wall-clock time: `{plot.name}`. Points (step, seconds, avg@4):",
        "",
    ]
    for name, points in curves.items():
        lines.append(
            f"- {name}: " + ", ".join(f"({step}, {seconds:.0f}, {accuracy:.3f})" for step, seconds, accuracy in points)
        )
    text = "\n".join(lines) + "\n"
    output.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
