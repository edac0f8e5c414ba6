"""What checkpoints cost while training, and what a SIGKILL costs a run that resumes.

Runs the real ``dapo-rl train`` command in subprocesses (each its own Ray cluster), on the main job's
training settings, starting from the tiny preset warm-started here once (so groups mix right and
wrong answers and every iteration trains):

1. the same run three times, checkpointing never (only at the end), every 10 iterations (the default)
   and every iteration: the DAPO phase's wall time of each, as a ratio to the run without;
2. a run checkpointing every ``--checkpoint-every`` iterations, killed with SIGKILL (its whole process
   group) once ``--kill-at`` iterations are done, then ``dapo-rl train --resume``: the iterations
   lost (done before the kill, after the last complete checkpoint) and the seconds from the resume
   command's start to its first new iteration, against the seconds from a fresh run's start to
   its first iteration (run 1 without checkpoints).

    python benchmarks/resume.py [--iterations 30] [--kill-at 17] [--checkpoint-every 5] \\
        [--output benchmarks/results/resume_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402

import dapo_envs  # noqa: E402,F401
from dapo_rl.checkpoints import newest_complete_checkpoint  # noqa: E402
from dapo_rl.jobs import RESULTS_FILE  # noqa: E402
from dapo_rl.models import TINY_PRESET, load_policy, save_policy  # noqa: E402
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings  # noqa: E402
from dapo_rl.warmstart import WarmStartSettings, supervised_warmstart  # noqa: E402


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
    values = [f"model={model}", "warmstart_steps=0", f"iterations={iterations}", f"checkpoint_every={checkpoint_every}",
              "eval_problems=8", "eval_samples=1"]
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


def run(arguments: list[str], output: Path, log_file: Path, *, kill_at: int | None = None,
        first_after: int | None = None) -> dict:
    """Run the command; return its wall time, DAPO time, and the seconds until its first iteration
    past ``first_after`` (when given); kill its process group once ``kill_at`` iterations are done."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    log = open(log_file, "w")  # noqa: SIM115
    process = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    first_iteration_s = None
    while process.poll() is None:
        done = iterations_done(output)
        if first_after is not None and first_iteration_s is None and done > first_after:
            first_iteration_s = time.perf_counter() - started
        if kill_at is not None and done >= kill_at:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(0.01)
    log.close()
    wall = time.perf_counter() - started
    if kill_at is None and process.returncode != 0:
        raise SystemExit(f"{arguments} failed; see {log_file}")
    summary_file = output / "summary.json"
    rl_seconds = json.loads(summary_file.read_text())["rl_seconds"] if summary_file.is_file() else None
    return {"wall_s": wall, "rl_s": rl_seconds, "first_iteration_s": first_iteration_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--kill-at", type=int, default=17)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--warmstart-steps", type=int, default=300)
    parser.add_argument("--output", default="benchmarks/results/resume_cpu.md")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dapo-resume-bench-"))
    model = warm_model(root / "warm", args.warmstart_steps)

    cadence = {}
    for every in (0, 10, 1):
        cadence[every] = run(command("--output", str(root / f"every{every}"), *settings(model, args.iterations, every)),
                             root / f"every{every}", root / f"every{every}.log", first_after=0)
        print(f"checkpoint_every={every}: DAPO {cadence[every]['rl_s']:.1f} s", flush=True)

    killed = root / "killed"
    run(command("--output", str(killed), *settings(model, args.iterations, args.checkpoint_every)), killed,
        root / "killed.log", kill_at=args.kill_at)
    done_at_kill = iterations_done(killed)
    record = newest_complete_checkpoint(killed / "tune")
    resumed_from = record.iteration if record else 0
    resumed = run(command("--resume", str(killed)), killed, root / "resumed.log", first_after=resumed_from)
    lost = done_at_kill - resumed_from

    base = cadence[0]["rl_s"]
    lines = [
        "# Checkpoints while training, and a SIGKILL followed by `dapo-rl train --resume`",
        "",
        f"Command: `python benchmarks/resume.py --iterations {args.iterations} --kill-at {args.kill_at} "
        f"--checkpoint-every {args.checkpoint_every}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"1-min load average at the end {os.getloadavg()[0]:.1f}  ",
        f"Job: the main job's training settings (32 prompts x 8, 4 updates per iteration), the tiny preset after "
        f"{args.warmstart_steps} warm-start steps, {args.iterations} iterations; a checkpoint is "
        f"{sum(f.stat().st_size for f in record.path.rglob('*') if f.is_file()) / 2**20:.1f} MiB (weights, AdamW state, "
        "sampler and RNG state)." if record else "",
        "",
        "| checkpoint_every | DAPO phase (s) | ratio to no checkpoints |",
        "|---:|---:|---:|",
        *[f"| {every} | {cadence[every]['rl_s']:.1f} | {cadence[every]['rl_s'] / base:.3f} |" for every in (0, 10, 1)],
        "",
        f"Kill: SIGKILL to the run's process group after {done_at_kill} iterations (checkpoint_every "
        f"{args.checkpoint_every}); the newest complete checkpoint was iteration {resumed_from}: "
        f"**{lost} iteration(s) lost**.",
        "",
        "| start | seconds from the command's start to its first new iteration |",
        "|---|---:|",
        f"| fresh run (`dapo-rl train`, evaluates first) | {cadence[0]['first_iteration_s']:.1f} |",
        f"| `dapo-rl train --resume` (no evaluation before) | {resumed['first_iteration_s']:.1f} |",
        "",
        f"The resumed run finished in {resumed['wall_s']:.1f} s (DAPO {resumed['rl_s']:.1f} s for "
        f"{args.iterations - resumed_from} iterations).",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
