"""One DAPO learner step on a Qwen2.5-0.5B-shaped random model: peak memory and tokens per second.

The step is what ``DAPOTorchLearner`` runs for one mini-batch: response log-probs, DAPO's
token-mean clipped loss, backward, grad clip, AdamW. Two variants, in the same run:

    dapo:      float32 master weights, bf16 autocast, activation checkpointing, and the chunked
               log-prob kernel (``dapo_rl.models.policy.response_logprobs``, ``mixed_precision="bf16"``)
    baseline:  the same weights and autocast, no checkpointing, log-probs from the model's own
               full-vocabulary logits (the usual Hugging Face path)

Each (variant, tokens) runs in a fresh subprocess so that no allocator cache from another run
hides or inflates a peak. Peak memory is ``max_memory_allocated()`` during the measured steps
minus what is allocated before them (weights, AdamW state, inputs); time is the median of the
measured steps (synchronised), after one warm-up step. A variant that runs out of memory is
reported as such. The optimizer and loss settings are the paper's (``dapo_rl.settings``' defaults),
read from ``dapo_rl.rllib.dapo``, which imports Ray.

Usage (from the repository root)::

    python benchmarks/learner_step.py                   # CUDA, bf16, 8192 and 16384 response tokens
    python benchmarks/learner_step.py --quick           # small model on the CPU: a smoke run
"""

from __future__ import annotations

import argparse
import json
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
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from dapo_rl.core import policy_loss  # noqa: E402
from dapo_rl.models.distributed import clip_gradients_by_global_norm  # noqa: E402
from dapo_rl.models.loading import enable_activation_checkpointing  # noqa: E402
from dapo_rl.models.policy import response_logprobs  # noqa: E402
from dapo_rl.rollout.batch import pack_sequences  # noqa: E402
from dapo_rl.settings import paper_settings  # noqa: E402

#: Qwen2.5-0.5B's shape (its config.json), randomly initialised.
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
)
QUICK = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=5000,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
VARIANTS = ("baseline", "dapo")
#: The paper's 32B run: dapo_rl.settings' defaults (lr, weight decay, clip range, grad clip, loss).
PAPER = paper_settings()


def _batch(rows: int, prompt_tokens: int, response_tokens: int, vocab: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    per_row = response_tokens // rows
    prompts = [torch.randint(0, vocab, (prompt_tokens,), generator=generator).tolist() for _ in range(rows)]
    responses = [torch.randint(0, vocab, (per_row,), generator=generator).tolist() for _ in range(rows)]
    batch = pack_sequences(prompts, responses, pad_token_id=0)
    batch["advantages"] = torch.randn(rows, generator=generator)
    batch["old_logprobs"] = torch.full(batch["response_mask"].shape, -11.0)
    return {key: value.to(device) for key, value in batch.items()}


def _baseline_logprobs(model, batch):
    """Full logits of every position from the model's own head, then log-softmax and gather."""
    response_width = batch["response_mask"].shape[1]
    prompt_width = batch["input_ids"].shape[1] - response_width
    with torch.autocast(device_type=batch["input_ids"].device.type, dtype=torch.bfloat16):
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
    logits = logits[:, prompt_width - 1 : prompt_width - 1 + response_width].float()
    tokens = batch["input_ids"][:, prompt_width:]
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def _child(args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = QUICK if args.quick else QWEN25_05B
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape)).to(device=device, dtype=torch.float32)
    model.train()
    if args.child == "dapo":
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PAPER.lr, weight_decay=PAPER.weight_decay)
    batch = _batch(args.rows, args.prompt_tokens, args.child_tokens, shape["vocab_size"], device)
    mask = batch["response_mask"].float()
    normalizer = float(mask.sum())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if args.child == "dapo":
            logprobs, _ = response_logprobs(model, batch, mixed_precision="bf16", chunk_size=args.chunk_size)
        else:
            logprobs = _baseline_logprobs(model, batch)
        loss, _ = policy_loss(
            logprobs,
            batch["old_logprobs"],
            batch["advantages"],
            mask,
            clip_low=PAPER.clip_low,
            clip_high=PAPER.clip_high,
            agg=PAPER.loss_agg,
            normalizer=normalizer,
        )
        loss.backward()
        clip_gradients_by_global_norm([p.grad for p in model.parameters()], PAPER.grad_clip)
        optimizer.step()
        return float(loss)

    cuda = device.type == "cuda"
    try:
        step()  # warm-up: allocates AdamW's state, initialises kernels
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        seconds = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            loss = step()
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        peak = (torch.cuda.max_memory_allocated() - before) if cuda else None
        print(json.dumps(dict(seconds=statistics.median(seconds), peak_bytes=peak, loss=loss)))
    except torch.OutOfMemoryError:
        print(json.dumps(dict(oom=True)))


def _run_child(args, variant: str, tokens: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--child-tokens",
        str(tokens),
        "--device",
        args.device,
        "--rows",
        str(args.rows),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--rounds",
        str(args.rounds),
        "--chunk-size",
        str(args.chunk_size),
    ] + (["--quick"] if args.quick else [])
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} at {tokens} tokens failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tokens", type=int, nargs="+", help="response tokens per step (default 8192 16384)")
    parser.add_argument("--rows", type=int, default=4, help="responses per step (tokens split evenly)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke run)")
    parser.add_argument("--output", help="also write the table to this markdown file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.child:
        _child(args)
        return 0
    tokens_list = args.tokens or ([256] if args.quick else [8192, 16384])
    if args.quick:
        args.prompt_tokens, args.rows, args.rounds = min(args.prompt_tokens, 32), min(args.rows, 2), 1
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"Learner step, {'tiny (--quick)' if args.quick else 'Qwen2.5-0.5B-shaped'} random model, {device_name}, "
        f"{args.rows} rows x ({args.prompt_tokens} prompt + tokens/{args.rows} response), median of {args.rounds}",
        "",
        "| response tokens | variant | peak memory (GiB) | tokens/s | memory vs baseline | time vs baseline |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for tokens in tokens_list:
        results = {variant: _run_child(args, variant, tokens) for variant in VARIANTS}
        base = results["baseline"]
        for variant in VARIANTS:
            result = results[variant]
            if result.get("oom"):
                lines.append(f"| {tokens} | {variant} | out of memory | - | - | - |")
                continue
            peak = result["peak_bytes"]
            memory = f"{peak / 2**30:.2f}" if peak is not None else "n/a (CPU)"
            rate = tokens / result["seconds"]
            if base.get("oom") or variant == "baseline":
                ratios = "-", "-"
            else:
                memory_ratio = f"{peak / base['peak_bytes']:.3f}x" if peak is not None else "-"
                ratios = memory_ratio, f"{result['seconds'] / base['seconds']:.2f}x"
            lines.append(f"| {tokens} | {variant} | {memory} | {rate:,.0f} | {ratios[0]} | {ratios[1]} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
