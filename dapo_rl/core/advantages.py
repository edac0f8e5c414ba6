"""Group-relative advantages (GRPO / DAPO Eq. 9, and Dr. GRPO's unscaled variant).

Every prompt is answered G times; the G responses form a group, and each response's advantage is its
reward measured against the other responses of its own group. All tokens of a response share it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ADVANTAGE_SCALES", "group_advantages"]

#: Names accepted by ``group_advantages(scale=...)``.
#: "std": (R - group mean) / (unbiased group std + eps)   (GRPO, DAPO)
#: "none": R - group mean                                 (Dr. GRPO: no per-group std scaling)
ADVANTAGE_SCALES: tuple[str, ...] = ("std", "none")


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    eps: float = 1e-6,
    scale: str = "std",
) -> torch.Tensor:
    """Per-response advantage relative to the response's group.

    Args:
        rewards: (N,) float reward of each response (integer/bool rewards are converted to float).
        group_index: (N,) integer group id of each response. Responses with the same id form one
            group; ids need not be contiguous, sorted or start at 0.
        eps: added to the group std before dividing (scale="std" only); must be > 0 there.
        scale: one of ``ADVANTAGE_SCALES``.

    Returns:
        (N,) advantages, dtype of ``rewards`` (float32 if rewards were not floating). A group whose
        rewards are all equal -- including a group of one response -- gets exactly 0, never NaN/inf.

    Raises:
        ValueError: unknown ``scale``, bad shapes/dtypes, non-finite rewards, or eps <= 0 with "std".
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
    if rewards.dim() != 1 or group_index.dim() != 1 or rewards.shape != group_index.shape:
        raise ValueError(
            f"rewards and group_index must both be 1-D of the same length, got shapes "
            f"{tuple(rewards.shape)} and {tuple(group_index.shape)}"
        )
    if group_index.is_floating_point() or group_index.is_complex() or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must be an integer tensor, got dtype {group_index.dtype}")
    if scale == "std" and not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0 for scale='std', got {eps!r}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards must be finite, got {rewards[~torch.isfinite(rewards)][:5].tolist()}")

    # Group statistics in float64: N is small, and it keeps the centred rewards accurate.
    reward = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    group_sum = reward.new_zeros(num_groups).index_add_(0, inverse, reward)
    group_mean = group_sum / counts
    centered = reward - group_mean[inverse]
    if scale == "std":
        group_sq = reward.new_zeros(num_groups).index_add_(0, inverse, centered.square())
        # Unbiased (n - 1) variance; singleton groups are zeroed below, clamp only avoids 0/0.
        group_std = (group_sq / (counts - 1).clamp(min=1)).sqrt()
        advantage = centered / (group_std[inverse] + eps)
    else:
        advantage = centered

    # sum/count need not reproduce equal rewards bit-exactly (3 x 0.1), so constant groups are
    # detected with min == max and forced to an exact 0 rather than a rounding residue / eps.
    group_min = reward.new_full((num_groups,), math.inf).scatter_reduce_(0, inverse, reward, "amin")
    group_max = reward.new_full((num_groups,), -math.inf).scatter_reduce_(0, inverse, reward, "amax")
    constant = (group_min == group_max)[inverse]
    advantage = torch.where(constant, torch.zeros_like(advantage), advantage)
    return advantage.to(out_dtype)
