"""DAPOTorchLearner: the DAPO loss on RLlib's TorchLearner, and nothing else.

Exactness of the token-level loss across learners: each mini-batch row carries the mini-batch's
global normaliser (``loss_normalizer``, e.g. its total token count). RLlib shards the rows across
``num_learners`` and torch DDP *averages* the gradients, so every learner multiplies its
shard's loss by the world size: the average of ``world · Σ_shard / N_global`` over shards is
``Σ_all / N_global``, the mini-batch's token mean, exactly. RLlib likewise averages logged metrics
over learners, so the logged loss is the scaled one and per-token metrics (clip fractions, KL,
entropy) are weighted by the shard's share of the mini-batch's tokens (``loss_tokens``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from dapo_rl.core import policy_loss
from dapo_rl.training import token_budget_micro_batches, trim_padding


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shard_rows(num_rows: int, num_shards: int, shard: int) -> slice:
    """The rows RLlib gives learner ``shard`` of ``num_shards`` (same split as its ShardBatchIterator)."""
    size = -(-num_rows // num_shards)
    return slice(shard * size, min((shard + 1) * size, num_rows))


class DAPOTorchLearner(TorchLearner):
    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        module = self._module[module_id]
        params = self.get_parameters(module)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.register_optimizer(
            module_id=module_id,
            optimizer=optimizer,
            params=params,
            lr_or_lr_schedule=config.lr_schedule(),
        )

    def build(self) -> None:
        super().build()
        # Loss parts of the update in progress: one per micro-batch; logged once per update.
        self._loss_parts: list[tuple[float, dict[str, float], float]] = []

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any], fwd_out: dict[str, Any]):
        token_mask = batch["token_mask"]
        loss, metrics = policy_loss(
            fwd_out["logprobs"],
            batch["old_logprobs"],
            batch["advantages"],
            token_mask,
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            dual_clip=config.dual_clip,
            agg=config.loss_agg,
            normalizer=float(batch["loss_normalizer"][0]) if len(token_mask) else 0.0,
        )
        # DDP averages gradients over learners; the normaliser is already global (see module doc).
        loss = loss * _world_size()
        if "entropy" in fwd_out and metrics["num_tokens"] > 0:
            metrics["entropy"] = float(fwd_out["entropy"].detach()[token_mask.bool()].mean())
        mini_batch_tokens = float(batch["loss_tokens"][0]) if "loss_tokens" in batch and len(token_mask) else None
        self._loss_parts.append((float(loss.detach()), metrics, mini_batch_tokens))
        return loss

    def _log_loss_metrics(self, module_id: str) -> None:
        """Log the update's loss (the sum of its micro-batches') and its token-weighted metrics.

        RLlib averages a metric over learners: the loss is already scaled by the world size, and
        per-token means are weighted by this learner's share of the mini-batch's tokens, so the
        averages are the mini-batch's values.
        """
        parts, self._loss_parts = self._loss_parts, []
        if not parts:
            return
        world = _world_size()
        local_tokens = sum(metrics["num_tokens"] for _, metrics, _ in parts)
        global_tokens = parts[0][2] if parts[0][2] is not None else local_tokens * world
        self.metrics.log_value((module_id, "policy_loss"), sum(loss for loss, _, _ in parts), window=1)
        self.metrics.log_value((module_id, "num_tokens"), local_tokens, reduce="sum")
        if global_tokens <= 0 or local_tokens <= 0:
            return  # a mini-batch without loss tokens has no per-token metrics
        names = [name for name in parts[0][1] if name != "num_tokens"]
        for name in names:
            local_sum = sum(metrics.get(name, 0.0) * metrics["num_tokens"] for _, metrics, _ in parts)
            self.metrics.log_value((module_id, name), local_sum * world / global_tokens, window=1)

    def _uncompiled_update(self, batch: dict, **kwargs: Any):
        """One optimizer step; with ``micro_batch_tokens`` set, over token-budget micro-batches.

        The micro-batches' gradients accumulate before the one clip-and-step; each carries the
        mini-batch's global normaliser, so the accumulated gradient is the whole mini-batch's exactly.
        Under DDP only the last backward synchronises (each learner runs exactly one synced
        backward, whatever its number of micro-batches).
        """
        budget = self.config.micro_batch_tokens
        module_batch = batch[DEFAULT_MODULE_ID]
        micro_batches = token_budget_micro_batches(module_batch, budget) if budget else []
        if len(micro_batches) <= 1:
            result = super()._uncompiled_update(batch, **kwargs)
            self._log_loss_metrics(DEFAULT_MODULE_ID)
            return result
        self._compute_off_policyness(batch)
        for optimizer in self._optimizer_parameters:
            optimizer.zero_grad(set_to_none=True)
        module = self.module[DEFAULT_MODULE_ID]
        distributed = self.config.num_learners > 1
        for index, rows in enumerate(micro_batches):
            micro = {DEFAULT_MODULE_ID: trim_padding({key: value[rows] for key, value in module_batch.items()})}
            synchronise = not distributed or index == len(micro_batches) - 1
            with contextlib.nullcontext() if synchronise else module.no_sync():
                fwd_out = self.module.forward_train(micro)
                loss_per_module = self.compute_losses(fwd_out=fwd_out, batch=micro)
                sum(loss_per_module.values()).backward()
        gradients = {param_id: param.grad for param_id, param in self._params.items()}
        with contextlib.ExitStack() as stack:
            if distributed:
                stack.enter_context(module.no_sync())
            self.apply_gradients(self.postprocess_gradients(gradients))
        self._log_loss_metrics(DEFAULT_MODULE_ID)
        return fwd_out, loss_per_module, {}

    # Called on every learner through LearnerGroup.foreach_learner.
    def compute_old_logprobs(self, batch: dict[str, torch.Tensor], num_shards: int) -> tuple[int, torch.Tensor]:
        """Log-probs of this learner's row shard under the current weights (no grad).

        Returns ``(rank, logprobs (rows, R))``; the driver orders the shards by rank.
        """
        rank = _rank()
        rows = shard_rows(len(batch["input_ids"]), num_shards, rank)
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        device = next(module.parameters()).device
        shard = {key: value[rows] for key, value in batch.items()}
        chunk_rows = self.config.logprob_batch_rows
        was_training = module.training
        module.eval()
        pieces = []
        # Chunks of rows bound the activations held at once (one forward pass per chunk).
        with torch.no_grad():
            for start in range(0, len(shard["input_ids"]), chunk_rows):
                chunk = {key: value[start : start + chunk_rows].to(device) for key, value in shard.items()}
                pieces.append(module.forward_inference(chunk)["logprobs"].cpu())
        module.train(was_training)
        width = shard["response_mask"].shape[1]
        return rank, torch.cat(pieces, dim=0) if pieces else torch.zeros((0, width))


__all__ = ["DAPOTorchLearner", "shard_rows"]
