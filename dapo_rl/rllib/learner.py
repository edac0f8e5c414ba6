"""DAPOTorchLearner: RLlib's TorchLearner with DAPO's loss, and the collectives the driver calls on it.

What this file holds, in order:

- the optimizer (AdamW, linear warm-up in optimizer steps) and the loss (``dapo_rl.core.policy_loss``);
- one update over token-budget micro-batches with exact gradient accumulation;
- skipping an update whose loss or gradients are not finite (``apply_gradients``);
- old log-probs of the learner's row shard (``compute_old_logprobs``);
- sharded (FSDP2) learners: building, gradient clipping, and their state (``gather_weights``,
  ``save_sharded_state``, ``load_sharded_state``);
- streaming weights to vLLM engines from rank 0 (``engine_*``, ``broadcast_weights_to_engines``).

Exactness of the token-level loss across learners: each mini-batch row carries the mini-batch's
global normaliser (``loss_normalizer``, e.g. its total token count). RLlib shards the rows across
``num_learners`` and torch DDP *averages* the gradients, so every learner multiplies its
shard's loss by the world size: the average of ``world · Σ_shard / N_global`` over shards is
``Σ_all / N_global``, the mini-batch's token mean, exactly. RLlib likewise averages logged metrics
over learners, so the logged loss is the scaled one and per-token metrics (clip fractions, KL,
entropy) are weighted by the shard's share of the mini-batch's tokens (``loss_tokens``). The one
aggregation that is not global, "token-mean-legacy", normalises each micro-batch on its own
(``dapo_rl.core.losses.piece_normalizer``) and is not scaled.

Sharded learners (``data_parallel="fsdp2"``): no single learner can hand RLlib the module's or the
optimizer's state, so ``get_state`` leaves them out and the driver calls the collective methods on
every learner instead. FSDP2 gathers each block's weights in every forward pass, so every learner
must run the same number of forward passes: updates and old-log-prob passes pad the learners
with fewer micro-batches or chunks with passes that contribute nothing.
"""

from __future__ import annotations

import copy
import math
import socket
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.rllib.core import COMPONENT_OPTIMIZER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO
from ray.rllib.utils.torch_utils import clip_gradients

from dapo_rl.core.kl import kl_loss
from dapo_rl.core.losses import piece_normalizer, policy_loss
from dapo_rl.core.micro_batches import token_budget_micro_batches, trim_padding
from dapo_rl.models.distributed import (
    clip_gradients_by_global_norm,
    full_state_dict,
    full_tensors,
    gradient_sync,
    learners_are_sharded,
    load_sharded,
    save_sharded,
)
from dapo_rl.rllib.threads import use_process_threads
from dapo_rl.rollout.vllm_backend import learner_broadcaster
from dapo_rl.rollout.weight_sync import WeightMetadata, send_weights, weight_metadata

#: Micro-batch column: its rows / the learner's rows of the mini-batch (for per-piece aggregations).
PIECE_ROW_SHARE = "piece_row_share"

