"""The interface every generation backend implements (Hugging Face ``generate`` here, vLLM on GPUs).

A backend turns B prompts (token ids) into B × n sampled responses in one batched call: the G
responses of a prompt are sampled together so they share the prompt's prefill. Backends never see
the environment or the reward; the runner scores what they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled. ``top_k <= 0`` and ``top_p == 1.0`` switch those filters off.

    ``logprobs``: also return each sampled token's log-prob under the generating weights,
    log_softmax(logits / temperature) (the behaviour policy of asynchronous training; top-k/top-p
    filtering is not reflected, as the learner's log-probs do not reflect it either).
    """

    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n (responses per prompt) must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GeneratedResponses:
    """B × n responses, prompt-major: responses ``i * n ... i * n + n - 1`` belong to prompt i.

    ``token_ids[j]`` holds the response's tokens up to and including its EOS; ``finished[j]`` is
    False when the response hit ``max_new_tokens`` without an EOS (a truncated, overlong response).
    ``logprobs[j]`` (when ``SamplingSettings.logprobs``) has one log-prob per token of ``token_ids[j]``
    (NaN where the generator gave none).
    """

    token_ids: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


class GenerationBackend(Protocol):
    """What the generation runner needs from a backend."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingSettings, *, seed: int
    ) -> GeneratedResponses:
        """Sample ``sampling.n`` responses for each prompt."""
        ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Take the learner's current policy weights (weight sync after an update)."""
        ...
