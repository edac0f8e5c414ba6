"""AReaL's staleness table on our jobs: maximum staleness x off-policy variant x seed, held-out accuracy
against steps and against wall-clock time, with the spread over seeds.

Every run is the real ``dapo-rl train`` in a subprocess (its own Ray cluster), one after another:

- ``S = 0``: the job as it is (synchronous; ``num_env_runners`` as the job says), once per seed
  (the variants differ only on stale responses, so they coincide at S = 0), plus the ``generator``
  variant when asked for (its old log-probs are the generator's even at S = 0);
- ``S >= 1``: one remote env runner generating while the learner updates, for each variant:

  ``naive``      the proximal clip only, no behaviour weight (``off_policy_correction=none``);
  ``decoupled``  today's decoupled objective (``tis_token``, C = ``importance_weight_cap``);
  ``generator``  the generator's log-probs as the old ones (``recompute_old_logprobs=false``);
  ``tis_sequence``, ``mis_token``, ``mis_sequence``, ``icepop``: the other corrections.

Each checkpoint (every ``--checkpoint-every`` steps) is exported and evaluated on the job's held-out
problems with the job's evaluation (avg@k), seeded like the run. The table gives, per (S, variant),
the mean held-out accuracy at the last step with its standard deviation and range over seeds, the
median seconds per step and the speed-up over S = 0; the plot (``.png`` beside the table) draws the
mean over seeds against steps and against DAPO's wall-clock seconds, the band being min..max.

    python benchmarks/async_sweep.py [--job main|smollm2] [--staleness 0 1 2 4] \\
        [--variants naive decoupled generator] [--seeds 0 1 2] [--iterations 150] [--checkpoint-every 30] \\
        [--model FOLDER] [--eval-problems N] [--eval-samples K] [--output benchmarks/results/async_sweep_cpu.md]

Smoke test (minutes): ``--iterations 2 --checkpoint-every 1 --staleness 0 1 --variants decoupled
--seeds 0 --eval-problems 8 --eval-samples 1``.
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
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dapo_envs  # noqa: E402
from benchmarks.resume import warm_model  # noqa: E402
from dapo_rl.jobs import DEFAULT_JOB, experiment_folder, iteration_results, load_job, start_ray  # noqa: E402
from dapo_rl.jobs.evaluation import evaluate_model  # noqa: E402
from dapo_rl.rllib.checkpoints import complete_checkpoints, export_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"main": None, "smollm2": ROOT / "configs" / "smollm2-arithmetic.yaml"}
#: variant -> the settings it adds to an asynchronous run.
VARIANTS = {
    "naive": ["off_policy_correction=none"],
    "decoupled": ["off_policy_correction=tis_token"],
    "generator": ["recompute_old_logprobs=false"],
    "tis_sequence": ["off_policy_correction=tis_sequence"],
    "mis_token": ["off_policy_correction=mis_token"],
    "mis_sequence": ["off_policy_correction=mis_sequence"],
    "icepop": ["off_policy_correction=icepop"],
}


def grid(staleness: list[int], variants: list[str]) -> list[tuple[int, str]]:
    """The (S, variant) cells: S = 0 once as "sync" (and "generator" when asked), S >= 1 per variant."""
    cells = []
    for level in staleness:
        if level == 0:
            cells.append((0, "sync"))
            if "generator" in variants:
                cells.append((0, "generator"))
        else:
            cells += [(level, variant) for variant in variants]
    return cells


def run_settings(level: int, variant: str) -> list[str]:
    if level == 0:
        return [] if variant == "sync" else list(VARIANTS[variant])
    return ["num_env_runners=1", f"max_staleness={level}", *VARIANTS[variant]]


def train(job_file: Path | None, model: str | None, output: Path, args, seed: int, extra: list[str]) -> None:
    settings = [
        f"iterations={args.iterations}",
        f"checkpoint_every={args.checkpoint_every}",
        f"keep_checkpoints={args.iterations // args.checkpoint_every + 1}",
        f"seed={seed}",
        f"eval_problems={args.eval_problems}",
        f"eval_samples={args.eval_samples}",
        *([f"model={model}", "warmstart_steps=0"] if model else []),
        *extra,
    ]
    command = [sys.executable, "-m", "dapo_rl.cli", "train", "--output", str(output)]
    if job_file is not None:
        command += ["--config", str(job_file)]
    command += [item for setting in settings for item in ("--set", setting)]
    with open(output.with_suffix(".log"), "w") as log:
        subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
        )


def held_out(job: dict, model_folder: Path, seed: int, args) -> float:
    """The job's held-out avg@k, seeded like the run."""
    return evaluate_model(
        model_folder,
        job["env"],
        env_config=dapo_envs.held_out_env_config(job["env"], dict(job["env_config"])),
        samples=args.eval_samples,
        num_problems=args.eval_problems,
        max_new_tokens=job["training"]["max_response_length"],
        max_prompt_length=job["training"]["max_prompt_length"],
        apply_chat_template=job["training"].get("apply_chat_template"),
        seed=seed,
    ).avg_at_k


def curve(job: dict, output: Path, scratch: Path, seed: int, args) -> list[tuple[int, float, float]]:
    """(step, DAPO seconds, held-out avg@k) at the start and at every checkpoint."""
    summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    seconds_at = {row["training_iteration"]: row["time_total_s"] for row in iteration_results(output)}
    points = [(0, 0.0, float(summary["eval_accuracy_before"]))]
    for record in complete_checkpoints(experiment_folder(output)):
        folder = scratch / f"{output.name}-{record.iteration}"
        export_checkpoint(record.path, folder)
        points.append((record.iteration, seconds_at[record.iteration], held_out(job, folder, seed, args)))
    return points


