"""The RLModule: any Hugging Face causal LM, whose training forward gives response-token log-probs.

``model_config`` keys (set with ``DAPOConfig().rl_module(model_config={...})``):

- ``model`` (required): a local Hugging Face model folder, or a preset name such as ``"tiny-qwen2"``
  (the embedded preset, random init).
- ``init_seed``: seed of the preset's random initialisation (every copy of the module, on learners
  and runners alike, starts identical).
- ``dtype``: torch dtype name for a checkpoint (e.g. ``"bfloat16"``); default: as saved.
- ``tiny_spec``: overrides of :class:`dapo_rl.models.TinyModelSpec` for the preset.
- ``lora``: train LoRA adapters (:mod:`dapo_rl.models.lora`, peft) instead of every weight: a dict of
  ``r``, ``alpha``, ``target_modules``, ``dropout``. Only the learners' (full) modules carry the
  adapters; the generators' (``inference_only``) modules hold the plain model and receive the merged
  weights (:meth:`CausalLMModule.get_state` with ``inference_only=True``). The module's full state
  (checkpoints, ``get_weights``) is the adapter weights alone: the base weights never change, and are
  rebuilt from ``model``.
- ``init_on_meta``: set by sharded learners other than rank 0: build without weights (they arrive
  from rank 0 when the module is sharded).

DAPOConfig adds ``temperature``, ``logprob_chunk_size``, ``compute_entropy``, ``mixed_precision``,
``gradient_checkpointing`` and ``share_prompt_forward`` from its training settings, so log-probs are of the distribution
responses were sampled from.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from ray.rllib.utils.numpy import convert_to_numpy
from transformers import AutoConfig

from dapo_rl.models.distributed import shard_from_rank0
from dapo_rl.models.loading import (
    TINY_PRESET,
    TinyModelSpec,
    enable_activation_checkpointing,
    load_policy,
    save_policy,
)
from dapo_rl.models.policy import ResponseLogprobs
from dapo_rl.models.presets import gguf_context_length, is_gguf_model

#: Observation/action spaces of the module: text in, text out (the module never reads them).
TEXT_SPACE = gym.spaces.Text(max_length=1_000_000)


def model_context_length(model: str, tiny_spec: dict[str, Any] | None = None) -> int | None:
    """Positions the model can attend over, read without loading weights; None when not known
    before the model loads (a preset whose files are not converted yet, an architecture without
    ``max_position_embeddings``)."""
    if model == TINY_PRESET:
        return TinyModelSpec(**(tiny_spec or {})).max_position_embeddings
    if is_gguf_model(model):
        return gguf_context_length(model)
    if os.path.isfile(os.path.join(model, "config.json")):
        return getattr(AutoConfig.from_pretrained(model, local_files_only=True), "max_position_embeddings", None)
    return None


class CausalLMModule(TorchRLModule):
    """Wraps ``AutoModelForCausalLM``; ``forward_train`` returns ``logprobs`` and ``entropy`` (B, R), and
    ``ref_logprobs`` (B, R) once the learner made a reference policy (``kl_coef > 0``)."""

    def setup(self) -> None:
        config: dict[str, Any] = dict(self.model_config or {})
        if not config.get("model"):
            raise ValueError(
                "CausalLMModule needs model_config['model']: a local Hugging Face model folder or a preset name"
            )
        self.causal_lm, self.tokenizer = load_policy(
            config["model"],
            seed=int(config.get("init_seed", 0)),
            dtype=config.get("dtype"),
            tiny_spec=config.get("tiny_spec"),
            on_meta=bool(config.get("init_on_meta", False)),
        )
        self.compute_entropy = bool(config.get("compute_entropy", True))
        # The PeftModel wrapping causal_lm (adapters injected in place), outside the module tree.
        self.__dict__["peft_model"] = None
        if config.get("lora") is not None and not self.inference_only:
            from dapo_rl.models.lora import add_lora

            self.__dict__["peft_model"] = add_lora(self.causal_lm, config["lora"])
        if config.get("gradient_checkpointing"):
            # Recompute each layer's activations in backward instead of holding them (training only).
            enable_activation_checkpointing(self.causal_lm)
        # Kept out of the module tree (``__dict__``, not a submodule) so the state dict keeps the
        # ``causal_lm.`` names and lists each weight once.
        self.__dict__["logprob_forward"] = ResponseLogprobs(
            self.causal_lm,
            temperature=float(config.get("temperature", 1.0)),
            chunk_size=int(config.get("logprob_chunk_size", 1024)),
            mixed_precision=config.get("mixed_precision"),
            share_prompts=bool(config.get("share_prompt_forward", True)),
        )

    def shard(self, device: Any) -> None:
        """Shard the weights over the learners' process group with FSDP2 (``data_parallel="fsdp2"``).

        Rank 0 holds the loaded weights; the other ranks built the module with ``init_on_meta`` and
        receive their shards from it. Call before the optimizer is built: sharding replaces the
        parameters with DTensors on ``device``.
        """
        shard_from_rank0(self.logprob_forward, self.causal_lm, device)

    @property
    def has_reference(self) -> bool:
        """Whether :meth:`make_reference` was called (learners with ``kl_coef > 0``)."""
        return "reference_forward" in self.__dict__

    def make_reference(self, *, in_loss: bool = True) -> None:
        """Keep the current (starting) weights as the reference policy of the KL penalty.

        ``in_loss``: ``forward_train`` adds the reference's log-probs (``kl_placement="loss"``); else
        only :meth:`reference_logprobs` computes them (``kl_placement="reward"``, once per step).

        With LoRA the reference is the base model: the same model with its adapters disabled.

        A frozen deep copy of the model, in eval mode, kept out of the module tree (``__dict__``): it
        is in no state dict, no optimizer, no weight sync and no checkpoint, and DDP does not see it.
        Its log-probs go through the same code as the policy's (:class:`ResponseLogprobs`, same
        temperature, chunking and precision). Learners call this once, after building the module and
        before any update; rebuilt on resume, it is again the starting weights.
        """
        if self.has_reference:
            return
        self.__dict__["reference_in_loss"] = in_loss
        if self.peft_model is not None:
            # The starting weights are the base model's (LoRA's B starts at 0): the same model with
            # its adapters switched off, no second copy.
            self.__dict__["reference_forward"] = self._logprobs_without_adapters
            return
        reference_lm = copy.deepcopy(self.causal_lm)
        reference_lm.requires_grad_(False)
        reference_lm.eval()
        policy = self.logprob_forward
        self.__dict__["reference_forward"] = ResponseLogprobs(
            reference_lm,
            temperature=policy.temperature,
            chunk_size=policy.chunk_size,
            mixed_precision=policy.mixed_precision,
            share_prompts=policy.share_prompts,
        )

    def _logprobs_without_adapters(self, batch: dict[str, Any]) -> tuple[torch.Tensor, None]:
        with self.peft_model.disable_adapter():
            logprobs, _ = self.logprob_forward(batch)
        return logprobs, None

    def reference_logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, R) log-probs of the response tokens under the reference policy (no grad)."""
        with torch.no_grad():
            logprobs, _ = self.__dict__["reference_forward"](batch)
        return logprobs

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        out = self._forward(batch, **kwargs)
        if self.has_reference and self.__dict__["reference_in_loss"]:
            out["ref_logprobs"] = self.reference_logprobs(batch)
        return out

    @property
    def peft_model(self) -> Any:
        """The PeftModel around ``causal_lm`` when LoRA adapters are trained, else None."""
        return self.__dict__.get("peft_model")

    def get_state(
        self, components: Any = None, *, not_components: Any = None, inference_only: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        """RLlib's weight state. With LoRA: the adapter weights alone, or, for the generators
        (``inference_only``), every weight with the adapters merged, under the plain model's names."""
        if self.peft_model is None:
            return super().get_state(components, not_components=not_components, inference_only=inference_only, **kwargs)
        from dapo_rl.models.lora import is_adapter_key, merged_state_dict

        if inference_only:
            return convert_to_numpy(merged_state_dict(self, prefix="causal_lm."))
        return convert_to_numpy({key: value for key, value in self.state_dict().items() if is_adapter_key(key)})

    def set_state(self, state: dict[str, Any]) -> None:
        if self.peft_model is None:
            super().set_state(state)
            return
        from dapo_rl.models.lora import is_adapter_key

        # Adapter weights only: the base weights are the model's own and never trained.
        adapters = {key: value for key, value in state.items() if is_adapter_key(key)}
        expected = {key for key in self.state_dict() if is_adapter_key(key)}
        if set(adapters) != expected:
            raise ValueError(
                f"LoRA module state must hold exactly its {len(expected)} adapter weights; got "
                f"{len(adapters)} (missing {sorted(expected - set(adapters))[:3]}, unexpected "
                f"{sorted(set(adapters) - expected)[:3]}): a checkpoint of another LoRA setting or of full fine-tuning?"
            )
        super().set_state(adapters)

    def save_hf(self, folder: str | os.PathLike[str]) -> None:
        """Write the policy as a Hugging Face model folder; with LoRA, the adapter folder first
        (``folder/adapter``, loadable by ``PeftModel.from_pretrained``), then the merged weights into
        ``folder`` (the adapters are merged into this module's model: call it on a throwaway module)."""
        if self.peft_model is None:
            save_policy(self.causal_lm, self.tokenizer, folder)
            return
        from dapo_rl.models.lora import save_adapter

        save_adapter(self.peft_model, os.path.join(os.fspath(folder), "adapter"))
        save_policy(self.peft_model.merge_and_unload(), self.tokenizer, folder)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        logprobs, entropy = self.logprob_forward(batch, return_entropy=self.compute_entropy)
        out = {"logprobs": logprobs}
        if entropy is not None:
            out["entropy"] = entropy
        return out