#: Learner metric: updates skipped for a non-finite loss or gradient (summed over an iteration's updates).
NONFINITE_UPDATE_SKIPPED = "nonfinite_update_skipped"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shard_rows(num_rows: int, num_shards: int, shard: int) -> slice:
    """The rows RLlib gives learner ``shard`` of ``num_shards`` (same split as its ShardBatchIterator)."""
    size = -(-num_rows // num_shards)
    return slice(shard * size, min((shard + 1) * size, num_rows))


class DAPOTorchLearner(TorchLearner):
    @property
    def sharded(self) -> bool:
        """Whether the weights are sharded over learners (FSDP2) rather than replicated (DDP)."""
        return learners_are_sharded(self.config.data_parallel, self.config.num_learners)

    def _make_module(self):
        if not self.sharded:
            return super()._make_module()
        # Only rank 0 loads the weights (into host memory); the others build the architecture on
        # the meta device and receive their shards from rank 0. Nothing moves the whole module to
        # the device (a 32B model in float32 would not fit one GPU): fully_shard places each
        # learner's shards there. Before the optimizer is built (Learner.build): sharding replaces
        # the parameters.
        spec = copy.deepcopy(self._module_spec or self.config.get_multi_rl_module_spec())
        if _rank() != 0:
            module_spec = spec.rl_module_specs[DEFAULT_MODULE_ID] if hasattr(spec, "rl_module_specs") else spec
            module_spec.model_config = {**(module_spec.model_config or {}), "init_on_meta": True}
        module = spec.build().as_multi_rl_module()
        module[DEFAULT_MODULE_ID].shard(self._device)
        return module

    def _make_modules_ddp_if_necessary(self) -> None:
        if not self.sharded:
            super()._make_modules_ddp_if_necessary()

    def _get_clip_function(self):
        if not self.sharded:
            return clip_gradients

        def clip(gradients: dict, *, grad_clip: float | None = None, grad_clip_by: str = "global_norm"):
            # RLlib's global norm would add up DTensor shards as if they were whole tensors.
            if grad_clip is None:
                return None
            return clip_gradients_by_global_norm(list(gradients.values()), grad_clip)

        return clip

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        module = self._module[module_id]
        # Trained parameters only: with LoRA the adapters (the frozen base weights get no optimizer state).
        params = [param for param in self.get_parameters(module) if param.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.register_optimizer(
            module_id=module_id,
            optimizer=optimizer,
            params=params,
            lr_or_lr_schedule=config.lr_schedule(),
        )

    def build(self) -> None:
        if int(self.config.num_learners or 0) > 0 and not self.config.num_gpus_per_learner:
            # A remote CPU learner's process is its own: as many torch threads as the CPUs it holds.
            # (A local learner lives in the Tune trial's process, sized by dapo_rl.jobs.driver.)
            use_process_threads(self.config.num_cpus_per_learner)
        super().build()
        # Loss parts of the update in progress: one per micro-batch; logged once per update.
        self._loss_parts: list[tuple[float, dict[str, float], float]] = []
        # (policy-gradient term, KL term) of each micro-batch, when kl_coef > 0.
        self._kl_parts: list[tuple[float, float]] = []
        if self.config.kl_coef > 0:
            # The reference policy of the KL penalty: the weights the learner starts from (before any
            # update, and before a checkpoint's weights are restored into the policy).
            self.module[DEFAULT_MODULE_ID].unwrapped().make_reference(in_loss=self.config.kl_placement == "loss")

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any], fwd_out: dict[str, Any]):
        token_mask = batch["token_mask"]
        normalizer, scale_by_world_size = piece_normalizer(
            token_mask,
            config.loss_agg,
            minibatch_normalizer=float(batch["loss_normalizer"][0]) if len(token_mask) else 0.0,
            piece_row_share=float(batch[PIECE_ROW_SHARE][0]) if PIECE_ROW_SHARE in batch and len(token_mask) else 1.0,
            max_len=config.max_response_length,
        )
        loss, metrics = policy_loss(
            fwd_out["logprobs"],
            batch["old_logprobs"],
            batch["advantages"],
            token_mask,
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            dual_clip=config.dual_clip,
            agg=config.loss_agg,
            normalizer=normalizer,
            importance_weights=batch.get("importance_weights"),
        )
        if config.kl_coef > 0 and config.kl_placement == "loss":
            # The same aggregation and normaliser as the policy loss: exact under any split.
            kl_term, kl_metrics = kl_loss(
                fwd_out["logprobs"],
                fwd_out["ref_logprobs"],
                token_mask,
                coef=config.kl_coef,
                estimator=config.kl_estimator,
                agg=config.loss_agg,
                normalizer=normalizer,
            )
            metrics["ref_kl"] = kl_metrics["kl"]
            world = _world_size() if scale_by_world_size else 1
            self._kl_parts.append((float(loss.detach()) * world, float(kl_term.detach()) * world))
            loss = loss + kl_term
        if scale_by_world_size:
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
        kl_parts, self._kl_parts = self._kl_parts, []
        if not parts:
            return
        if kl_parts:
            # The KL term of the loss, and its share of the loss's magnitude |kl| / (|pg| + |kl|).
            pg_total = sum(pg for pg, _ in kl_parts)
            kl_total = sum(kl for _, kl in kl_parts)
            share = abs(kl_total) / (abs(pg_total) + abs(kl_total)) if pg_total or kl_total else 0.0
            self.metrics.log_value((module_id, "ref_kl_loss"), kl_total, window=1)
            self.metrics.log_value((module_id, "ref_kl_loss_share"), share, window=1)
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
        DDP learners all-reduce only in the last backward. Sharded (FSDP2) learners reduce-scatter in
        every backward, so that gradients stay sharded (an unsharded accumulation would need a full
        copy of the gradients on every learner); they first agree on the number of micro-batches.
        """
        budget = self.config.micro_batch_tokens
        module_batch = batch[DEFAULT_MODULE_ID]
        num_rows = len(module_batch["token_mask"])
        micro_batches = token_budget_micro_batches(module_batch, budget) if budget else [torch.arange(num_rows)]
        if len(micro_batches) <= 1 and not self.sharded:
            result = super()._uncompiled_update(batch, **kwargs)
            self._log_loss_metrics(DEFAULT_MODULE_ID)
            return result
        # (rows, carries loss): padding passes reuse row 0 with an empty token mask.
        passes = [(rows, True) for rows in micro_batches]
        if self.sharded:
            passes += [(torch.zeros(1, dtype=torch.long), False)] * (_max_over_learners(len(passes)) - len(passes))
        self._compute_off_policyness(batch)
        for optimizer in self._optimizer_parameters:
            optimizer.zero_grad(set_to_none=True)
        module = self.module[DEFAULT_MODULE_ID]
        distributed = self.config.num_learners > 1
        for index, (rows, carries_loss) in enumerate(passes):
            micro = trim_padding({key: value[rows] for key, value in module_batch.items()})
            micro[PIECE_ROW_SHARE] = torch.full((len(rows),), len(rows) / max(1, num_rows))
            if not carries_loss:
                micro["token_mask"] = torch.zeros_like(micro["token_mask"])
            synchronise = not distributed or self.sharded or index == len(passes) - 1
            with gradient_sync(module, synchronise):
                fwd_out = self.module.forward_train({DEFAULT_MODULE_ID: micro})
                loss_per_module = self.compute_losses(fwd_out=fwd_out, batch={DEFAULT_MODULE_ID: micro})
                sum(loss_per_module.values()).backward()
        gradients = {param_id: param.grad for param_id, param in self._params.items()}
        with gradient_sync(module, not distributed or self.sharded):
            self.apply_gradients(self.postprocess_gradients(gradients))
        self._log_loss_metrics(DEFAULT_MODULE_ID)
        return fwd_out, loss_per_module, {}

    def apply_gradients(self, gradients_dict: dict) -> None:
        """Step the optimizer, unless this update's loss or any gradient is NaN or infinite.

        RLlib's own handling would zero the bad entries (``nan_to_num``, which also turns inf into
        the largest float) and step anyway, moving every weight on a poisoned gradient and
        corrupting AdamW's moments. Here a non-finite update leaves the weights and the optimizer
        state as they were, and is counted (``nonfinite_update_skipped``); the driver stops the run
        after ``max_consecutive_nonfinite_updates`` in a row. Learners agree on the decision (a
        MIN over the flag), so DDP and FSDP2 learners never step apart.
        """
        gradients = [_local(gradient) for gradient in gradients_dict.values() if gradient is not None]
        # One device-to-host sync for all gradients, not one per parameter (the learner's hot path).
        finite_gradients = not gradients or bool(torch.stack([torch.isfinite(g).all() for g in gradients]).all())
        finite = finite_gradients and all(math.isfinite(loss) for loss, _, _ in self._loss_parts)
        if _world_size() > 1:
            flag = torch.tensor([int(finite)], dtype=torch.long, device=_collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        self.metrics.log_value((DEFAULT_MODULE_ID, NONFINITE_UPDATE_SKIPPED), 0 if finite else 1, reduce="sum")
        if finite:
            super().apply_gradients(gradients_dict)
            return
        for optimizer in self._optimizer_parameters:
            optimizer.zero_grad(set_to_none=True)

    # Called on every learner through LearnerGroup.foreach_learner.
    def compute_old_logprobs(
        self, batch: dict[str, torch.Tensor], num_shards: int, *, reference: bool = False
    ) -> tuple[int, torch.Tensor]:
        """Log-probs of this learner's row shard under the current weights, or with ``reference``
        under the KL penalty's reference policy (no grad).

        Returns ``(rank, logprobs (rows, R))``; the driver orders the shards by rank.
        """
        rank = _rank()
        num_rows = len(batch["input_ids"])
        rows = shard_rows(num_rows, num_shards, rank)
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        device = next(module.parameters()).device
        shard = {key: value[rows] for key, value in batch.items()}
        chunk_rows = self.config.logprob_batch_rows
        num_passes = -(-len(shard["input_ids"]) // chunk_rows)
        if self.sharded:
            # Every learner runs as many forward passes as the largest shard (rank 0's) needs.
            largest_shard = shard_rows(num_rows, num_shards, 0)
            num_passes = -(-(largest_shard.stop - largest_shard.start) // chunk_rows)
        was_training = module.training
        module.eval()
        pieces = []
        # Chunks of rows bound the activations held at once (one forward pass per chunk).
        with torch.no_grad():
            for index in range(num_passes):
                start = index * chunk_rows
                source = shard if start < len(shard["input_ids"]) else {key: value[:1] for key, value in batch.items()}
                chunk = {
                    key: value[start : start + chunk_rows] if source is shard else value
                    for key, value in source.items()
                }
                on_device = {key: value.to(device) for key, value in chunk.items()}
                if reference:
                    logprobs = module.reference_logprobs(on_device)
                else:
                    logprobs = module.forward_inference(on_device)["logprobs"]
                if source is shard:
                    pieces.append(logprobs.cpu())
        module.train(was_training)
        width = shard["response_mask"].shape[1]
        return rank, torch.cat(pieces, dim=0) if pieces else torch.zeros((0, width))

    # -- state of sharded learners (collectives: the driver calls them on every learner) -------------

    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        if self.sharded:
            # One learner holds only its shards; see save_sharded_state / gather_weights.
            excluded = [COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER]
            not_components = excluded + (
                [not_components] if isinstance(not_components, str) else list(not_components or [])
            )
        return super().get_state(components, not_components=not_components, **kwargs)

    def get_checkpointable_components(self) -> list:
        return [] if self.sharded else super().get_checkpointable_components()

    def gather_weights(self) -> tuple[int, dict[str, Any] | None]:
        """``(rank, state)``: rank 0 gets RLlib's weight state of the full module, the others None."""
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        weights = full_state_dict(module)
        if _rank() != 0:
            return _rank(), None
        return 0, {COMPONENT_RL_MODULE: {DEFAULT_MODULE_ID: weights}, WEIGHTS_SEQ_NO: self._weights_seq_no}

    def save_sharded_state(self, folder: str) -> None:
        """Write this learner's shards of the weights and the optimizer state into ``folder``."""
        save_sharded(self.module[DEFAULT_MODULE_ID].unwrapped(), self._only_optimizer(), folder)

    def load_sharded_state(self, folder: str) -> None:
        load_sharded(self.module[DEFAULT_MODULE_ID].unwrapped(), self._only_optimizer(), folder)
        # New weights: a new version, or runners holding the previous one would skip the sync.
        self._weights_seq_no += 1

    # -- weight sync to vLLM engines (generation_backend="vllm"; collectives over all learners) -----

    def engine_sync_address(self) -> tuple[int, tuple[str, int]]:
        """``(rank, (address, free port))`` for the broadcast group rank 0 will host."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return _rank(), (ray.util.get_node_ip_address(), port)

    def init_engine_weight_sync(self, address: str, port: int, world_size: int) -> None:
        """Rank 0 hosts the group the engines join (their joins must be under way: this blocks)."""
        if _rank() == 0:
            self._engine_broadcast = learner_broadcaster(address, port, world_size, self._device)

    def engine_weight_metadata(self, dtype_name: str) -> list[WeightMetadata]:
        """What :meth:`broadcast_weights_to_engines` sends: every state-dict entry in ``dtype_name``."""
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        return weight_metadata(module.state_dict().items(), getattr(torch, dtype_name))

    def broadcast_weights_to_engines(self, metadata: list[WeightMetadata]) -> int:
        """Stream the full weights from rank 0 to the engines, one tensor at a time.

        Sharded learners all take part: each parameter is gathered (all ranks) just before rank 0
        sends it. Returns the bytes sent (0 on other ranks).
        """
        named_tensors = full_tensors(self.module[DEFAULT_MODULE_ID].unwrapped())
        if _rank() != 0:
            for _ in named_tensors:  # join each gather
                pass
            return 0
        return send_weights(named_tensors, metadata, self._engine_broadcast, device=self._device)

    def _only_optimizer(self) -> torch.optim.Optimizer:
        optimizers = list(self._named_optimizers.values())
        if len(optimizers) != 1:
            raise RuntimeError(f"DAPOTorchLearner expects one optimizer, has {len(optimizers)}")
        return optimizers[0]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharded learners), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _collective_device() -> str:
    """Where a small collective's tensor lives: the GPU for NCCL, the CPU for gloo."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _max_over_learners(value: int) -> int:
    if _world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


__all__ = ["DAPOTorchLearner", "shard_rows"]


def update_was_skipped(learner_results: list[dict[str, Any]]) -> bool:
    """Whether the learners skipped the update for a non-finite loss or gradient.

    Learners decide together (``DAPOTorchLearner.apply_gradients``); a split decision would leave
    their weights apart, so it stops the run.
    """
    skipped = []
    for result in learner_results:
        value = result.get(DEFAULT_MODULE_ID, {}).get(NONFINITE_UPDATE_SKIPPED, 0)
        skipped.append(float(value.peek() if hasattr(value, "peek") else value) > 0)
    if len(set(skipped)) > 1:
        raise RuntimeError(f"learners disagree on skipping a non-finite update (skipped, by learner: {skipped})")
    return bool(skipped) and skipped[0]
