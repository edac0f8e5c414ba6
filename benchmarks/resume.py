"""What checkpoints cost while training, and what a SIGKILL costs a run that resumes.

On the main job's training settings (32 prompts x 8, 4 updates per iteration), starting from the
tiny preset warm-started here once (so groups mix right and wrong answers and every iteration trains):

1. checkpoint cost, in this process: ``--iterations`` DAPO iterations, each followed by a checkpoint
   written as Tune writes one (``DAPO.save_to_path`` into a temporary folder, then Tune's own copy
   into the trial folder); the save time as a ratio to the iteration time, measured on the same
   iterations. The overhead of ``checkpoint_every=N`` is that ratio / N.
2. a SIGKILL: the real ``dapo-rl train`` in a subprocess (its own Ray cluster), checkpointing every
   ``--checkpoint-every`` iterations, its whole process group killed with SIGKILL once ``--kill-at``
   iterations are done, then ``dapo-rl train --resume``: the iterations lost (done before the kill,
   after the newest complete checkpoint) and the seconds from the resume command's start to its
   first new iteration, against a fresh ``dapo-rl train``'s seconds to its first iteration.

    python benchmarks/resume.py [--iterations 8] [--kill-at 17] [--checkpoint-every 5] \\
        [--output benchmarks/results/resume_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym  # noqa: E402
import pyarrow.fs  # noqa: E402
import torch  # noqa: E402
from ray.train._internal.storage import _pyarrow_fs_copy_files  # noqa: E402

import dapo_envs  # noqa: E402,F401
from dapo_rl.jobs import RESULTS_FILE, build_config, load_job, start_ray  # noqa: E402
from dapo_rl.jobs.warmstart import WarmStartSettings, supervised_warmstart  # noqa: E402
from dapo_rl.models.loading import TINY_PRESET, load_policy, save_policy  # noqa: E402
from dapo_rl.rllib.checkpoints import newest_complete_checkpoint  # noqa: E402
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings  # noqa: E402


def warm_model(folder: Path, steps: int) -> Path:
    model, tokenizer = load_policy(TINY_PRESET, seed=0)
    env = gym.make("dapo/Arithmetic-v0", operators="+").unwrapped
    encoder = GenerationRunner(env, tokenizer, None, PromptSettings(64, None))
    supervised_warmstart(model, tokenizer, env, encoder.encode_prompt, WarmStartSettings(steps=steps, seed=0))
    save_policy(model, tokenizer, folder)
    return folder


def command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "dapo_rl.cli", "train", *arguments]


def settings(model: Path, iterations: int, checkpoint_every: int) -> list[str]:
    values = [
        f"model={model}",
        "warmstart_steps=0",
        f"iterations={iterations}",
        f"checkpoint_every={checkpoint_every}",
        "eval_problems=8",
        "eval_samples=1",
    ]
    return [item for value in values for item in ("--set", value)]


def iterations_done(output: Path) -> int:
    results = output / RESULTS_FILE
    if not results.is_file():
        return 0
    done = 0
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            done = max(done, int(json.loads(line)["training_iteration"]))
        except (ValueError, KeyError):
            continue
    return done


def run(
    arguments: list[str],
    output: Path,
    log_file: Path,
    *,
    kill_at: int | None = None,
    first_iteration: int | None = None,
) -> dict:
    """Run the command; return its wall time and the seconds until its log shows iteration
    ``first_iteration``; kill its process group once ``kill_at`` iterations are done."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    log = open(log_file, "w")  # noqa: SIM115
    process = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    first_iteration_s = None
    marker = f"iter {first_iteration:4d}" if first_iteration is not None else None
    while process.poll() is None:
        if marker is not None and first_iteration_s is None and marker in log_file.read_text(errors="replace"):
            first_iteration_s = time.perf_counter() - started
        if kill_at is not None and iterations_done(output) >= kill_at:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(0.01)
    log.close()
    if kill_at is None and process.returncode != 0:
        raise SystemExit(f"{arguments} failed; see {log_file}")
    return {"wall_s": time.perf_counter() - started, "first_iteration_s": first_iteration_s}