def cell_name(level: int, variant: str) -> str:
    return f"S={level} {variant}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=list(JOBS), default="main")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["naive", "decoupled", "generator"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=DEFAULT_JOB["iterations"])
    parser.add_argument("--checkpoint-every", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="steps left out of the median seconds per step")
    parser.add_argument("--model", default=None, help="model folder (main job: default, warm-started here once)")
    parser.add_argument("--warmstart-steps", type=int, default=DEFAULT_JOB["warmstart_steps"])
    parser.add_argument("--eval-problems", type=int, default=DEFAULT_JOB["eval_problems"])
    parser.add_argument("--eval-samples", type=int, default=DEFAULT_JOB["eval_samples"])
    parser.add_argument("--output", default="benchmarks/results/async_sweep_cpu.md")
    args = parser.parse_args()
    if args.iterations < args.checkpoint_every:
        parser.error("--iterations must be at least --checkpoint-every (the curves are read from checkpoints)")

    job_file = JOBS[args.job]
    job = load_job(str(job_file) if job_file else None, [])
    root = Path(tempfile.mkdtemp(prefix="dapo-async-sweep-"))
    model = args.model
    if model is None and args.job == "main":
        model = str(warm_model(root / "warm", args.warmstart_steps))
    cells = grid(args.staleness, args.variants)
    runs: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        for level, variant in cells:
            output = root / f"S{level}-{variant}-seed{seed}"
            train(job_file, model, output, args, seed, run_settings(level, variant))
            rows = iteration_results(output)
            runs.setdefault(cell_name(level, variant), {})[seed] = {
                "output": output,
                "step_seconds": statistics.median(row["time_this_iter_s"] for row in rows[args.skip :] or rows),
                "staleness_mean": statistics.mean(row["dapo"].get("staleness_mean", 0.0) for row in rows),
            }
            print(cell_name(level, variant), seed, runs[cell_name(level, variant)][seed], flush=True)
    start_ray()
    for by_seed in runs.values():
        for seed, run in by_seed.items():
            run["curve"] = curve(job, run["output"], root, seed, args)
            run["output"] = str(run["output"])

    output = Path(args.output)
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, by_seed in runs.items():
        curves = np.array([[point[2] for point in run["curve"]] for run in by_seed.values()])
        steps = [point[0] for point in next(iter(by_seed.values()))["curve"]]
        seconds = np.mean([[point[1] for point in run["curve"]] for run in by_seed.values()], axis=0)
        for axes, x in ((by_step, steps), (by_time, seconds)):
            (line,) = axes.plot(x, curves.mean(axis=0), marker="o", label=name)
            axes.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
    k = args.eval_samples
    by_step.set_xlabel("rollout step")
    by_time.set_xlabel("DAPO wall-clock seconds (mean over seeds)")
    by_step.set_ylabel(f"held-out avg@{k} ({args.eval_problems} problems)")
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    figure.suptitle(f"{args.job} job, {os.cpu_count()} CPU cores: mean over seeds {args.seeds}, band min..max")
    figure.tight_layout()
    figure.savefig(output.with_suffix(".png"), dpi=120)

    base = runs[cell_name(0, "sync")] if cell_name(0, "sync") in runs else next(iter(runs.values()))
    base_seconds = statistics.median(run["step_seconds"] for run in base.values())
    base_final = statistics.mean(run["curve"][-1][2] for run in base.values())
    lines = [
        f"# Staleness sweep on the {args.job} job: held-out accuracy and step time by S, variant and seed",
        "",
        f"Command: `python benchmarks/async_sweep.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; 1-min load average at "
        f"the end {os.getloadavg()[0]:.1f}  ",
        f"Runs: {args.iterations} rollout steps each, seeds {args.seeds}, one after another. Held-out: avg@{k} on "
        f"{args.eval_problems} held-out problems at step {args.iterations}; mean, standard deviation and range over seeds. "
        f"Seconds per step: median over seeds of each run's median `time_this_iter_s` after step {args.skip}.",
        "",
        "| S | variant | held-out mean | std | min..max | vs S=0 (points) | s / step | speed-up | mean staleness |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for (level, variant), by_seed in zip(cells, runs.values(), strict=True):
        finals = [run["curve"][-1][2] for run in by_seed.values()]
        seconds = statistics.median(run["step_seconds"] for run in by_seed.values())
        spread = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        lines.append(
            f"| {level} | {variant} | {statistics.mean(finals):.3f} | {spread:.3f} | {min(finals):.3f}..{max(finals):.3f} | "
            f"{100 * (statistics.mean(finals) - base_final):+.1f} | {seconds:.3f} | {base_seconds / seconds:.2f}x | "
            f"{statistics.mean(run['staleness_mean'] for run in by_seed.values()):.2f} |"
        )
    lines += ["", f"Curves (`{output.with_suffix('.png').name}`), per run (step, seconds, avg@{k}):", ""]
    for name, by_seed in runs.items():
        for seed, run in by_seed.items():
            points = ", ".join(f"({step}, {seconds:.0f}, {accuracy:.3f})" for step, seconds, accuracy in run["curve"])
            lines.append(f"- {name}, seed {seed}: {points}")
    text = "\n".join(lines) + "\n"
    output.write_text(text, encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(runs, indent=1, default=str), encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
