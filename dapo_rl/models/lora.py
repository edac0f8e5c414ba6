"""LoRA adapters on a Hugging Face causal LM, through ``peft`` (the ``lora`` extra). No Ray import.

:func:`add_lora` injects the adapters *in place*: the model object keeps its class and its
``get_decoder()`` / ``get_output_embeddings()``, so the log-prob code (:mod:`dapo_rl.models.policy`)
runs on it unchanged; each adapted ``nn.Linear`` becomes peft's LoRA layer, whose parameters are
named ``<layer>.base_layer.weight`` (frozen) and ``<layer>.lora_A.default.weight`` /
``lora_B`` (trained). The returned :class:`peft.PeftModel` wraps the same object; keep it for
``disable_adapter()`` (the reference policy of the KL penalty) and ``save_pretrained`` (the adapter
folder).

:func:`merged_state_dict` gives the weights with the adapters folded in, under the plain model's
names, without changing the model: what a generator holding the plain model loads.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PreTrainedModel

from dapo_rl.settings import LORA_DEFAULTS

#: Key of the adapter in peft's parameter names.
ADAPTER_NAME = "default"


def lora_config(settings: dict[str, Any]) -> Any:
    """peft's ``LoraConfig`` of a checked ``lora`` model_config entry (``dapo_rl.settings.lora_problems``)."""
    from peft import LoraConfig

    values = {**LORA_DEFAULTS, **settings}
    return LoraConfig(
        r=int(values["r"]),
        lora_alpha=float(values["alpha"]),
        target_modules=values["target_modules"],
        lora_dropout=float(values["dropout"]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: PreTrainedModel, settings: dict[str, Any]) -> Any:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns the PeftModel.

    Raises ValueError when the output head would be adapted: the chunked log-prob kernel reads the
    head's weight directly and would silently skip its adapter.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(model, lora_config(settings))
    if isinstance(model.get_output_embeddings(), LoraLayer):
        raise ValueError(
            "lora target_modules adapt the output head: dapo-rl's log-prob kernel reads the head's weight "
            "directly, so its adapter would be skipped; leave the head out of target_modules"
        )
    return peft_model


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict or parameter name is a LoRA adapter weight."""
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".lora_magnitude" in name


def merged_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with its adapters merged in, under the plain model's names.

    ``prefix`` is where the LoRA'd model sits in ``model`` (e.g. ``"causal_lm."``); names outside it
    are kept as they are. The model is not changed (the merged tensors are new ones).
    """
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and not module.disable_adapters:
                for adapter in module.active_adapters:
                    key = f"{name}.base_layer.weight"
                    delta = module.get_delta_weight(adapter)
                    deltas[key] = deltas[key] + delta if key in deltas else delta
        merged = {}
        for key, value in model.state_dict().items():
            if is_adapter_key(key):
                continue
            plain = key.replace(".base_layer.", ".") if key.startswith(prefix) else key
            merged[plain] = (value + deltas[key].to(value.dtype)) if key in deltas else value
    return merged


def save_adapter(peft_model: Any, folder: str | os.PathLike[str]) -> None:
    """Write the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``): ``PeftModel.
    from_pretrained(base_model, folder)`` loads it onto the base model."""
    peft_model.save_pretrained(os.fspath(folder))


__all__ = ["ADAPTER_NAME", "add_lora", "is_adapter_key", "lora_config", "merged_state_dict", "save_adapter"]
