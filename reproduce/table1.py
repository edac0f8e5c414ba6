"""Table 1 of the DAPO paper, re-run: every cumulative ablation row, several seeds, one table and plots.

Usage::

    python -m dapo_rl.reproduce.table1 --scale tiny --seeds 3 --output runs/table1-tiny
    python -m dapo_rl.reproduce.table1 --scale tiny --quick --output /tmp/t1               # CI: ~1 minute, 1 seed
    python -m dapo_rl.reproduce.table1 --scale paper                                       # plan + launch commands
    python -m dapo_rl.reproduce.table1 --scale paper --run --address HEAD_IP:6379 --model /models/Qwen2.5-32B  # GPUs: NEVER RUN
    python -m dapo_rl.reproduce.table1 --scale gpu --model /models/Qwen2.5-1.5B --output runs/table1-gpu  # NEVER RUN

Scales (``reproduce.scales``):

- ``tiny``: each row's config is trained with :func:`dapo_rl.jobs.train_config` (the CPU main
  job: the embedded tiny model, warm-started, then DAPO on ``dapo/Arithmetic-v0``), with the row's
  technique settings. The score is avg@k on the held-out arithmetic split, NOT AIME 2024: it is
  not comparable in value with the paper's numbers, only the ordering of the rows can be compared.
- ``gpu``: the same loop with the gpu scale (Qwen2.5-1.5B from a local folder, ``--model``), on one
  GPU. It has never been run (see ``dapo_rl.reproduce.scales.GPU_TRAINING``).
- ``paper``: without ``--run``, trains nothing: validates every row's config (vLLM need not be
  installed on the machine that checks), prints the resource plan and the launch commands. With
  ``--run``, trains each row on the Ray cluster at ``--address`` (else ``RAY_ADDRESS``), checked first
  as ``dapo-rl train --address`` checks it (:mod:`reproduce.cluster`: vLLM engines, FSDP2 learners,
  AIME 2024 avg@32); never run on GPUs.

Outputs in ``--output``: ``runs/<row-slug>/seed<k>/`` (one :func:`dapo_rl.jobs.train_config`
folder per run, with its ``summary.json``; a run whose ``summary.json`` exists is not redone),
``results.json`` (one entry per run), ``table1.md`` (paper vs. ours, mean ± std over seeds) and
``curves_*.png`` (the paper's training curves against gradient steps, one line per row, mean over
seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dapo_rl.jobs import DEFAULT_JOB, RunSettings, iteration_results, train_config
from dapo_rl.jobs.cluster import ClusterError
from dapo_rl.reproduce.cluster import ClusterTooSmallError, run_row_on_cluster
from dapo_rl.reproduce.scales import PAPER_ITERATIONS, SCALES, apply_scale, resource_plan
from dapo_rl.reproduce.settings import (
    PAPER_TABLE1,
    TABLE1_SOURCE,
    TECHNIQUE_KEYS,
    VARIANTS,
    aime_eval_32b,
    dapo_32b,
    table1_rows,
)
from dapo_rl.rllib.dapo import DAPOConfig

#: The run settings --quick uses (CI): a few iterations of a briefly warm-started model. 150 warm-start
#: steps (of the main job's 1,200) put generated accuracy a little above 0, so that dynamic sampling
#: finds groups to keep and every row trains; with fewer, the DAPO row keeps nothing and never updates.
QUICK_JOB: dict[str, Any] = {"iterations": 3, "warmstart_steps": 150, "eval_problems": 10, "eval_samples": 2}

#: The run settings of the gpu scale (estimates; never run). No warm-start: the base model is trained directly, as in the paper.
# Evaluated on MATH-500 rather than on the training environment's held-out problems (AIME 2024, the
# paper's; likely near 0 for a small model after a few hours).
GPU_JOB: dict[str, Any] = {
    "iterations": 30,
    "warmstart_steps": 0,
    "eval_env": "dapo/MATH500-v0",
    "eval_problems": 100,
    "eval_samples": 4,
}

#: The curves plotted: (file stem, title, (section, key) path in Tune's result.json, y label).
CURVES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("curves_accuracy", "Generated accuracy (training batch)", ("dapo", "generated_accuracy"), "accuracy"),
    ("curves_entropy", "Policy entropy", ("learners", "default_policy", "entropy"), "entropy (nats/token)"),
    ("curves_length", "Mean response length", ("dapo", "response_length_mean"), "tokens"),
    ("curves_all_correct", "Share of all-correct groups", ("dapo", "all_correct_group_ratio"), "ratio"),
)
STEP_KEY = ("dapo", "optimizer_steps")


def slug(row: str) -> str:
    """A folder name for a row: ``"+ Clip-Higher"`` → ``"clip-higher"``."""
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


# -- rows and jobs -------------------------------------------------------------------------------


def scaled_rows(scale: str, *, variant: str = "paper", model_path: str | None = None) -> dict[str, DAPOConfig]:
    """Table 1's rows (of the 32B run, ``variant``) with the scale applied."""
    return {
        name: apply_scale(config, scale, model_path=model_path)
        for name, config in table1_rows(dapo_32b(variant)).items()
    }


