"""Sharing one prompt's key/value cache among the responses sampled from it. No Ray import.

A DAPO group is G responses to one prompt. Both generation and the log-prob passes can run the
prompt through the model once and let each response attend to that prompt's cached keys and
values: the same arithmetic as G full forwards (causal attention never lets a prompt token see a
response), with about G times less prompt work.
"""

from __future__ import annotations

import inspect
import warnings

import torch

#: Architectures (``config.model_type``) on which sharing a prompt's cache is verified to give the
#: same log-probs, gradients and samples as a forward per response (tests/test_shared_prompt.py,
#: with sliding-window and mixed sliding/full layers where the architecture has them). Any other
#: model runs one forward per response: a wrong cache (a recurrent or linear-attention layer kept in
#: a plain key/value cache) would give wrong log-probs without an error.
SHARED_PROMPT_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text"})
#: Attention layer kinds a plain per-layer key/value cache holds correctly (``config.layer_types``).
SHARED_PROMPT_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})

_reported: set[str] = set()


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` (and ``generate``) takes a KV cache.

    transformers 5.x renamed ``past_key_values`` to ``cache`` and warns on the old name; 4.x
    knows only the old one.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of a left-padded prompt block, and which of them each row is.

    Args:
        prompt_ids: (B, P) token ids; prompt_mask: (B, P), 1 at real tokens.

    Returns:
        ``(first_rows, inverse)``: (U,) the index of one row holding each distinct prompt, and
        (B,) for each row the position of its prompt in ``first_rows``. Rows are compared on ids
        and mask together, so a prompt that happens to begin with the pad id is not confused with
        a shorter, padded one.
    """
    keys = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    distinct = int(inverse.max()) + 1 if inverse.numel() else 0
    rows = torch.arange(inverse.numel(), device=inverse.device)
    # The smallest row index per distinct prompt (scatter_reduce "amin" over the inverse map).
    first_rows = torch.full((distinct,), inverse.numel(), dtype=torch.long, device=inverse.device)
    first_rows = first_rows.scatter_reduce(0, inverse, rows, reduce="amin")
    return first_rows, inverse


def shared_prompt_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot share a prompt's KV cache among its responses (None when it can).

    Checked: the architecture is one verified here (:data:`SHARED_PROMPT_ARCHITECTURES`), and every
    layer is an attention layer whose keys and values a plain cache holds (no linear-attention,
    convolution or state-space layer).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - SHARED_PROMPT_LAYER_TYPES:
        return f"its layer types {sorted(layer_types - SHARED_PROMPT_LAYER_TYPES)} are not plain attention"
    if model_type not in SHARED_PROMPT_ARCHITECTURES:
        return (
            f"architecture {model_type!r} has not been verified with a shared prompt cache (verified: "
            f"{', '.join(sorted(SHARED_PROMPT_ARCHITECTURES))})"
        )
    return None


def can_share_prompt(model: torch.nn.Module) -> bool:
    """Whether ``model`` may share a prompt's KV cache; the first refusal per architecture is said
    once (a warning naming the reason), then the plain path runs silently."""
    reason = shared_prompt_unsupported(model)
    if reason is None:
        return True
    key = f"{getattr(getattr(model, 'config', None), 'model_type', None)}: {reason}"
    if key not in _reported:
        _reported.add(key)
        warnings.warn(
            f"share_prompt_forward: {reason}; running one forward per response instead "
            "(same results, more prompt work)",
            stacklevel=3,
        )
    return False
