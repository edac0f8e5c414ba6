"""A learner and a generator on the same cores: torch threads and the OpenMP wait policy per process.

Asynchronous rollouts put a generating env runner and the learner in two processes on one machine.
Each torch process runs an OpenMP pool; with GNU OpenMP's default wait policy a pool's threads spin
after each parallel region before sleeping, so two pools on too few cores take turns spinning on
each other's cores. This benchmark runs, without Ray, the main job's two halves in two processes:

- ``learn``: the learner's update on one mini-batch of the main job (8 prompts x 8 responses of up
  to 16 tokens: forward, backward, AdamW), repeated;
- ``generate``: a generation round of the main job (48 prompts x 8 responses, 16 new tokens) with
  the HF backend, repeated;

each alone, then together, under each policy: torch threads per process (``OMP_NUM_THREADS``) and
``OMP_WAIT_POLICY`` (unset: the library's default; ``PASSIVE``: threads sleep at once). Figures are
medians of the seconds per repetition over ``--seconds`` of running; "slowdown" is together / alone
under the same policy, and the last column compares each policy's time together with the old
policy's in the same invocation.

    python benchmarks/shared_cores.py [--seconds 12] [--output benchmarks/results/shared_cores_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (learner threads, generator threads, OMP_WAIT_POLICY or None for the default).
POLICIES = {
    "old: learner 2 threads, runner 1, default wait": (2, 1, None),
    "Ray's sizing: 1 + 1 threads, default wait": (1, 1, None),
    "new: 1 + 1 threads, PASSIVE wait": (1, 1, "PASSIVE"),
    "learner 2 threads, runner 1, PASSIVE wait": (2, 1, "PASSIVE"),
}
OLD = "old: learner 2 threads, runner 1, default wait"


def worker(role: str, seconds: float) -> None:
    """Run ``role`` repeatedly for ``seconds``; print the seconds of each repetition as JSON."""
    sys.path.insert(0, str(ROOT))
    import torch

    from dapo_rl.core import policy_loss
    from dapo_rl.models.loading import TINY_PRESET, load_policy
    from dapo_rl.models.policy import response_logprobs
    from dapo_rl.rollout.base import SamplingSettings
    from dapo_rl.rollout.batch import pack_sequences
    from dapo_rl.rollout.hf import HFGenerationBackend

    model, tokenizer = load_policy(TINY_PRESET, seed=0)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 200, (int(length),), generator=generator).tolist() for length in range(12, 60)]
    if role == "generate":
        backend = HFGenerationBackend(
            model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id], prompts_per_call=64
        )
        sampling = SamplingSettings(n=8, max_new_tokens=16)

        def once(index: int) -> None:
            backend.generate(prompts, sampling, seed=index)

    else:
        rows = [prompts[index % 8] for index in range(64)]
        responses = [torch.randint(10, 200, (8 + index % 9,), generator=generator).tolist() for index in range(64)]
        batch = pack_sequences(rows, responses, pad_token_id=tokenizer.pad_token_id)
        advantages = torch.randn(64, generator=generator)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        with torch.no_grad():
            old, _ = response_logprobs(model, batch)

        def once(index: int) -> None:
            logprobs, _ = response_logprobs(model, batch, return_entropy=True)
            loss, _ = policy_loss(logprobs, old, advantages, batch["response_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    once(-1)  # warm-up: allocations, the first call's setup
    times = []
    deadline = time.perf_counter() + seconds
    index = 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        once(index)
        times.append(time.perf_counter() - start)
        index += 1
    print(json.dumps({"role": role, "threads": torch.get_num_threads(), "times": times}), flush=True)


def launch(role: str, threads: int, wait: str | None, seconds: float) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["OMP_NUM_THREADS"] = str(threads)
    if wait is not None:
        env["OMP_WAIT_POLICY"] = wait
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", role, "--seconds", str(seconds)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def median_seconds(process: subprocess.Popen) -> float:
    output, _ = process.communicate()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed (exit {process.returncode})")
    return statistics.median(json.loads(lines[-1])["times"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seconds)
        return

    load_before = os.getloadavg()[0]
    results = {}
    for name, (learner_threads, runner_threads, wait) in POLICIES.items():
        alone_learn = median_seconds(launch("learn", learner_threads, wait, args.seconds))
        alone_generate = median_seconds(launch("generate", runner_threads, wait, args.seconds))
        # Together: the generator runs a little longer, so the learner is measured beside it throughout.
        generate = launch("generate", runner_threads, wait, args.seconds + 8)
        time.sleep(4)  # the generator past its model load and warm-up
        together_learn = median_seconds(launch("learn", learner_threads, wait, args.seconds))
        together_generate = median_seconds(generate)
        results[name] = (alone_learn, together_learn, alone_generate, together_generate)
        print(name, results[name], flush=True)

    old_learn, old_generate = results[OLD][1], results[OLD][3]
    lines = [
        "# A learner and a generator sharing cores: torch threads and OMP_WAIT_POLICY per process",
        "",
        f"Command: `python benchmarks/shared_cores.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other users' jobs: 1-min load "
        f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after); Python {platform.python_version()}  ",
        "Work: the main job's learner update (64 rows) and generation round (48 prompts x 8, 16 tokens), tiny preset; "
        f"medians of seconds per repetition over {args.seconds:g} s. Slowdown: together / alone under the same "
        "policy; vs old: together, this policy's time / the old policy's.",
        "",
        "| policy | learn alone | learn together | slowdown | generate alone | generate together | slowdown | "
        "learn vs old | generate vs old |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (alone_learn, together_learn, alone_generate, together_generate) in results.items():
        lines.append(
            f"| {name} | {alone_learn:.3f} | {together_learn:.3f} | {together_learn / alone_learn:.2f}x | "
            f"{alone_generate:.3f} | {together_generate:.3f} | {together_generate / alone_generate:.2f}x | "
            f"{together_learn / old_learn:.2f} | {together_generate / old_generate:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
