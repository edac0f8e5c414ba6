"""Streaming weight transfer from learner rank 0 to generation engines, over a broadcast collective.

The protocol, independent of the transport: the sender announces the list of ``(name, dtype,
shape)`` it will send (:func:`weight_metadata`), then broadcasts the tensors one by one in that
order (:func:`send_weights`); each receiver allocates one empty tensor per entry, receives into
it and hands it on to its engine (:func:`receive_weights`). One tensor is in flight at a time, so
neither side ever holds a second copy of the model. The transport is any
``broadcast(tensor, src)`` callable: vLLM's PyNccl communicator on GPUs, torch.distributed
(gloo) in the tests. Pure torch, no Ray or vLLM import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

#: ``(name, dtype name, shape)`` of one tensor, in plain types (they cross RPC boundaries).
WeightMetadata = tuple[str, str, tuple[int, ...]]
Broadcast = Callable[[torch.Tensor, int], None]

#: Prefix of the policy's parameters in the RLModule's state dict (``CausalLMModule.causal_lm``);
#: engines know the Hugging Face names without it.
MODULE_PREFIX = "causal_lm."


def engine_name(module_name: str) -> str:
    """The Hugging Face name an engine loads for an RLModule state-dict key."""
    return module_name[len(MODULE_PREFIX) :] if module_name.startswith(MODULE_PREFIX) else module_name


def weight_metadata(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> list[WeightMetadata]:
    """What :func:`send_weights` will send, in order; ``dtype`` overrides each tensor's own."""
    return [
        (name, str(dtype or tensor.dtype).removeprefix("torch."), tuple(int(size) for size in tensor.shape))
        for name, tensor in named_tensors
    ]


def send_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: list[WeightMetadata],
    broadcast: Broadcast,
    *,
    device: torch.device | str,
) -> int:
    """Broadcast the tensors from rank 0 in the order of ``metadata``; return the bytes sent.

    ``named_tensors`` may be a generator (e.g. gathering one sharded parameter at a time); each
    tensor is cast to its announced dtype and moved to ``device`` just before it is sent.
    """
    sent = count = 0
    for index, (name, tensor) in enumerate(named_tensors):
        if index >= len(metadata) or metadata[index][0] != name:
            expected = metadata[index][0] if index < len(metadata) else "nothing more"
            raise RuntimeError(f"weight sync out of order: sending {name!r}, announced {expected!r}")
        _, dtype_name, shape = metadata[index]
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"weight sync: {name!r} has shape {tuple(tensor.shape)}, announced {tuple(shape)}")
        outgoing = tensor.detach().to(device=device, dtype=getattr(torch, dtype_name)).contiguous()
        broadcast(outgoing, 0)
        sent += outgoing.numel() * outgoing.element_size()
        count += 1
    if count != len(metadata):
        raise RuntimeError(f"weight sync: sent {count} tensors, announced {len(metadata)}")
    return sent


def receive_weights(
    metadata: list[WeightMetadata], broadcast: Broadcast, *, device: torch.device | str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive the announced tensors one at a time, yielding ``(engine name, tensor)``.

    The consumer must load each tensor before asking for the next (the tensor is not kept).
    """
    for name, dtype_name, shape in metadata:
        incoming = torch.empty(tuple(shape), dtype=getattr(torch, dtype_name), device=device)
        broadcast(incoming, 0)
        yield engine_name(name), incoming


__all__ = ["MODULE_PREFIX", "WeightMetadata", "engine_name", "receive_weights", "send_weights", "weight_metadata"]
