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

from typing import Any

import torch
import torch.distributed as dist
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from dapo_rl.core import policy_loss


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
        world = _world_size()
        loss = loss * world
        # RLlib averages a metric over learners. Scaled so that the average is the mini-batch's value:
        # the loss by the world size (as above), per-token means by this shard's share of the tokens.
        local_tokens = metrics.pop("num_tokens")
        global_tokens = float(batch["loss_tokens"][0]) if "loss_tokens" in batch and len(token_mask) else local_tokens * world
        self.metrics.log_value((module_id, "num_tokens"), local_tokens, reduce="sum")
        self.metrics.log_value((module_id, "policy_loss"), float(loss.detach()), window=1)
        if global_tokens > 0:  # a mini-batch without loss tokens has no per-token metrics
            share = local_tokens * world / global_tokens
            if "entropy" in fwd_out:
                mask = token_mask.bool()
                metrics["entropy"] = float(fwd_out["entropy"].detach()[mask].mean()) if mask.any() else 0.0
            for name, value in metrics.items():
                self.metrics.log_value((module_id, name), value * share, window=1)
        return loss

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
