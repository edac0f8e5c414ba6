"""Sharded data parallelism (FSDP2) for a causal LM: sharding, full-weight gathers, sharded checkpoints.

Pure torch (no Ray import), so the same functions run inside RLlib's learners and in a plain
``torchrun`` job. Every function here except :func:`transformer_blocks` is a *collective* once
the model is sharded: all ranks must call it, in the same order.

Sharding plan (the one verl and torchtitan use): each transformer block is its own FSDP unit
(its parameters are all-gathered just before the block runs and freed after), and a root unit
holds the rest (embeddings, final norm, output head). The root unit is the module whose
``forward`` computes the log-probs, so the output head's weight is gathered around the chunked
log-prob kernel, which reads the weight directly instead of calling the head.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

#: Values of the ``data_parallel`` setting: replicate weights (DDP) or shard them (FSDP2).


def transformer_blocks(causal_lm: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: modules of the classes it lists in ``_no_split_modules``.

    Hugging Face models name their block class there (``Qwen2DecoderLayer``, ...), which is what
    makes this work for any architecture without a per-model table.
    """
    block_classes = set(getattr(causal_lm, "_no_split_modules", None) or ())
    blocks = [module for module in causal_lm.modules() if type(module).__name__ in block_classes]
    if not blocks:
        raise ValueError(
            f"cannot shard {type(causal_lm).__name__}: it names no transformer block class in "
            f"_no_split_modules (got {sorted(block_classes)}), so there is nothing to wrap per block"
        )
    return blocks


def shard_causal_lm(root: nn.Module, causal_lm: nn.Module, *, reshard_after_forward: bool = True) -> None:
    """Shard ``causal_lm``'s parameters over the default process group, in place.

    Args:
        root: the module whose ``forward`` runs the model (it holds ``causal_lm``); it becomes the
            root FSDP unit, owning every parameter outside the transformer blocks.
        causal_lm: the Hugging Face model inside ``root``.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3);
            False keeps them until backward (ZeRO-2: more memory, one all-gather fewer per block).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_causal_lm needs an initialised torch.distributed process group")
    for block in transformer_blocks(causal_lm):
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(root, reshard_after_forward=reshard_after_forward)


def shard_from_rank0(root: nn.Module, causal_lm: nn.Module, device: torch.device | str) -> None:
    """Shard a model whose weights exist on rank 0 only; the other ranks built it on the meta device.

    Rank 0 shards its loaded model; the others shard the empty one and allocate their shards
    (``to_empty``); then rank 0's weights are broadcast, each rank keeping its shard, and so are the
    buffers (e.g. rotary frequencies), which the state dict may not hold. Only rank 0 ever holds the
    whole model in host memory.
    """
    rank = dist.get_rank()
    # All ranks must shard the same dtype: take rank 0's (the others' follows their config alone).
    dtype = [next(causal_lm.parameters()).dtype if rank == 0 else None]
    dist.broadcast_object_list(dtype, src=0)
    full_state = {name: tensor.detach() for name, tensor in causal_lm.state_dict().items()} if rank == 0 else {}
    if rank != 0:
        causal_lm.to(dtype[0])
    shard_causal_lm(root, causal_lm)
    if rank != 0:
        causal_lm.to_empty(device=device)
    set_model_state_dict(
        causal_lm, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    for buffer in causal_lm.buffers():
        dist.broadcast(buffer.data, src=0)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a sharded DTensor."""
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def full_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for each state-dict entry, gathering sharded ones one at a time.

    A collective for sharded modules: every rank must run the generator to its end, in step.
    """
    for name, tensor in module.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full (unsharded) weights on the CPU on rank 0; an empty dict on other ranks.

    One parameter is gathered at a time, so no rank ever holds more than one full tensor on its
    device beyond its own shards.
    """
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, full in full_tensors(module):
        if is_rank0:
            state[name] = full.detach().to("cpu", copy=True)
    return state


def clip_gradients_by_global_norm(gradients: list[torch.Tensor | None], max_norm: float) -> float:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``; return the norm before.

    Works for plain tensors and for sharded DTensors alike: the norm of DTensor gradients is
    reduced over their shards, so every rank computes, and applies, the same coefficient.
    """
    present = [gradient for gradient in gradients if gradient is not None]
    if not present:
        return 0.0
    total = torch.nn.utils.get_total_norm(present)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    total_norm = float(total)
    coefficient = min(1.0, max_norm / (total_norm + 1e-6))
    if coefficient < 1.0:
        for gradient in present:
            gradient.detach().mul_(coefficient)
    return total_norm


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Run backward passes with (or without) DDP's gradient all-reduce.

    Without it, gradients accumulate locally; the last micro-batch's backward runs with it on and
    reduces the accumulated sum. A module without ``no_sync`` (a single learner, or FSDP2 learners,
    which reduce-scatter every backward to keep gradients sharded) is left alone.
    """
    no_sync = getattr(module, "no_sync", None)
    if enabled or no_sync is None:
        yield
        return
    with no_sync():
        yield


def save_sharded(module: nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike[str]) -> None:
    """Write the module's and optimizer's sharded state with torch.distributed.checkpoint.

    Every rank writes its own shards into ``folder`` (on several nodes it must be shared storage);
    the checkpoint loads onto any number of ranks (DCP reshards on load).
    """
    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.fspath(folder))


