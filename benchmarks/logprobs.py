"""Peak memory and time of chunked ``token_logprobs`` vs. the naive full-logits path.

Each measured step is: per-token log-probs of a (1, T) response from final hidden states and the
output projection, DAPO's token-mean policy loss on them, and backward to ``hidden`` and
``weight`` (both leaves, as the last transformer block's output and ``lm_head.weight`` are).

    naive:  logits = hidden @ W.T ; log_softmax ; gather           (the usual HF-style path)
    ours:   dapo_rl.core.logprobs.token_logprobs(hidden, W, tokens, chunk_size=...)

Memory method
-------------
Every (variant, T, round) runs in a fresh subprocess, so nothing cached by an earlier run (the
allocator's free lists, another variant's pages) can hide or inflate a peak. In it:

* CPU: after the inputs (hidden, weight, tokens, old log-probs, advantages) are allocated and a
  tiny warm-up step has initialised the BLAS/thread pools, the kernel's peak-RSS counter is reset
  (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``) and the current ``VmRSS`` is taken as the
  baseline. "Peak extra memory" = ``VmHWM`` after forward + backward minus that baseline: every
  byte the step touched beyond its inputs, including the (V, H) weight gradient both variants
  produce. tracemalloc cannot see torch's allocations, hence RSS. Where clear_refs is not
  writable the fallback is ``ru_maxrss`` (lifetime peak), which is still valid here because the
  step's peak is far above anything before it.
* CUDA: ``torch.cuda.reset_peak_memory_stats()`` after inputs, then
  ``max_memory_allocated() - memory_allocated()``.

Time is the median over rounds of one step's wall time (CUDA: synchronised). Variants are run
interleaved (naive, ours, naive, ours, ...) so that load from other processes on a shared machine
hits both alike.

Usage (from the repository root)::

    python benchmarks/logprobs.py                      # H=896, V=151,936, T=1024 and 4096, CPU fp32
    python benchmarks/logprobs.py --quick              # small shapes, smoke run
    python benchmarks/logprobs.py --device cuda --dtype bfloat16 --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # an installed (e.g. editable) dapo_rl wins; otherwise use this checkout
    import dapo_rl  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dapo_rl.core.logprobs import _DEFAULT_CHUNK_SIZE, token_logprobs  # noqa: E402

QWEN25_05B = dict(hidden=896, vocab=151_936)


# ----------------------------------------------------------------------------------------------
# The measured step
# ----------------------------------------------------------------------------------------------


def _loss_fn():
    """DAPO's token-mean clipped loss: the project's own if importable, else the same inline."""
    try:
        from dapo_rl.core.losses import policy_loss
    except ImportError:
        policy_loss = None

    if policy_loss is not None:

        def loss(lp, old_lp, adv, mask):
            return policy_loss(lp, old_lp, adv, mask, agg="token-mean")[0]

        return loss, "dapo_rl.core.losses.policy_loss(agg='token-mean')"

    def loss(lp, old_lp, adv, mask):
        # r = exp(lp - old); at old == lp.detach() the clip is inactive, so this is the
        # unclipped token-mean surrogate -(r * A).sum() / n_tokens.
        ratio = torch.exp(lp - old_lp)
        return -(ratio * adv[:, None] * mask).sum() / mask.sum()

    return loss, "inline -(exp(lp - old) * A).sum() / n"


def _naive_logprobs(hidden, weight, tokens):
    logits = hidden @ weight.T
    if logits.dtype != torch.float32:  # what RL trainers do for bf16 models
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _step(variant, inputs, loss, chunk_size):
    hidden, weight, tokens, old_lp, adv, mask = inputs
    if variant == "naive":
        lp = _naive_logprobs(hidden, weight, tokens)
    else:
        lp = token_logprobs(hidden, weight, tokens, chunk_size=chunk_size)
    loss(lp, old_lp, adv, mask).backward()
    hidden.grad = None
    weight.grad = None


def _make_inputs(tokens, hsize, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scaled like a trained model's final (normed) states and lm_head: logits of O(1-10).
    hidden = (torch.randn(1, tokens, hsize, generator=g) * 1.0).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hsize, generator=g) * 0.05).to(device, dtype).requires_grad_()
    ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    with torch.no_grad():  # "old" log-probs: a slightly perturbed policy, computed chunked
        old = token_logprobs(hidden.detach() * 1.01, weight.detach(), ids, chunk_size=256)
    adv = torch.randn(1, generator=g).to(device)
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    return hidden, weight, ids, old, adv, mask


# ----------------------------------------------------------------------------------------------
# Child process: one variant, one measurement
# ----------------------------------------------------------------------------------------------


def _status_kib(field):
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else None


def _child(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    loss, _ = _loss_fn()
    inputs = _make_inputs(args.child_tokens, args.hidden, args.vocab, dtype, device)
    # Warm-up on 8 tokens: thread pools, BLAS kernels, CUDA context; touches no large memory.
    hidden, weight, ids, old, adv, mask = inputs
    h_small = hidden[:, :8].detach().clone().requires_grad_()
    _step(args.child, (h_small, weight, ids[:, :8], old[:, :8], adv, mask[:, :8]), loss, args.chunk_size)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        _step(args.child, inputs, loss, args.chunk_size)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak_extra = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated - memory_allocated"
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to current RSS
            hwm_reset = True
        except OSError:
            hwm_reset = False
        base_kib = _status_kib("VmRSS")
        t0 = time.perf_counter()
        _step(args.child, inputs, loss, args.chunk_size)
        seconds = time.perf_counter() - t0
        if hwm_reset:
            peak_kib = _status_kib("VmHWM")
            method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS after inputs"
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "ru_maxrss - VmRSS after inputs"
        peak_extra = (peak_kib - base_kib) * 1024
    print(json.dumps(dict(seconds=seconds, peak_extra=peak_extra, method=method)))


# ----------------------------------------------------------------------------------------------
# Parent: orchestrate, tabulate
# ----------------------------------------------------------------------------------------------


def _run_child(args, variant, tokens):
    cmd = [
        sys.executable, str(Path(__file__).resolve()),
        "--child", variant, "--child-tokens", str(tokens),
        "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        "--device", args.device, "--dtype", args.dtype,
        "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} T={tokens} failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(b):
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 / 10 else f"{b / 2**20:.1f} MiB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="response lengths T (batch 1)")
    p.add_argument("--hidden", type=int, default=QWEN25_05B["hidden"])
    p.add_argument("--vocab", type=int, default=QWEN25_05B["vocab"])
    p.add_argument("--chunk-size", type=int, default=_DEFAULT_CHUNK_SIZE)
    p.add_argument("--rounds", type=int, default=3, help="fresh-process measurements per variant and T")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="small shapes (H=64, V=8192, T=256 1024), 1 round")
    p.add_argument("--out", default=None, help="markdown output (default: benchmarks/results/logprobs_<device>.md; "
                   "--quick prints only)")  # fmt: skip
    p.add_argument("--child", choices=["naive", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        return _child(args)
    if args.quick:
        args.hidden, args.vocab, args.tokens, args.rounds = 64, 8192, [256, 1024], 1
        args.chunk_size = min(args.chunk_size, 128)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")

    _, loss_name = _loss_fn()
    rows, rows_raw = [], []
    for tokens in args.tokens:
        res = {"naive": [], "ours": []}
        for r in range(args.rounds):
            for variant in ("naive", "ours"):
                m = _run_child(args, variant, tokens)
                res[variant].append(m)
                print(f"T={tokens} round {r + 1}/{args.rounds} {variant:5s}: {m['seconds']:.2f} s, "
                      f"peak extra {_gib(m['peak_extra'])}", file=sys.stderr, flush=True)  # fmt: skip
        mem = {v: max(m["peak_extra"] for m in ms) for v, ms in res.items()}
        sec = {v: statistics.median(m["seconds"] for m in ms) for v, ms in res.items()}
        rows.append((tokens, mem, sec))
        rows_raw.append((tokens, mem, sec, res))
        method = res["ours"][0]["method"]

    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}"
        )
        if hasattr(os, "getloadavg"):  # a shared machine's load skews times (both variants alike)
            machine += f", 1-min load average at the end {os.getloadavg()[0]:.1f}"
    cmd = "python benchmarks/logprobs.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# token_logprobs vs. naive full logits ({args.device}, {args.dtype})",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine}; torch {torch.__version__}; {platform.python_implementation()} {platform.python_version()}  ",
        f"Shapes: batch 1 x T tokens, H={args.hidden}, V={args.vocab:,}; chunk_size={args.chunk_size}; "
        f"{args.rounds} round(s), fresh process each  ",
        f"Step: log-probs + {loss_name} + backward to hidden and weight  ",
        f"Peak extra memory: {method} (max over rounds); time: median over rounds",
        "",
        "| T | naive peak extra | ours peak extra | memory ours/naive | naive time (s) | ours time (s) | time ours/naive |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for tokens, mem, sec in rows:
        lines.append(
            f"| {tokens} | {_gib(mem['naive'])} | {_gib(mem['ours'])} | {mem['ours'] / mem['naive']:.3f} | "
            f"{sec['naive']:.2f} | {sec['ours']:.2f} | {sec['ours'] / sec['naive']:.3f} |"
        )
    lines += ["", "Per round (fresh process each; seconds, naive / ours, ratio):", ""]
    for tokens, _, _, res in rows_raw:
        per = ", ".join(
            f"{n['seconds']:.2f} / {o['seconds']:.2f} ({o['seconds'] / n['seconds']:.2f})"
            for n, o in zip(res["naive"], res["ours"])
        )
        lines.append(f"- T={tokens}: {per}")
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or (None if args.quick else str(ROOT / "benchmarks" / "results" / f"logprobs_{args.device}.md"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
