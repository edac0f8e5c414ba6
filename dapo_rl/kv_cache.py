"""Sharing one prompt's key/value cache among the responses sampled from it. No Ray import.

A DAPO group is G responses to one prompt. Both generation and the log-prob passes can run the
prompt through the model once and let each response attend to that prompt's cached keys and
values: the same arithmetic as G full forwards (causal attention never lets a prompt token see a
response), with about G times less prompt work.
"""

from __future__ import annotations

import inspect

import torch


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