def load_sharded(module: nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike[str]) -> None:
    """Load what :func:`save_sharded` wrote into the module and its optimizer, sharded or not."""
    if not Path(folder, ".metadata").is_file():
        raise FileNotFoundError(f"no sharded checkpoint at {folder} (its .metadata file is missing)")
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    # Without a process group (one unsharded learner), this process reads every shard.
    dcp.load(state, checkpoint_id=os.fspath(folder), no_dist=not dist.is_initialized())
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_sharded_weights_unsharded(module: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Fill a plain (unsharded) module, in place, with the weights :func:`save_sharded` wrote.

    Runs in one process without a process group (DCP reads every shard), and reads only the weights,
    not the optimizer state: this is how a sharded checkpoint becomes a Hugging Face folder.
    """
    if not Path(folder, ".metadata").is_file():
        raise FileNotFoundError(f"no sharded checkpoint at {folder} (its .metadata file is missing)")
    state = {"model": module.state_dict()}
    dcp.load(state, checkpoint_id=os.fspath(folder), no_dist=True)
    module.load_state_dict(state["model"])


#: Checkpoint sub-folder with the sharded learners' weights and optimizer state (torch DCP format).
SHARDED_STATE_FOLDER = "sharded_learner_state"
#: Checkpoint file naming the shards' folder when they live in ``sharded_checkpoint_dir``.
SHARDED_STATE_POINTER = "sharded_learner_state.json"
#: Shard folders kept in ``sharded_checkpoint_dir`` by default (the newest by save time, besides
#: the folder just written and the one before it; see :func:`finish_sharded_checkpoint`).
SHARDED_CHECKPOINTS_KEPT = 2


def learners_are_sharded(data_parallel: str, num_learners: int | None) -> bool:
    """The one test of whether learners shard the weights (FSDP2) rather than each holding them all."""
    return data_parallel == "fsdp2" and int(num_learners or 0) > 1


def sharded_state_target(checkpoint: str | os.PathLike[str], shared_dir: str | None, iteration: int) -> Path:
    """Where the learners write the shards of a checkpoint being saved.

    Inside the checkpoint, or, with ``shared_dir`` (runs across nodes: Tune persists a checkpoint
    folder from the driver's node only), a new folder there whose name sorts in save-time order
    (not iteration order: a resumed run saves iterations again, after the ones its crash orphaned).
    """
    if not shared_dir:
        return Path(checkpoint, SHARDED_STATE_FOLDER).resolve()
    return Path(shared_dir).resolve() / f"{time.time_ns():020d}-iteration{iteration:06d}"


def finish_sharded_checkpoint(
    checkpoint: str | os.PathLike[str],
    shards: Path,
    shared_dir: str | None,
    *,
    keep: int = SHARDED_CHECKPOINTS_KEPT,
    protect: Path | None = None,
) -> None:
    """After every learner wrote its shards: point the checkpoint at them, then prune old shard folders.

    The pointer is written last, so a checkpoint that names shards always has them complete. Pruning
    keeps the ``keep`` newest folders by save time, the one just written, and ``protect``: the
    shards of the previous checkpoint (saved or restored by this run), which is what a resume needs
    until the checkpoint being written has been persisted by Tune. Folders a crashed run wrote but
    never finished are older than anything written after its resume, so they go first.
    """
    if not shared_dir:
        return
    pointer = Path(checkpoint, SHARDED_STATE_POINTER)
    temporary = pointer.with_suffix(".tmp")
    temporary.write_text(json.dumps({"path": str(shards)}), encoding="utf-8")
    os.replace(temporary, pointer)
    # Only folders named by sharded_state_target: the shared folder may hold other things.
    folders = sorted(path for path in Path(shared_dir).resolve().glob("[0-9]*-iteration[0-9]*") if path.is_dir())
    kept = set(folders[-keep:]) | {shards.resolve()} | ({protect.resolve()} if protect is not None else set())
    for old in folders:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def sharded_state_folder(checkpoint: str | os.PathLike[str]) -> Path | None:
    """Where a checkpoint's learner shards are (its own sub-folder, or the shared folder it names);
    None for a checkpoint of unsharded learners."""
    pointer = Path(checkpoint, SHARDED_STATE_POINTER)
    if pointer.is_file():
        return Path(json.loads(pointer.read_text(encoding="utf-8"))["path"])
    folder = Path(checkpoint, SHARDED_STATE_FOLDER)
    return folder.resolve() if folder.is_dir() else None


__all__ = [
    "SHARDED_CHECKPOINTS_KEPT",
    "SHARDED_STATE_FOLDER",
    "SHARDED_STATE_POINTER",
    "finish_sharded_checkpoint",
    "learners_are_sharded",
    "sharded_state_folder",
    "sharded_state_target",
    "load_sharded_weights_unsharded",
    "clip_gradients_by_global_norm",
    "full_state_dict",
    "full_tensors",
    "gradient_sync",
    "is_sharded",
    "load_sharded",
    "save_sharded",
    "shard_causal_lm",
    "shard_from_rank0",
    "transformer_blocks",
]
