"""Overlong reward shaping (DAPO section 3.4): soft overlong punishment and overlong filtering."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["overlong_mask", "shaped_rewards", "soft_overlong_penalty"]


def soft_overlong_penalty(
    lengths: torch.Tensor | Sequence[int] | int,
    *,
    max_len: int,
    cache_len: int,
    factor: float = 1.0,
) -> torch.Tensor:
    """Length penalty of paper Eq. 13, added to the correctness reward.

    With E = max_len - cache_len (the expected length)::

        0                      if len <= E
        (E - len) / cache_len  if E < len <= max_len   (falls linearly from 0 to -1)
        -1                     if len > max_len

    times ``factor``. Paper / reference scripts: max_len=20480, cache_len=4096, factor=1.0.

    Args:
        lengths: response lengths in tokens, any shape (a tensor, a sequence or an int).
        max_len: L_max > 0.
        cache_len: L_cache, in (0, max_len].
        factor: scale of the penalty (finite).

    Returns:
        Float tensor of the shape of ``lengths`` (its dtype if floating, else the default float
        dtype), values in [-factor, 0] for factor >= 0.
    """
    if not (isinstance(max_len, int) and max_len > 0):
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if not (isinstance(cache_len, int) and 0 < cache_len <= max_len):
        raise ValueError(f"cache_len must be an int in (0, max_len={max_len}], got {cache_len!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor)):
        raise ValueError(f"factor must be a finite number, got {factor!r}")
    length = torch.as_tensor(lengths)
    if not length.is_floating_point():
        length = length.to(torch.get_default_dtype())
    if bool((length < 0).any()) or not bool(torch.isfinite(length).all()):
        raise ValueError(f"lengths must be finite and >= 0, got {length.flatten()[:5].tolist()}...")

    expected_len = max_len - cache_len
    in_cache = (expected_len - length) / cache_len  # 0 at expected_len, -1 at max_len
    penalty = torch.where(length <= expected_len, torch.zeros_like(length), in_cache)
    penalty = torch.where(length > max_len, torch.full_like(length, -1.0), penalty)
    return penalty * factor


def overlong_mask(truncated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: zero the response mask of truncated responses so they give no loss.

    Args:
        truncated: (B,) bool or 0/1; True where the response hit the length limit.
        mask: (B, T) response mask (any dtype).

    Returns:
        (B, T) new mask of ``mask``'s dtype: rows of truncated responses all zero, others unchanged.
    """
    if truncated.dim() != 1 or mask.dim() != 2 or truncated.shape[0] != mask.shape[0]:
        raise ValueError(
            f"truncated must be (B,) and mask (B, T), got {tuple(truncated.shape)} and {tuple(mask.shape)}"
        )
    if truncated.dtype != torch.bool:
        if truncated.is_complex() or not bool(((truncated == 0) | (truncated == 1)).all()):
            raise ValueError(f"truncated must be bool or 0/1, got dtype {truncated.dtype}")
        truncated = truncated.bool()
    return torch.where(truncated.unsqueeze(-1), torch.zeros_like(mask), mask)


def shaped_rewards(
    score: torch.Tensor,
    response_length: torch.Tensor,
    *,
    max_response_length: int,
    overlong_cache_len: int,
    overlong_penalty_factor: float,
) -> torch.Tensor:
    """Correctness reward plus the soft overlong punishment (paper Eq. 13); factor 0 switches it off."""
    if overlong_penalty_factor == 0 or overlong_cache_len == 0:
        return score.float()
    penalty = soft_overlong_penalty(
        response_length, max_len=max_response_length, cache_len=overlong_cache_len, factor=overlong_penalty_factor
    )
    return score.float() + penalty
