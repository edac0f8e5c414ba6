"""Policy models: the embedded tiny preset, pretrained presets, and any Hugging Face causal LM in a local folder.

Nothing can be downloaded here, so the default model is built locally: a small Qwen2-architecture
model with random weights (the real Qwen2 code path, so everything that works on it works on a
Qwen2.5 checkpoint) and a character-level tokenizer built with the ``tokenizers`` library. A
pretrained preset (``list_presets()``) or a path to a ``.gguf`` file is converted once into a cached
model folder (see :mod:`dapo_rl.models.presets`). A real checkpoint is loaded from a local path with
``local_files_only=True``.

No Ray import: this module is used on GPU machines where Ray is not installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

# The preset names and the model-not-found errors are defined in dapo_rl.models.presets (which must not
# import this module); callers keep importing TINY_PRESET and ModelNotFoundError from here.
from dapo_rl.models.presets import TINY_PRESET, ModelNotFoundError, converted_model_folder, is_gguf_model, list_presets

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny preset: small enough to train on 2 CPU cores in minutes."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def build_char_tokenizer() -> Qwen2Tokenizer:
    """A byte-level tokenizer with no merges: one token per byte, so one per ASCII character.

    It is a ``Qwen2Tokenizer`` (byte-level BPE with an empty merge list) rather than a custom class
    because ``AutoTokenizer`` re-creates the class registered for the config's ``model_type`` when it
    loads a folder: a Qwen2 model folder is read back as ``Qwen2Tokenizer``, so only a tokenizer of
    that class survives the round trip unchanged. Bytes cover any Unicode input (Chinese problems
    in DAPO-Math-17k included), with 258 tokens in all.
    """
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([EOS_TOKEN, PAD_TOKEN, *byte_alphabet])}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=EOS_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def tiny_model_config(tokenizer: PreTrainedTokenizerBase, spec: TinyModelSpec | None = None) -> Qwen2Config:
    """The Qwen2 config of the tiny preset, sized to the tokenizer's vocabulary."""
    spec = spec or TinyModelSpec()
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **spec.extra,
    )


def build_tiny_model(seed: int = 0, spec: TinyModelSpec | None = None) -> tuple[PreTrainedModel, Qwen2Tokenizer]:
    """The embedded preset: a randomly initialised tiny Qwen2 model and its character tokenizer."""
    tokenizer = build_char_tokenizer()
    config = tiny_model_config(tokenizer, spec)
    # Seed only the initialisation, and restore the caller's RNG afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def load_policy(
    model: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    tiny_spec: dict[str, Any] | None = None,
    on_meta: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for a preset name, a ``.gguf`` file or a local Hugging Face model folder.

    Args:
        model: ``"tiny-qwen2"`` (the embedded preset, random weights seeded by ``seed``); a
            pretrained preset such as ``"smollm2-135m-instruct"`` or a path to a ``.gguf`` file
            (converted once into a cached folder, see :func:`resolve_model_folder`); or a path to a
            folder holding ``config.json``, weights and a tokenizer.
        dtype: torch dtype (or its name, e.g. ``"bfloat16"``) for a checkpoint; the preset is float32
            unless given.
        tiny_spec: overrides of :class:`TinyModelSpec` fields for the preset.
        on_meta: build the architecture on the meta device, without weights or memory (sharded
            learners other than rank 0, which receive their shards from rank 0's weights).
    """
    torch_dtype = _as_dtype(dtype)
    if on_meta:
        if str(model) == TINY_PRESET:
            tokenizer = build_char_tokenizer()
            config = tiny_model_config(tokenizer, TinyModelSpec(**(tiny_spec or {})))
        else:
            path = resolve_model_folder(model)
            tokenizer, config = load_tokenizer(path), AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            policy = AutoModelForCausalLM.from_config(config)
        return policy.to(torch_dtype) if torch_dtype is not None else policy, tokenizer
    if str(model) == TINY_PRESET:
        policy, tokenizer = build_tiny_model(seed=seed, spec=TinyModelSpec(**(tiny_spec or {})))
        if torch_dtype is not None:
            policy = policy.to(torch_dtype)
        return policy, tokenizer
    path = resolve_model_folder(model)
    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    policy = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return policy, tokenizer


def load_tokenizer(model: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer of a preset name, a ``.gguf`` file or a local model folder, left-padding, with a pad token."""
    if str(model) == TINY_PRESET:
        return build_char_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(model), local_files_only=True)
    if tokenizer.pad_token_id is None:
        # Base checkpoints often ship without a pad token; padding positions are always masked.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resolve_model_folder(model: str | os.PathLike[str]) -> str:
    """The local Hugging Face folder a model setting stands for (not for the tiny preset, built in code).

    A pretrained preset or a ``.gguf`` file resolves to its converted folder in the cache,
    converting it on first use (:func:`dapo_rl.models.presets.converted_model_folder`); a folder path
    resolves to itself once it is seen to hold a ``config.json``. Anything that needs a folder
    rather than a loaded model (a vLLM engine) takes this.

    Raises:
        ModelNotFoundError: nothing of that name, or (subclasses) what to install to get it.
    """
    if str(model) == TINY_PRESET:
        raise ModelNotFoundError(
            f"the preset {TINY_PRESET!r} is built in code and has no folder (save_policy writes one)"
        )
    if is_gguf_model(model):
        return os.fspath(converted_model_folder(model))
    path = os.fspath(model)
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(
            f"model {str(model)!r} is neither a preset ({', '.join(list_presets())}), a .gguf file, nor a local "
            f"model folder with a config.json (nothing is downloaded: give a path to a Hugging Face model folder)"
        )
    problem = model_folder_problem(path)
    if problem is not None:
        raise ModelNotFoundError(problem)
    return path


#: Weight files of a Hugging Face folder: one file, or an index naming its shards.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_folder_problem(folder: str | os.PathLike[str]) -> str | None:
    """What a model folder lacks to load (its weights, a shard its index names, its tokenizer), or None."""
    folder = os.fspath(folder)
    present = set(os.listdir(folder))
    index = next((name for name in WEIGHT_INDEXES if name in present), None)
    if index is not None:
        try:
            with open(os.path.join(folder, index), encoding="utf-8") as file:
                shards = sorted(set(json.load(file)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            return f"model folder {folder}: {index} is unreadable ({type(error).__name__}: {error})"
        missing = [shard for shard in shards if shard not in present]
        if missing:
            return f"model folder {folder}: {index} names weight file(s) that are missing: {', '.join(missing)}"
    elif not present & set(WEIGHT_FILES):
        return f"model folder {folder} has no weights (none of {', '.join(WEIGHT_FILES + WEIGHT_INDEXES)})"
    if not present & set(TOKENIZER_FILES):
        return f"model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
    return None


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward (training mode only), non-reentrant."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike[str]) -> None:
    """Write a Hugging Face model folder that ``AutoModelForCausalLM.from_pretrained`` loads."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
    return resolved
