"""Methods vLLM mixes into each of its GPU workers (``worker_extension_cls``), for weight sync.

vLLM imports this module by name inside its worker processes and adds the class to the worker's
bases, so ``self`` is a vLLM worker: ``self.device`` is its GPU and ``self.model_runner.model``
the model. The engine calls these methods on every worker through ``LLM.collective_rpc``.

Written against vLLM's documented RLHF example (``examples/offline_inference/rlhf_utils.py``:
``StatelessProcessGroup`` + ``PyNcclCommunicator``); NOT run here (see README, "Scale-out").
Arguments are plain Python values (names, dtype names, shapes): they cross vLLM's msgpack RPC.
"""

from __future__ import annotations

from typing import Any

import torch

from dapo_rl.rollout.weight_sync import WeightMetadata, receive_weights


class WeightSyncWorkerExtension:
    """Joins learner rank 0's NCCL broadcast group and loads the weights it sends."""

    def init_weight_sync_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        # Learner rank 0 is rank 0; this engine's tensor-parallel workers follow at rank_offset.
        rank = get_world_group().rank + rank_offset
        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size)
        self.weight_sync_communicator = PyNcclCommunicator(group, device=self.device)

    def receive_weights(self, metadata: list[WeightMetadata]) -> int:
        """Receive every announced tensor and load it; return the number loaded."""
        communicator = self.weight_sync_communicator

        def broadcast(tensor: torch.Tensor, src: int) -> None:
            communicator.broadcast(tensor, src=src, stream=torch.cuda.current_stream())

        loaded = 0
        for name, tensor in receive_weights(metadata, broadcast, device=self.device):
            # load_weights maps Hugging Face names onto vLLM's fused layout (e.g. q/k/v -> qkv_proj)
            # and copies into the engine's dtype.
            self.model_runner.model.load_weights(weights=[(name, tensor)])
            loaded += 1
        torch.cuda.synchronize()
        return loaded

    def load_named_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Load weights passed by value through the RPC (small models; no NCCL group needed)."""
        weights = [(name, torch.as_tensor(tensor).to(self.device)) for name, tensor in named_tensors]
        self.model_runner.model.load_weights(weights=weights)
        return len(weights)


__all__ = ["WeightSyncWorkerExtension"]
