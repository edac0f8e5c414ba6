"""Per-learner training state and step time: FSDP2 sharding against DDP replication, same run.

Two learner processes (gloo on the CPU, NCCL on GPUs) train the same Qwen2-architecture model on
the same batch, once with DDP (every learner holds all weights, gradients and AdamW state) and
once with FSDP2 as ``data_parallel="fsdp2"`` shards it (``dapo_rl.models.distributed.shard_causal_lm``).
Reported per learner, after one warm-up step: the bytes of weights, gradients and optimizer state
it holds (its local shards for FSDP2), and the median step time over the measured steps. The
state ratio is what sharding is for; on the CPU the time ratio says little about NCCL on GPUs.

Usage (from the repository root)::

    python benchmarks/sharding.py            # 2 processes on the CPU, a ~25M-parameter model
    python benchmarks/sharding.py --quick    # the tiny preset, a smoke run
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # an installed (e.g. editable) dapo_rl wins; otherwise use this checkout
    import dapo_rl  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from dapo_rl.core import policy_loss  # noqa: E402
from dapo_rl.models.distributed import clip_gradients_by_global_norm, shard_causal_lm  # noqa: E402
from dapo_rl.models.loading import load_policy  # noqa: E402
from dapo_rl.models.policy import ResponseLogprobs  # noqa: E402
from dapo_rl.rollout.batch import pack_sequences  # noqa: E402
from dapo_rl.settings import paper_settings  # noqa: E402

WORLD = 2
#: A ~25M-parameter Qwen2 (hidden 512, 8 layers; the preset's byte-level vocabulary).
MEDIUM = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
VARIANTS = ("ddp", "fsdp2")
#: The paper's clip range, loss aggregation and grad clip: dapo_rl.settings' defaults.
PAPER = paper_settings()


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _worker(rank: int, port: int, variant: str, quick: bool, rounds: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model, _ = load_policy("tiny-qwen2", seed=0, tiny_spec=None if quick else MEDIUM)
        forward = ResponseLogprobs(model)
        if variant == "fsdp2":
            shard_causal_lm(forward, model)
        else:
            forward = DistributedDataParallel(forward)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        generator = torch.Generator().manual_seed(rank)
        vocab = model.config.vocab_size
        rows, prompt, response = (2, 8, 16) if quick else (4, 64, 192)
        batch = pack_sequences(
            [torch.randint(3, vocab, (prompt,), generator=generator).tolist() for _ in range(rows)],
            [torch.randint(3, vocab, (response,), generator=generator).tolist() for _ in range(rows)],
            pad_token_id=0,
        )
        mask = batch["response_mask"].float()
        advantages = torch.randn(rows, generator=generator)

        def step() -> float:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logprobs, _ = forward(batch)
            loss, _ = policy_loss(
                logprobs,
                logprobs.detach() - 0.01,
                advantages,
                mask,
                clip_low=PAPER.clip_low,
                clip_high=PAPER.clip_high,
                agg=PAPER.loss_agg,
                normalizer=float(mask.sum()) * WORLD,
            )
            (loss * WORLD).backward()
            clip_gradients_by_global_norm([p.grad for p in model.parameters()], PAPER.grad_clip)
            optimizer.step()
            return time.perf_counter() - started

        step()  # warm-up: AdamW's state exists from here on
        seconds = statistics.median(step() for _ in range(rounds))
        parameters = sum(_local_bytes(p) for p in model.parameters())
        gradients = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        optimizer_state = sum(
            _local_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
        )
        results[(variant, rank)] = dict(
            seconds=seconds,
            parameters=parameters,
            gradients=gradients,
            optimizer=optimizer_state,
            count=sum(p.numel() for p in model.parameters()),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset, 1 measured step")
    parser.add_argument("--rounds", type=int, default=5, help="measured steps per variant")
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    with mp.Manager() as manager:
        results = manager.dict()
        for variant in VARIANTS:
            mp.spawn(_worker, args=(_free_port(), variant, args.quick, rounds, results), nprocs=WORLD, join=True)
        results = dict(results)
    mib = 2**20
    lines = [
        f"{WORLD} learners (gloo, CPU), {'tiny preset' if args.quick else 'Qwen2 hidden 512 x 8 layers'}, "
        f"{results[('ddp', 0)]['count'] / 1e6:.1f}M parameters (float32), median of {rounds} steps after 1 warm-up",
        "",
        "| variant | weights / learner (MiB) | gradients (MiB) | AdamW state (MiB) | total vs DDP | step time vs DDP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = results[("ddp", 0)]
    base_total = base["parameters"] + base["gradients"] + base["optimizer"]
    for variant in VARIANTS:
        r = results[(variant, 0)]  # rank 0; with an even split rank 1 holds the same
        total = r["parameters"] + r["gradients"] + r["optimizer"]
        seconds = max(results[(variant, rank)]["seconds"] for rank in range(WORLD))
        base_seconds = max(results[("ddp", rank)]["seconds"] for rank in range(WORLD))
        lines.append(
            f"| {variant} | {r['parameters'] / mib:.1f} | {r['gradients'] / mib:.1f} | {r['optimizer'] / mib:.1f} | "
            f"{total / base_total:.3f}x | {seconds / base_seconds:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
