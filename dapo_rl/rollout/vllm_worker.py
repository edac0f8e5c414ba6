"""Methods vLLM mixes into each of its GPU workers (``worker_extension_cls``), for weight sync.

vLLM imports this module by name inside its worker processes and adds the class to the worker's
bases, so ``self`` is a vLLM worker: ``self.device`` is its GPU and ``self.model_runner.model``
the model. The engine calls these methods on every worker through ``LLM.collective_rpc``.

The NCCL methods follow vLLM's RLHF example of 0.10-0.11 (``StatelessProcessGroup`` +
``PyNcclCommunicator``) and need GPUs: not run here. :meth:`load_weights_from_file` is run on
vLLM 0.32.0's CPU build (tests/test_vllm_engine.py). Arguments are plain Python values (names,
dtype names, shapes, paths): they cross vLLM's msgpack RPC.
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

    def load_weights_from_file(self, path: str) -> int:
        """Load the Hugging Face-named tensors of a safetensors file; return how many there were."""
        from safetensors.torch import load_file

        tensors = load_file(path, device=str(self.device))
        return load_checkpoint_weights(self.model_runner, list(tensors.items()))


def load_checkpoint_weights(model_runner: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Load checkpoint-format (Hugging Face-named) weights into a running engine's model.

    ``model.load_weights`` maps the names onto vLLM's layout (q/k/v -> qkv_proj, gate/up ->
    gate_up_proj; a tied lm_head is skipped) but writes into the parameters as they were at load
    time. vLLM's CPU build repacks each linear layer's weight after loading (oneDNN / packed GEMM;
    the parameter is left empty: "Attempted to load weight ... into parameter (torch.Size([0]))"),
    so a second load must go through ``reload_weights`` (vLLM >= 0.14), which rebuilds each layer,
    loads it and repacks it. Older versions (GPU builds only) have no repacking: plain load.
    """
    reload = getattr(model_runner, "reload_weights", None)
    if reload is None:
        model_runner.model.load_weights(weights=weights)
        return len(weights)
    reload(weights_iterator=iter(weights), is_checkpoint_format=True)
    _rebind_cpu_gemm_to_kept_weights(model_runner.model)
    return len(weights)


def _rebind_cpu_gemm_to_kept_weights(model: torch.nn.Module) -> None:
    """CPU build: rebuild the GEMM of layers that keep their weight (the embedding, hence a tied lm_head).

    vLLM 0.32's reload copies the new values into the layer's original weight tensor and drops the
    temporary one it loaded and packed them from; the embedding's oneDNN matmul (the tied lm_head's
    logits) is built on that temporary tensor. Seen here: an update without ``lm_head.weight`` (as
    Hugging Face checkpoints store tied models) leaves the engine's greedy output different from
    Hugging Face's on the same weights until the matmul is rebuilt on the kept weight
    (tests/test_vllm_engine.py). Layers that dropped their weight (linear layers: an empty
    parameter) packed their own copy and need nothing.
    """
    rebuilt = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel():
            if rebuilt == 0:
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            rebuilt += 1


__all__ = ["WeightSyncWorkerExtension", "load_checkpoint_weights"]
