"""Cutting a learner's batch into what one forward pass holds: padding trimmed, token-budget micro-batches.

Pure torch over the learner's ``(B, P+R)`` / ``(B, R)`` columns (see ``dapo_rl.training``).
"""

from __future__ import annotations

import torch

__all__ = ["token_budget_micro_batches", "trim_padding"]


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no row of ``batch`` uses: left of the longest prompt, right of the
    longest response. Row-wise columns (B,) pass through."""
    if len(batch["input_ids"]) == 0:
        return dict(batch)
    response_mask = batch["response_mask"]
    prompt_width = batch["input_ids"].shape[1] - response_mask.shape[1]
    response_width = max(1, int(response_mask.sum(dim=1).max()))
    left_pad = prompt_width - int(batch["attention_mask"][:, :prompt_width].sum(dim=1).max())
    trimmed = dict(batch)
    for key in ("input_ids", "attention_mask", "position_ids"):
        trimmed[key] = batch[key][:, left_pad : prompt_width + response_width]
    for key in ("response_mask", "token_mask", "old_logprobs", "importance_weights"):
        if key in batch:
            trimmed[key] = batch[key][:, :response_width]
    return trimmed


def token_budget_micro_batches(batch: dict[str, torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """Row indices of micro-batches holding at most ``max_tokens`` padded tokens each.

    Rows are taken longest first, so rows of similar length share a micro-batch (little padding);
    a micro-batch's cost is its row count times its longest row (prompt and response, unpadded).
    A single row longer than the budget gets a micro-batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = batch["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    micro_batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row in order.tolist():
        length = int(lengths[row])
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            micro_batches.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, length)
    if current:
        micro_batches.append(current)
    return [torch.as_tensor(rows, dtype=torch.long) for rows in micro_batches]