def checkpoint_cost(model: Path, iterations: int, folder: Path) -> dict:
    """Seconds per iteration and per checkpoint (saved, then copied as Tune copies it), same iterations."""
    start_ray()
    config = build_config(load_job(None, [f"model={model}", "warmstart_steps=0"]))
    algo = config.build_algo()
    filesystem = pyarrow.fs.LocalFileSystem()
    try:
        algo.train()  # warm-up
        train_s, save_s = [], []
        for index in range(iterations):
            started = time.perf_counter()
            algo.train()
            trained = time.perf_counter()
            local = algo.save_to_path(str(folder / f"local_{index}"))
            _pyarrow_fs_copy_files(
                local,
                str(folder / f"checkpoint_{index:06d}"),
                source_filesystem=filesystem,
                destination_filesystem=filesystem,
            )
            save_s.append(time.perf_counter() - trained)
            train_s.append(trained - started)
        size = sum(f.stat().st_size for f in (folder / "checkpoint_000000").rglob("*") if f.is_file())
    finally:
        algo.stop()
    return {"train_s": statistics.mean(train_s), "save_s": statistics.mean(save_s), "size_mib": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=8, help="iterations timed for the checkpoint cost")
    parser.add_argument("--run-iterations", type=int, default=30, help="iterations of the killed and resumed run")
    parser.add_argument("--kill-at", type=int, default=17)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--warmstart-steps", type=int, default=300)
    parser.add_argument("--output", default="benchmarks/results/resume_cpu.md")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dapo-resume-bench-"))
    model = warm_model(root / "warm", args.warmstart_steps)

    cost = checkpoint_cost(model, args.iterations, root / "checkpoints")
    ratio = cost["save_s"] / cost["train_s"]
    print(f"iteration {cost['train_s']:.3f} s, checkpoint {cost['save_s']:.3f} s", flush=True)

    fresh = run(
        command("--output", str(root / "fresh"), *settings(model, 1, 0)),
        root / "fresh",
        root / "fresh.log",
        first_iteration=1,
    )
    killed = root / "killed"
    run(
        command("--output", str(killed), *settings(model, args.run_iterations, args.checkpoint_every)),
        killed,
        root / "killed.log",
        kill_at=args.kill_at,
    )
    done_at_kill = iterations_done(killed)
    record = newest_complete_checkpoint(killed / "tune")
    resumed_from = record.iteration if record else 0
    resumed = run(command("--resume", str(killed)), killed, root / "resumed.log", first_iteration=resumed_from + 1)
    summary = json.loads((killed / "summary.json").read_text())
    lost = done_at_kill - resumed_from

    lines = [
        "# Checkpoints while training, and a SIGKILL followed by `dapo-rl train --resume`",
        "",
        f"Command: `python benchmarks/resume.py --iterations {args.iterations} --run-iterations {args.run_iterations} "
        f"--kill-at {args.kill_at} --checkpoint-every {args.checkpoint_every}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"1-min load average at the end {os.getloadavg()[0]:.1f}  ",
        f"Job: the main job's training settings (32 prompts x 8, 4 updates per iteration) on the tiny preset after "
        f"{args.warmstart_steps} warm-start steps. A checkpoint is {cost['size_mib']:.1f} MiB (weights, AdamW "
        "state, sampler and RNG state).",
        "",
        "## Checkpoint cost",
        "",
        f"Over {args.iterations} iterations, each followed by a checkpoint (saved, then copied into a trial folder as "
        "Tune does):",
        "",
        "| iteration (s) | checkpoint (s) | checkpoint / iteration | overhead at checkpoint_every=10 (the default) | at 1 |",
        "|---:|---:|---:|---:|---:|",
        f"| {cost['train_s']:.3f} | {cost['save_s']:.3f} | {ratio:.3f} | {ratio / 10:.2%} | {ratio:.2%} |",
        "",
        "## A SIGKILL and `--resume`",
        "",
        f"A run of {args.run_iterations} iterations checkpointing every {args.checkpoint_every}, its process group killed "
        f"with SIGKILL after {done_at_kill} iterations; the newest complete checkpoint was iteration {resumed_from}: "
        f"**{lost} iteration(s) lost** (at most checkpoint_every - 1 complete ones, plus the one in progress).",
        "",
        "| start | seconds from the command's start to its first iteration |",
        "|---|---:|",
        f"| fresh run (`dapo-rl train`: Ray, model, held-out evaluation first) | {fresh['first_iteration_s']:.1f} |",
        f"| `dapo-rl train --resume` (Ray, restore; no evaluation before) | {resumed['first_iteration_s']:.1f} |",
        "",
        f"The resumed run finished in {resumed['wall_s']:.1f} s (DAPO {summary['rl_seconds']:.1f} s for "
        f"{args.run_iterations - resumed_from} iterations, then export and evaluation).",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