def select_rows(all_rows: list[str], wanted: list[str] | None, quick: bool) -> list[str]:
    """The rows to run: ``wanted`` (names or slugs, in table order), else all (``quick``: first and last)."""
    if wanted:
        by_key = {key: name for name in all_rows for key in (name, slug(name), name.lower())}
        unknown = [w for w in wanted if w not in by_key and slug(w) not in by_key]
        if unknown:
            raise SystemExit(f"table1: unknown row(s) {unknown}; rows: {[slug(r) for r in all_rows]}")
        chosen = {by_key.get(w) or by_key[slug(w)] for w in wanted}
        return [name for name in all_rows if name in chosen]
    return [all_rows[0], all_rows[-1]] if quick else list(all_rows)


def row_run(
    config: DAPOConfig, seed: int, *, scale: str, quick: bool, iterations: int | None = None
) -> tuple[DAPOConfig, RunSettings]:
    """What trains one row and seed: the scaled row config itself (seeded; a new config) and the run
    settings (the main job's, with the gpu scale's, --quick's and --iterations' changes)."""
    changes = {**(GPU_JOB if scale == "gpu" else {}), **(QUICK_JOB if quick else {})}
    if iterations is not None:
        changes["iterations"] = iterations
    return seeded(config, seed), RunSettings.from_job(DEFAULT_JOB, **changes)


def seeded(config: DAPOConfig, seed: int) -> DAPOConfig:
    """A copy of a row's config with its seed: the row's own config stays as it was."""
    return config.copy(copy_frozen=False).debugging(seed=seed)


# -- running -------------------------------------------------------------------------------------


def run_one(config: DAPOConfig, run: RunSettings, folder: Path) -> tuple[dict[str, Any], bool]:
    """Train one run into ``folder`` unless it is done. Returns (summary, skipped)."""
    done = finished_summary(folder)
    # A folder without a summary holds a run stopped part-way: it continues from its last checkpoint.
    return (done, True) if done is not None else (train_config(config, folder, run, resume=True), False)


def run_paper_row(
    config: DAPOConfig, seed: int, folder: Path, iterations: int | None, address: str | None = None
) -> tuple[dict[str, Any], bool]:
    """One row and seed on the Ray cluster at ``address`` (default RAY_ADDRESS), unless it is done.
    Returns (summary, skipped)."""
    done = finished_summary(folder)
    if done is not None:
        return done, True
    try:
        summary = run_row_on_cluster(
            seeded(config, seed),
            folder,
            iterations=iterations or PAPER_ITERATIONS,
            evaluation=aime_eval_32b(),
            address=address,
        )
    except (ClusterError, ClusterTooSmallError) as error:  # refused before any work: one line, no traceback
        raise SystemExit(f"table1: {error}") from None
    return summary, False


def finished_summary(folder: Path) -> dict[str, Any] | None:
    """The summary.json of a run already done in ``folder``, else None: a re-run of a table resumes it."""
    summary_file = folder / "summary.json"
    return json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None


def iteration_metrics(folder: Path) -> list[dict[str, Any]]:
    """Per-iteration results of a run's Tune trials (``tune/dapo/<trial>/result.json``), a resumed run's
    trials merged (``dapo_rl.jobs.iteration_results``)."""
    return iteration_results(folder)


