"""Packing prompts and responses into padded ``(batch, tokens)`` tensors.

Layout of one packed batch (P = longest prompt, R = longest response)::

    input_ids   [pad pad p p p | r r r eos pad]     prompts left-padded, responses right-padded
    attention   [ 0   0  1 1 1 | 1 1 1  1   0 ]
    positions   [ 0   0  0 1 2 | 3 4 5  6   6 ]     counted over real tokens only
    response_mask                [ 1 1 1  1   0 ]  (batch, R): which response positions are real

Left-padding the prompts puts every response at the same offset P, so the hidden state that
predicts response token t is always at column ``P - 1 + t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_sequences(
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Pack B prompts and their B responses into one padded batch.

    Args:
        prompt_token_ids: B token-id lists, each non-empty.
        response_token_ids: B token-id lists (may be empty), the EOS token included where the
            response ended by itself.
        pad_token_id: id written at padded positions (never attended to or scored).

    Returns:
        ``input_ids`` (B, P+R) int64, ``attention_mask`` (B, P+R) int64, ``position_ids`` (B, P+R)
        int64, ``response_mask`` (B, R) float32, ``response_lengths`` (B,) int64 and
        ``prompt_lengths`` (B,) int64. P and R are at least 1.
    """
    if len(prompt_token_ids) != len(response_token_ids):
        raise ValueError(
            f"got {len(prompt_token_ids)} prompts but {len(response_token_ids)} responses; they pair one to one"
        )
    for row, prompt in enumerate(prompt_token_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} has no tokens: every response needs at least one token to condition on")
    batch_size = len(prompt_token_ids)
    prompt_width = max((len(p) for p in prompt_token_ids), default=1)
    response_width = max(1, max((len(r) for r in response_token_ids), default=1))

    input_ids = torch.full((batch_size, prompt_width + response_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompt_token_ids, response_token_ids)):
        prompt_start = prompt_width - len(prompt)
        input_ids[row, prompt_start:prompt_width] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, prompt_start:prompt_width] = 1
        if len(response):
            input_ids[row, prompt_width : prompt_width + len(response)] = torch.as_tensor(response, dtype=torch.long)
            attention_mask[row, prompt_width : prompt_width + len(response)] = 1
    # Positions count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    response_mask = attention_mask[:, prompt_width:].to(torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
        "response_lengths": torch.as_tensor([len(r) for r in response_token_ids], dtype=torch.long),
        "prompt_lengths": torch.as_tensor([len(p) for p in prompt_token_ids], dtype=torch.long),
    }


def split_at_eos(token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Cut a generated continuation after its first EOS token.

    Returns ``(response, finished)``: the tokens up to and including the first EOS, and whether an
    EOS was found. A continuation without EOS ran into the length limit: it is *truncated*, and it
    is exactly as long as the limit (``generate`` pads only rows that finished early, after their EOS).
    """
    eos = set(eos_token_ids)
    for index, token in enumerate(token_ids):
        if token in eos:
            return list(token_ids[: index + 1]), True
    return list(token_ids), False
