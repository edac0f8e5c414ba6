"""Dynamic sampling (DAPO section 3.2): keep only prompts whose responses are neither all correct nor
all wrong, and keep generating until the batch holds the target number of such prompts.

Groups whose responses all score alike have zero advantage, so they give no gradient and only shrink
the effective batch. The filter uses *correctness*: filtering on the shaped reward (correctness plus
overlong penalty) would let all-wrong groups through whenever their lengths differ.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DynamicSamplingAccumulator", "SamplingRoundLimitError", "select_informative_groups"]

ON_LIMIT_CHOICES: tuple[str, ...] = ("error", "train")


def _group_inverse(group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse (N,) in 0..G-1, first position (G,) of each group in the batch) for group ids (N,)."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    positions = torch.arange(inverse.numel(), device=inverse.device)
    first = torch.full((num_groups,), inverse.numel(), dtype=positions.dtype, device=inverse.device)
    first = first.scatter_reduce_(0, inverse, positions, "amin")
    return inverse, first


def _check_correct_and_groups(correct: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    if correct.dim() != 1 or group_index.dim() != 1 or correct.shape != group_index.shape:
        raise ValueError(
            f"correct and group_index must both be 1-D of the same length, got shapes "
            f"{tuple(correct.shape)} and {tuple(group_index.shape)}"
        )
    if group_index.is_floating_point() or group_index.is_complex() or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must be an integer tensor, got dtype {group_index.dtype}")
    if correct.dtype != torch.bool:
        # Rejecting anything but 0/1 catches a shaped reward (+-1, overlong penalty) passed by mistake.
        if correct.is_complex() or not bool(((correct == 0) | (correct == 1)).all()):
            bad = correct[(correct != 0) & (correct != 1)][:5].tolist() if not correct.is_complex() else "complex"
            raise ValueError(f"correct must be bool (or 0/1) correctness, not a reward; got values {bad}")
        correct = correct.bool()
    return correct


def select_informative_groups(correct: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Which responses belong to a group with both correct and wrong answers.

    Args:
        correct: (N,) bool (or 0/1) correctness of each response -- not the shaped reward.
        group_index: (N,) integer group id of each response (any ids, any order).

    Returns:
        (N,) bool, True for every response of a mixed group.
    """
    correct = _check_correct_and_groups(correct, group_index)
    inverse, first = _group_inverse(group_index)
    num_groups = first.numel()
    group_size = torch.zeros(num_groups, dtype=torch.long, device=correct.device).index_add_(
        0, inverse, torch.ones_like(inverse)
    )
    group_correct = torch.zeros_like(group_size).index_add_(0, inverse, correct.long())
    informative = (group_correct > 0) & (group_correct < group_size)
    return informative[inverse]


