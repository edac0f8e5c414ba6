"""The order in which a training run draws problems: reproducible, checkpointable, epoch by epoch.

No Ray import: the RLlib algorithm and the plain-loop benchmark both draw their prompts here.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PromptSampler:
    """Draws problems from an environment in a reproducible, checkpointable order.

    Data sets are read in epochs, each a fresh permutation (no problem repeats within an epoch);
    index spaces too large to permute (procedural tasks) are sampled uniformly. ``get_state`` /
    ``set_state`` carry the position and the RNG, so a restored run draws the same next prompts.
    """

    PERMUTE_LIMIT = 10_000_000

    def __init__(self, env: Any, seed: int) -> None:
        self.env = env
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    def next(self, count: int) -> list[Any]:
        size = self.env.num_problems
        if size > self.PERMUTE_LIMIT:
            return [self.env.problem(int(i)) for i in self.rng.integers(0, size, count)]
        indices: list[int] = []
        while len(indices) < count:
            if self._order is None or self.position >= size:
                if self._order is not None:
                    self.epoch += 1
                self._order = self.rng.permutation(size)
                self.position = 0
            take = self._order[self.position : self.position + count - len(indices)]
            indices.extend(int(i) for i in take)
            self.position += len(take)
        return [self.env.problem(i) for i in indices]

    def get_state(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": self.epoch,
            "position": self.position,
            "order": None if self._order is None else self._order.copy(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = None if state["order"] is None else np.asarray(state["order"])