def _get(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def mean_curve(runs: list[list[dict[str, Any]]], path: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """(steps, values): per iteration index, the mean over seeds of the metric and of the cumulative
    optimizer steps, over the seeds that have both at that iteration."""
    xs, ys = [], []
    for index in range(max((len(r) for r in runs), default=0)):
        pairs = [(_get(r[index], STEP_KEY), _get(r[index], path)) for r in runs if index < len(r)]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if pairs:
            xs.append(statistics.fmean(x for x, _ in pairs))
            ys.append(statistics.fmean(y for _, y in pairs))
    return xs, ys


def plot_curves(curves: dict[str, list[list[dict[str, Any]]]], output: Path, caption: str) -> list[Path]:
    """One PNG per curve in :data:`CURVES`, one line per row (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, title, path, ylabel in CURVES:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for row, runs in curves.items():
            xs, ys = mean_curve(runs, path)
            if xs:
                axes.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=row)
        axes.set_title(f"{title}\n{caption}", fontsize=9)
        axes.set_xlabel("gradient steps (dapo/optimizer_steps)")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        figure.tight_layout()
        target = output / f"{stem}.png"
        figure.savefig(target, dpi=110)
        plt.close(figure)
        written.append(target)
    return written


def write_table(
    results: list[dict[str, Any]], rows: list[str], output: Path, *, scale: str, command: str, metric: str
) -> Path:
    lines = [
        f"# DAPO Table 1, re-run at the `{scale}` scale",
        "",
        f"- Paper column: {TABLE1_SOURCE}.",
        f"- Our column: **{metric}**, in percent, mean ± sample std over seeds, after DAPO training"
        " (before-training accuracy in the last column).",
    ]
    if scale != "paper":
        lines.append(
            "- The tiny scale is a CPU toy (tiny model, integer addition, a few minutes per run): its numbers are"
            " NOT comparable in value with AIME 2024; compare the rows' order and the gaps between them only."
            if scale == "tiny"
            else "- The gpu scale has the training data of the paper but a 1.5B model and far fewer steps."
        )
    lines += [
        f"- Command: `{command}`",
        "",
        "| Row | Paper AIME24 avg@32 (%) | Ours after (%) | Seeds | Ours before (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        after = [_percent(r["eval_accuracy_after"]) for r in results if r["row"] == row]
        before = [_percent(r["eval_accuracy_before"]) for r in results if r["row"] == row]
        lines.append(f"| {row} | {PAPER_TABLE1[row]} | {_mean_std(after)} | {len(after)} | {_mean_std(before)} |")
    lines.append("")
    target = output / "table1.md"
    target.write_text("\n".join(lines), encoding="utf-8")
    return target


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _mean_std(values: list[float | None]) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


# -- the paper scale: a plan -----------------------------------------------------------------------


def paper_plan(rows: dict[str, DAPOConfig], selected: list[str], args: argparse.Namespace) -> int:
    """Validate every row, print the resource plan and the launch commands. Trains nothing."""
    for config in rows.values():
        config.validate_settings(require_installed=False)  # vLLM is needed on the cluster, not here
    plan = resource_plan(rows[selected[0]])
    print("Table 1 at the paper's scale: NOT RUN by this command (and never run with this code).")
    print(f"All {len(rows)} row configs validate. Resource plan (identical for every row except rollout sizes):")
    print(json.dumps(plan, indent=2))
    for name in selected:
        row_plan = resource_plan(rows[name])
        techniques = {key: getattr(rows[name], key) for key in sorted(TECHNIQUE_KEYS)}
        print(f"- {name}: responses/round {row_plan['generation']['responses_per_round']}, techniques {techniques}")
    nodes = plan["gpus"] // 8
    print(
        f"\nLaunch on {plan['gpus']} GPUs ({nodes} nodes x 8; install this package with its vllm extra on every node,\n"
        "and put --model and --output on storage every node sees):\n"
        "  ray start --head --port=6379 --num-gpus=8                 # on the head node\n"
        f"  ray start --address=<head-ip>:6379 --num-gpus=8           # on each of the other {nodes - 1} nodes\n"
        "  # then, on any node, one row at a time (or all rows: leave out --rows):"
    )
    for name in selected:
        print(
            f"  python -m dapo_rl.reproduce.table1 --scale paper --run --address <head-ip>:6379 --variant "
            f"{args.variant} --model /models/Qwen2.5-32B --seeds 1 --rows {slug(name)} --output /shared/runs/table1-paper"
        )
    print(
        f"\nEach row trains {PAPER_ITERATIONS} rollout steps (~10k gradient updates, the paper's curves; --iterations "
        "changes it), checkpoints every 10 and resumes from the last one when re-run, then scores AIME 2024 avg@32\n"
        "with vLLM. This launch path has never run (no cluster, GPU or vLLM was available to this project)."
    )
    return 0


# -- entry point ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dapo_rl.reproduce.table1",
        description=(
            "Re-run the DAPO paper's Table 1 (cumulative technique ablations) with several seeds; write "
            "results.json, table1.md and curve plots. tiny: trains on the CPU (avg@k on held-out arithmetic, "
            "not AIME). gpu: trains with the 1.5B gpu scale on one GPU - NEVER RUN, needs --model PATH. paper: "
            "validates every row and prints the resource plan and launch commands (exit 0); with --run, trains "
            "on the Ray cluster at --address (else RAY_ADDRESS) - NEVER RUN on GPUs."
        ),
    )
    p.add_argument("--scale", choices=SCALES, default="tiny", help="paper | gpu (never run) | tiny (default)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 per row (default 3; 1 with --quick)")
    p.add_argument("--output", help="output folder (default runs/table1-<scale>)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI size (~1 minute per seed on 2 cores): 3 iterations, 150 warm-start steps, 10 eval problems x 2 "
        "samples, first and last rows only unless --rows, 1 seed unless --seeds",
    )
    p.add_argument(
        "--rows", nargs="+", metavar="ROW", help="rows to run, by name or slug (e.g. naive-grpo clip-higher)"
    )
    p.add_argument("--model", help="model folder (required for --scale gpu; default: the scale's model)")
    p.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default="paper",
        help="which 32B settings the rows start from (default paper)",
    )
    p.add_argument("--iterations", type=int, help="override the number of DAPO iterations per run")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads in this process (default: 1 at the tiny scale - the models are tiny and extra "
        "threads only contend with Ray's workers on a small machine; torch's default otherwise)",
    )
    p.add_argument(
        "--run",
        action="store_true",
        help="with --scale paper: train on the Ray cluster at --address (never run on GPUs); needs --model",
    )
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="with --run: the Ray cluster (what `ray start --head` printed; default RAY_ADDRESS), checked "
        "before any work as dapo-rl train --address checks it",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        raise SystemExit("table1: --seeds must be >= 1")
    if args.scale == "gpu" and not args.model:
        raise SystemExit("table1: --scale gpu needs --model PATH (a local Qwen2.5-1.5B folder); it has never been run")
    rows = scaled_rows(args.scale, variant=args.variant, model_path=args.model)
    selected = select_rows(list(rows), args.rows, args.quick)
    if args.run and args.scale != "paper":
        raise SystemExit("table1: --run is for --scale paper (the other scales always train)")
    if args.address and not args.run:
        raise SystemExit("table1: --address is for --scale paper --run (the other scales train on a local Ray)")
    if args.scale == "paper":
        if not args.run:
            return paper_plan(rows, selected, args)
        if not args.model:
            raise SystemExit(
                "table1: --scale paper --run needs --model PATH (a Qwen2.5-32B folder every node can read)"
            )

    threads = args.threads if args.threads is not None else (1 if args.scale == "tiny" else None)
    if threads is None:
        return _run_table(args, rows, selected, argv)
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_table(args, rows, selected, argv)
    finally:
        torch.set_num_threads(old_threads)


def _run_table(
    args: argparse.Namespace, rows: dict[str, DAPOConfig], selected: list[str], argv: list[str] | None
) -> int:
    """Train (or resume) every selected row and seed; write results.json, table1.md and the plots."""
    output = Path(args.output or f"runs/table1-{args.scale}").resolve()
    output.mkdir(parents=True, exist_ok=True)
    command = "python -m dapo_rl.reproduce.table1 " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    results: list[dict[str, Any]] = []
    curves: dict[str, list[list[dict[str, Any]]]] = {row: [] for row in selected}
    trained = skipped = 0
    total = len(selected) * args.seeds
    metric = None
    for row in selected:
        for seed in range(args.seeds):
            folder = output / "runs" / slug(row) / f"seed{seed}"
            started = time.perf_counter()
            if args.scale == "paper":
                summary, was_skipped = run_paper_row(rows[row], seed, folder, args.iterations, args.address)
            else:
                config, run = row_run(rows[row], seed, scale=args.scale, quick=args.quick, iterations=args.iterations)
                summary, was_skipped = run_one(config, run, folder)
            skipped += was_skipped
            trained += not was_skipped
            metric = metric or summary.get("eval_metric")
            entry = {
                "row": row,
                "seed": seed,
                "scale": args.scale,
                "techniques": {key: getattr(rows[row], key) for key in sorted(TECHNIQUE_KEYS)},
                "eval_accuracy_before": summary["eval_accuracy_before"],
                "eval_accuracy_after": summary["eval_accuracy_after"],
                "eval_metric": summary.get("eval_metric"),
                "iterations": summary["iterations"],
                "wall_seconds": summary["wall_seconds"],
                "folder": str(folder),
                "skipped": was_skipped,
            }
            results.append(entry)
            curves[row].append(iteration_metrics(folder))
            print(
                f"[{len(results)}/{total}] {row} seed {seed}: accuracy {entry['eval_accuracy_before']:.3f} -> "
                f"{entry['eval_accuracy_after']:.3f} ({entry['iterations']} iterations, "
                + (
                    f"resumed from {folder / 'summary.json'})"
                    if was_skipped
                    else f"{time.perf_counter() - started:.0f}s)"
                ),
                flush=True,
            )
    (output / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    metric_text = (metric or "avg@k") + (" - held-out arithmetic, not AIME" if args.scale == "tiny" else "")
    table = write_table(results, selected, output, scale=args.scale, command=command, metric=metric_text)
    plots = plot_curves(curves, output, f"{args.scale} scale, mean over {args.seeds} seed(s)")
    print(
        f"{trained} run(s) trained, {skipped} skipped (already done); table at {table}; plots: "
        + ", ".join(p.name for p in plots)
    )
    print(table.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