class SamplingRoundLimitError(RuntimeError):
    """Dynamic sampling used up its generation rounds before collecting enough informative prompts."""

    def __init__(self, *, max_sampling_rounds: int, rounds: int, num_groups: int, target_groups: int) -> None:
        self.max_sampling_rounds = max_sampling_rounds
        self.rounds = rounds
        self.num_groups = num_groups
        self.target_groups = target_groups
        super().__init__(
            f"dynamic sampling hit its limit max_sampling_rounds={max_sampling_rounds} after {rounds} generation rounds, "
            f"having kept {num_groups} of the {target_groups} prompts (groups) it needs with both correct "
            "and wrong answers. The data may be too hard (or too easy) for this model: set max_sampling_rounds <= 0 "
            "for unlimited rounds, or on_sampling_limit='train' to train on the prompts collected so far."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # The constructor is keyword-only, so the default (cls, self.args) would fail: copy.copy and
        # pickle (Ray/Tune copy an exception raised in train() and send it between processes) need this.
        kwargs = {
            "max_sampling_rounds": self.max_sampling_rounds,
            "rounds": self.rounds,
            "num_groups": self.num_groups,
            "target_groups": self.target_groups,
        }
        return (functools.partial(type(self), **kwargs), (), self.__dict__)


class DynamicSamplingAccumulator:
    """Collects informative groups over generation rounds until ``target_groups`` are held.

    Each round's batch is a mapping of per-response values: tensors with first dimension N, or
    lists/tuples of length N (e.g. texts). ``add`` keeps the responses of informative groups, in
    order of each group's first appearance, drops whole surplus groups beyond the target, and counts
    the round. ``result()`` concatenates what was kept, with ``group_key`` set to group ids
    renumbered 0..K-1 (ids from different rounds never collide).

    Round limit: if the target is not met after ``max_sampling_rounds`` rounds (``max_sampling_rounds <= 0``: no
    limit), ``on_sampling_limit="error"`` raises SamplingRoundLimitError (what was kept so far stays
    available through ``result()``), and ``on_sampling_limit="train"`` marks the accumulator done so the
    caller trains on fewer prompts (``limit_reached`` tells it so).
    """

    def __init__(
        self,
        target_groups: int,
        max_sampling_rounds: int,
        *,
        on_sampling_limit: str = "error",
        group_key: str = "group_index",
    ) -> None:
        if not (isinstance(target_groups, int) and target_groups > 0):
            raise ValueError(f"target_groups must be a positive int, got {target_groups!r}")
        if not isinstance(max_sampling_rounds, int):
            raise ValueError(f"max_sampling_rounds must be an int (<= 0 for unlimited), got {max_sampling_rounds!r}")
        if on_sampling_limit not in ON_LIMIT_CHOICES:
            raise ValueError(f"on_sampling_limit must be one of {ON_LIMIT_CHOICES}, got {on_sampling_limit!r}")
        self.target_groups = target_groups
        self.max_sampling_rounds = max_sampling_rounds
        self.on_sampling_limit = on_sampling_limit
        self.group_key = group_key
        self.rounds = 0
        self.num_groups = 0
        self.limit_reached = False
        self._keys: list[str] | None = None
        self._parts: list[dict[str, Any]] = []
        #: Per round added, (N,) bool: which of its responses were kept (what was dropped, for metrics).
        self.kept_per_round: list[torch.Tensor] = []

    @property
    def done(self) -> bool:
        """True once the target is met, or the round limit was reached with on_sampling_limit="train"."""
        return self.num_groups >= self.target_groups or self.limit_reached

    @property
    def num_responses(self) -> int:
        return sum(int(part[self.group_key].numel()) for part in self._parts)

    def add(self, batch: Mapping[str, Any], correct: torch.Tensor, group_index: torch.Tensor) -> bool:
        """Take one generation round.

        Args:
            batch: key -> (N, ...) tensor or length-N list/tuple of per-response values.
            correct: (N,) bool correctness of each response.
            group_index: (N,) integer group (prompt) id of each response.

        Returns:
            ``done`` after this round.

        Raises:
            SamplingRoundLimitError: on_sampling_limit="error" and the round limit is reached short of target.
            RuntimeError: called after ``done``.
            ValueError: malformed batch (keys differing between rounds, wrong lengths, ...).
        """
        if self.done:
            raise RuntimeError("add() called on a DynamicSamplingAccumulator that is already done")
        informative = select_informative_groups(correct, group_index)
        n = informative.numel()
        keys = sorted(batch)
        if self._keys is None:
            self._keys = keys
        elif keys != self._keys:
            raise ValueError(f"batch keys {keys} differ from the first round's {self._keys}")
        for key, value in batch.items():
            size = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() > 0 else None
            if isinstance(value, (list, tuple)):
                size = len(value)
            if size != n:
                raise ValueError(f"batch[{key!r}] must be a tensor or list with first dimension {n}, got {size}")

        # Rank the informative groups by first appearance; keep as many whole groups as still needed.
        inverse, first = _group_inverse(group_index)
        group_informative = torch.zeros(first.numel(), dtype=torch.bool, device=first.device)
        group_informative[inverse] = informative
        order = torch.argsort(first)
        rank_in_order = torch.cumsum(group_informative[order].long(), dim=0)
        needed = self.target_groups - self.num_groups
        group_kept = torch.zeros_like(group_informative)
        group_kept[order] = group_informative[order] & (rank_in_order <= needed)
        kept = group_kept[inverse]

        # New ids: this round's kept groups numbered after the ones already held, by first appearance.
        new_group_id = torch.full_like(group_kept, -1, dtype=torch.long)
        new_group_id[order] = torch.where(group_kept[order], rank_in_order - 1 + self.num_groups, -1)
        kept_cpu = kept.tolist()
        part: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                part[key] = value[kept.to(value.device)]
            else:
                part[key] = [item for item, keep in zip(value, kept_cpu, strict=True) if keep]
        part[self.group_key] = new_group_id[inverse][kept]
        self._parts.append(part)
        self.kept_per_round.append(kept.cpu())
        self.num_groups += int(group_kept.sum())
        self.rounds += 1

        if not self.done and self.max_sampling_rounds > 0 and self.rounds >= self.max_sampling_rounds:
            if self.on_sampling_limit == "error":
                raise SamplingRoundLimitError(
                    max_sampling_rounds=self.max_sampling_rounds,
                    rounds=self.rounds,
                    num_groups=self.num_groups,
                    target_groups=self.target_groups,
                )
            self.limit_reached = True
        return self.done

    def result(self) -> dict[str, Any]:
        """Everything kept so far: tensors concatenated along dim 0, lists joined, and
        ``group_key`` -> (M,) long group ids 0..K-1 (K = ``num_groups``). Empty dict before any round."""
        if not self._parts:
            return {}
        out: dict[str, Any] = {}
        for key in self._parts[0]:
            values = [part[key] for part in self._parts]
            if isinstance(values[0], torch.Tensor):
                out[key] = torch.cat(values, dim=0)
            else:
                out[key] = [item for value in values for item in value]
        return out
