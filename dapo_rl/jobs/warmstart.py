"""A brief supervised warm-start on noisy demonstrations, for models trained from scratch. No Ray import.

A randomly initialised model never produces a correct answer, so reinforcement learning has no
signal to start from. The warm-start plays the part of pre-training: it teaches the answer format
and most of the skill, from demonstrations of which a share ``noise`` carry a *wrong* answer
(an integer answer shifted by ±1 or ±10, as a careless solver would; a non-integer one swapped with
another problem's). The model then samples right and wrong answers for the same prompt, which is
exactly the situation DAPO learns from: the verifier's reward tells which is which.

A multi-turn environment's demonstrations (``env.demonstration(problem)``: model and environment
turns, alternating) are trained on whole, the environment's turns as context only (no loss on
them), the noise shifting the answer of the last model turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dapo_envs.multi_turn import is_multi_turn


@dataclass(frozen=True)
class WarmStartSettings:
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    noise: float = 0.5  # share of demonstrations with a wrong answer
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or not 0 <= self.noise <= 1:
            raise ValueError(
                f"warm-start settings out of range: steps={self.steps} (>= 0), batch_size={self.batch_size} (>= 1), "
                f"lr={self.lr} (> 0), noise={self.noise} (in [0, 1])"
            )


def corrupt_answer(answer: str, other_answer: str, rng: np.random.Generator) -> str:
    """A plausible wrong answer: an integer shifted by ±1 or ±10, else another problem's answer."""
    try:
        value = int(answer)
    except ValueError:
        return other_answer if other_answer != answer else answer + "0"
    return str(value + int(rng.choice([-10, -1, 1, 10])))


def demonstration_turns(env: Any, problem: Any) -> list[str]:
    """``env.demonstration(problem)``, checked: model and environment turns alternating, model first
    and last (an odd number of strings)."""
    turns = env.demonstration(problem)
    if not (isinstance(turns, list) and len(turns) % 2 == 1 and all(isinstance(turn, str) for turn in turns)):
        raise ValueError(
            f"{type(env).__name__}.demonstration must return a list of an odd number of strings "
            f"(model turn, environment turn, ..., model turn), got {turns!r:.200}"
        )
    return list(turns)


def supervised_warmstart(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    env: Any,
    encode_prompt: Callable[[Any], list[int]],
    settings: WarmStartSettings,
    *,
    encode_environment_turn: Callable[[str], list[int]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with cross-entropy on the response tokens; returns the losses.

    Args:
        env: a reasoning environment (``gym.make(...).unwrapped``) of the *training* split.
        encode_prompt: prompt → token ids, the same encoding the RL runner uses.
        encode_environment_turn: a multi-turn environment's turn → token ids, as the RL runner
            encodes it (``GenerationRunner.encode_environment_turn``); needed for such environments.
    """
    multi_turn = is_multi_turn(env)
    if multi_turn and encode_environment_turn is None:
        raise ValueError(f"{type(env).__name__} is multi-turn: pass encode_environment_turn (the runner's encoding)")
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    losses = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for step in range(settings.steps):
            problems = env.sample_problems(settings.batch_size, rng, replace=True)
            sequences, labels = [], []
            for problem in problems:
                answer = problem.answer
                if rng.random() < settings.noise:
                    other = problems[int(rng.integers(len(problems)))].answer
                    answer = corrupt_answer(answer, other, rng)
                prompt_ids = encode_prompt(problem)
                turns = demonstration_turns(env, problem) if multi_turn else [env.solution_text(problem)]
                if answer != problem.answer:  # a noisy demonstration: its final answer is wrong
                    turns[-1] = env.verifier.format_answer(answer)
                sequence, label = list(prompt_ids), [-100] * len(prompt_ids)
                for index, text in enumerate(turns):
                    if index % 2:  # the environment's turn: context, no loss
                        turn_ids = encode_environment_turn(text)
                        label += [-100] * len(turn_ids)
                    else:
                        turn_ids = tokenizer(text, add_special_tokens=False).input_ids + [eos]
                        label += turn_ids
                    sequence += turn_ids
                sequences.append(sequence)
                labels.append(label)
            width = max(len(s) for s in sequences)
            input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
            label_ids = torch.full((len(sequences), width), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
            for row, (sequence, label) in enumerate(zip(sequences, labels)):
                input_ids[row, : len(sequence)] = torch.as_tensor(sequence)
                label_ids[row, : len(label)] = torch.as_tensor(label)
                attention_mask[row, : len(sequence)] = 1
            loss = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=label_ids.to(device)
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
    return losses
