"""avg@k, pass@k and cons@k of a policy on a reasoning environment. No Ray import.

- avg@k: mean accuracy over all k samples of every problem (the paper's avg@32);
- pass@k: share of problems with at least one correct sample among k;
- cons@k: share of problems whose majority answer (most common extracted answer, ties to the
  earliest) is correct.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np

import dapo_envs  # noqa: F401  (registers the dapo/ environment ids)
from dapo_rl.models.loading import load_policy, load_tokenizer
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend, generation_device
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.rollout.vllm_backend import VLLMEngineSettings, VLLMGenerationBackend, engine_model_folder, vllm_cpu_build
from dapo_rl.settings import DAPO_SETTINGS


@dataclass(frozen=True)
class EvalResult:
    avg_at_k: float
    pass_at_k: float
    cons_at_k: float
    num_problems: int
    samples: int
    mean_response_length: float
    #: Multi-turn environments: the share of episodes with at least one environment turn (a tool
    #: call, a retry); None for one-turn environments.
    environment_turn_frac: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_runner(
    runner: GenerationRunner,
    problems: Sequence[Any],
    sampling: SamplingSettings,
    *,
    seed: int = 0,
    batch_prompts: int = 256,
) -> EvalResult:
    """Sample ``sampling.n`` responses per problem with ``runner`` and score them."""
    if not problems:
        raise ValueError("evaluation needs at least one problem")
    k = sampling.n
    accuracy: list[np.ndarray] = []
    predictions: list[str] = []
    lengths: list[np.ndarray] = []
    environment_turns: list[np.ndarray] = []
    for start in range(0, len(problems), batch_prompts):
        rollout = runner.sample(problems[start : start + batch_prompts], sampling, seed=seed + start)
        accuracy.append(rollout["acc"])
        predictions.extend(rollout["pred"])
        lengths.append(rollout["response_length"])
        if "environment_turns" in rollout:
            environment_turns.append(rollout["environment_turns"])
    correct = np.concatenate(accuracy).reshape(len(problems), k)
    consensus = []
    for index in range(len(problems)):
        answers = predictions[index * k : (index + 1) * k]
        votes = Counter(answer for answer in answers if answer)
        if not votes:
            consensus.append(False)
            continue
        majority = max(votes, key=lambda answer: (votes[answer], -answers.index(answer)))
        consensus.append(bool(correct[index, answers.index(majority)]))
    return EvalResult(
        avg_at_k=float(correct.mean()),
        pass_at_k=float(correct.any(axis=1).mean()),
        cons_at_k=float(np.mean(consensus)),
        num_problems=len(problems),
        samples=k,
        mean_response_length=float(np.concatenate(lengths).mean()),
        environment_turn_frac=float((np.concatenate(environment_turns) > 0).mean()) if environment_turns else None,
    )


def evaluate_model(
    model: str | os.PathLike[str],
    env_id: str,
    *,
    env_config: dict[str, Any] | None = None,
    samples: int = 4,
    num_problems: int | None = None,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    max_prompt_length: int = DAPO_SETTINGS["max_prompt_length"],
    apply_chat_template: bool | None = None,
    seed: int = 0,
    backend: str = "hf",
    tensor_parallel_size: int = 1,
) -> EvalResult:
    """Evaluate a Hugging Face model folder (or the preset) on the first ``num_problems`` of an env.

    ``backend="hf"`` generates with ``transformers`` on the GPU when there is one (else the CPU);
    ``"vllm"`` with a vLLM engine: over ``tensor_parallel_size`` GPUs, or on the CPU with vLLM's CPU
    build (the tiny preset is written to a cached folder for it).
    """
    env = gym.make(env_id, **(env_config or {})).unwrapped
    count = env.num_problems if num_problems is None else min(num_problems, env.num_problems)
    problems = [env.problem(i) for i in range(count)]
    if backend == "vllm":
        tokenizer = load_tokenizer(model)
        # vLLM's CPU build runs the engine on the CPU; the GPU build on tensor_parallel_size GPUs.
        engine = VLLMEngineSettings(
            model=engine_model_folder(os.fspath(model)),
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            max_model_len=max_prompt_length + max_new_tokens,
            device="cpu" if vllm_cpu_build() else "cuda",
        )
        generator = VLLMGenerationBackend(engine, eos_token_ids=[tokenizer.eos_token_id])
    elif backend == "hf":
        policy, tokenizer = load_policy(model)
        policy.to(generation_device())
        generator = HFGenerationBackend(
            policy, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id]
        )
    else:
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    runner = GenerationRunner(env, tokenizer, generator, PromptSettings(max_prompt_length, apply_chat_template))
    sampling = SamplingSettings(
        n=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k
    )
    return evaluate_runner(runner, problems, sampling, seed=seed)
