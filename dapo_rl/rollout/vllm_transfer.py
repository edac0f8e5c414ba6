"""vLLM's weight-transfer API (vLLM >= 0.29) for the NCCL weight sync of GPU engines.

Since about 0.29 vLLM receives RL weight updates itself: an engine created with
``weight_transfer_config={"backend": "nccl"}`` has worker methods ``init_weight_transfer_engine``
(join the trainer's NCCL group), ``start_weight_update`` / ``update_weights`` /
``finish_weight_update`` (receive a round of tensors and load them through vLLM's layerwise reload,
which also repacks kernel-format weights). It replaces the ``worker_extension_cls`` +
``collective_rpc`` + ``StatelessProcessGroup`` pattern of 0.10-0.11
(``dapo_rl.rollout.vllm_worker``), which this project keeps for those versions.

The trainer's side is unchanged: learner rank 0 broadcasts the announced tensors one at a time
from NCCL rank 0 (``dapo_rl.rollout.weight_sync.send_weights``), which is vLLM's "unpacked" wire
format (``packed=False`` below). What this module adds is only the payloads and the call order
for the engine's side, as plain dicts (they cross vLLM's RPC); the calls themselves need CUDA and
have not run here (see docs/vllm.md). The payloads are checked against vLLM 0.32's own
dataclasses in tests/test_vllm_engine.py.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

from dapo_rl.rollout.weight_sync import WeightMetadata, engine_name

#: The engine keyword that turns the API on, and its backend.
WEIGHT_TRANSFER_CONFIG = {"backend": "nccl"}


def weight_transfer_api_available() -> bool:
    """Whether the installed vLLM has the weight-transfer API (without importing vLLM)."""
    try:
        return importlib.util.find_spec("vllm.distributed.weight_transfer") is not None
    except ModuleNotFoundError:  # no vllm at all
        return False


def init_payload(master_address: str, master_port: int, rank_offset: int, world_size: int) -> dict[str, Any]:
    """``init_weight_transfer_engine``'s argument for an engine whose first worker is NCCL rank
    ``rank_offset`` in a group of ``world_size`` (learner rank 0 is rank 0). Unpacked: the learners
    send one tensor per broadcast, as ``send_weights`` does."""
    return {
        "master_address": master_address,
        "master_port": int(master_port),
        "rank_offset": int(rank_offset),
        "world_size": int(world_size),
        "packed": False,
    }


def update_payload(metadata: Sequence[WeightMetadata]) -> dict[str, Any]:
    """``update_weights``' argument: the announced tensors in send order, under the Hugging Face
    names the engine loads (RLModule names lose their ``causal_lm.`` prefix)."""
    return {
        "names": [engine_name(name) for name, _, _ in metadata],
        "dtype_names": [dtype_name for _, dtype_name, _ in metadata],
        "shapes": [[int(size) for size in shape] for _, _, shape in metadata],
    }


def join_group(
    collective_rpc: Callable[..., Any], master_address: str, master_port: int, rank_offset: int, world_size: int
) -> None:
    """The engine's side of forming the group (blocks until learner rank 0 joins)."""
    collective_rpc(
        "init_weight_transfer_engine", args=(init_payload(master_address, master_port, rank_offset, world_size),)
    )


def receive_round(collective_rpc: Callable[..., Any], metadata: Sequence[WeightMetadata]) -> None:
    """The engine's side of one round (``update_weights`` blocks until the learners have sent).

    vLLM's worker ends the session itself when ``update_weights`` fails, so an error needs no
    ``finish_weight_update`` here (vLLM would refuse it as unmatched).
    """
    collective_rpc("start_weight_update")
    collective_rpc("update_weights", args=(update_payload(metadata),))
    collective_rpc("finish_weight_update")


__all__ = [
    "WEIGHT_TRANSFER_CONFIG",
    "init_payload",
    "join_group",
    "receive_round",
    "update_payload",
    "weight_transfer_api_available",
]
