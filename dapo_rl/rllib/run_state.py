"""What a DAPO run carries from one iteration to the next besides the weights and optimizer state:
the problem order, the generation and shuffle generators, and the run's counters. Saved in and
restored from a checkpoint's ``"dapo"`` component in one place, so a resumed run draws the same
problems, seeds and mini-batches as one that never stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from dapo_rl.rollout.prompt_sampler import PromptSampler


@dataclass
class RunCounters:
    """The run's counts, over the whole run (checkpointed)."""

    optimizer_steps: int = 0
    #: Updates skipped in a row for a non-finite loss or gradient (max_consecutive_nonfinite_updates).
    consecutive_nonfinite_updates: int = 0
    nonfinite_updates_skipped: int = 0
    #: Mini-batches without a loss token (every response truncated under the overlong filter).
    empty_updates_skipped: int = 0
    #: Sampling calls lost to a failed env runner and sent again.
    env_runner_failures: int = 0
    #: Asynchronous rollouts: rollout steps' worth of updates in the learners' weights.
    policy_version: int = 0
    #: Asynchronous rollouts: rounds dropped as more than max_staleness versions old.
    stale_rounds_dropped: int = 0


class RunState:
    """The problem order, the generators and the counters of one run, seeded from the config's seed."""

    def __init__(self, prompt_sampler: PromptSampler, seed: int) -> None:
        self.prompt_sampler = prompt_sampler
        self.generation_rng = np.random.default_rng(seed + 1)  # one seed per generation round
        self.shuffle_generator = torch.Generator().manual_seed(seed + 2)  # mini-batch composition
        self.counters = RunCounters()

    def next_round(self, num_prompts: int) -> tuple[list[Any], int]:
        """The problems of the next generation round and its seed (drawn in this order, always)."""
        problems = self.prompt_sampler.next(num_prompts)
        return problems, int(self.generation_rng.integers(2**31 - 1))

    def get_state(self) -> dict[str, Any]:
        return {
            "prompt_sampler": self.prompt_sampler.get_state(),
            "generation_rng": self.generation_rng.bit_generator.state,
            "shuffle_generator": self.shuffle_generator.get_state(),
            **asdict(self.counters),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.prompt_sampler.set_state(state["prompt_sampler"])
        self.generation_rng.bit_generator.state = state["generation_rng"]
        self.shuffle_generator.set_state(state["shuffle_generator"])
        # A counter added after a checkpoint was written starts from 0 on resuming it.
        self.counters = RunCounters(**{field.name: int(state.get(field.name, 0)) for field in fields(RunCounters)})
