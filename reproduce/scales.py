"""Scales at which Table 1 can be run: the paper's, one GPU, and the CPU.

A scale is a set of overrides applied on top of any Table-1 row (:func:`apply_scale`). Overrides
never touch the settings the rows differ in (``reproduce.settings.TECHNIQUE_KEYS``), so the
six rows keep exactly their differences at every scale.

- ``"paper"``: the algorithm's settings do not change (Qwen2.5-32B, 512 prompts × 16, 20,480-token
  responses); the scale adds the placement on 128 GPUs (:data:`PAPER_PLACEMENT`, vLLM engines and
  FSDP2 learners). Launched by ``python -m dapo_rl.reproduce.table1 --scale paper --run`` on a Ray
  cluster (:mod:`reproduce.cluster`). Never run: see :func:`resource_plan`.
- ``"gpu"``: one GPU, a small model (default Qwen2.5-1.5B from a local folder). Never run: see
  :data:`GPU_TRAINING` for the reasoning.
- ``"tiny"``: the CPU job of ``dapo-rl train`` (the embedded tiny model on ``dapo/Arithmetic-v0``).

The learning-rate warm-up is kept as a number of *rollout steps* when a scale changes the number of
updates per rollout step (the paper states it in rollout steps), unless the scale sets it itself.
"""

from __future__ import annotations

import os
from typing import Any

from dapo_rl.jobs import DEFAULT_JOB
from dapo_rl.reproduce.settings import TECHNIQUE_KEYS, TRAIN_ENV, updates_per_rollout_step
from dapo_rl.rllib.dapo import DAPO_SETTINGS, GENERATION_ROUND_FACTOR, DAPOConfig

SCALES: tuple[str, ...] = ("paper", "gpu", "tiny")

GPU_MODEL = "Qwen/Qwen2.5-1.5B"

#: The "gpu" scale's training settings: only where it differs from the 32B row it is applied to.
#: Reasoning (estimates, NOT measured: this has not been run):
#:
#: - Model: Qwen2.5-1.5B base. 0.5B is expected to solve too few DAPO-Math-17k problems for dynamic
#:   sampling to find prompts with both right and wrong answers; 1.5B can be trained in full (fp32
#:   weights, gradients and AdamW state: ~25 GB) on one 80 GB GPU.
#: - Per rollout step 64 prompts × G 8 = 512 responses (the paper: 8,192), in 4 mini-batches of 16
#:   prompts (128 responses); 192 prompts per dynamic-sampling round keep the paper's 3× ratio.
#: - Responses ≤ 2,048 tokens with a 512-token overlong cache (penalty from 1,536 tokens), the
#:   paper's 4:1 expected-to-cache ratio: long enough for short solutions, short enough that a base
#:   model's rambling hits the limit, so the overlong techniques have something to act on.
#: - Cost per rollout step: training reads ≤ 512 × (2,048 + 2,048) ≈ 2.1M tokens (typically under
#:   1M: prompts are a few hundred tokens); update + old log-prob pass ≈ 8 × 1.5e9 FLOP per token,
#:   ≤ 2.5e16 FLOP: minutes in float32 (H100 fp32 peak ~67 TFLOP/s without TF32). Generation
#:   dominates: ≤ 1,536 × 2,048 tokens per round, and with the Hugging Face ``generate`` backend (the
#:   only one today) each call decodes until its longest row ends. Guess: 5-15 minutes per rollout
#:   step with 1-2 rounds, so 20-40 steps (80-160 updates) per row in 3-8 hours. Ballpark only.
#: - lr 1e-6 as in the paper (not overridden). With ~100 updates instead of ~10k it may move the
#:   model little.
#: - At the round limit, train on what was kept: a small model on competition problems can exhaust
#:   10 rounds, and stopping a multi-hour row with an error wastes it.
#: - Weights in float32 with bf16 compute (mixed_precision, from the 32B settings): AdamW steps of
#:   ~1e-6 would vanish in bfloat16 weights (their spacing near 0.02 is ~1e-4).
#: - Generation prompts per call 32 (256 rows): an fp32 KV cache of ~57 KB per token (28 layers, 2 KV
#:   heads of 128) is ~35 GB for 256 rows of ~2,400 tokens.
#: - One GPU holds both: the local learner (``num_gpus_per_learner=1``) and the driver's local env
#:   runner, whose Hugging Face backend generates on the GPU it sees. Updates run in token-budget
#:   micro-batches of 16,384 tokens (a 128-response mini-batch of up to 4k tokens each does not fit
#:   in one forward/backward pass), with activation checkpointing and bf16 compute (the 32B settings).
GPU_PROMPTS_PER_STEP = 64
GPU_TRAINING: dict[str, Any] = {
    "prompts_per_step": GPU_PROMPTS_PER_STEP,
    "group_size": 8,  # half the paper's G: 512 responses per step fit one GPU's generation budget
    "minibatch_prompts": 16,
    # The 32B row writes its 1,536 out, so the paper's ratio is restated for this scale's prompts.
    "generation_batch_prompts": GENERATION_ROUND_FACTOR * GPU_PROMPTS_PER_STEP,
    "max_response_length": 2048,
    "overlong_cache_len": 512,
    "on_sampling_limit": "train",
    "generation_prompts_per_call": 32,
    "micro_batch_tokens": 16384,
}

#: The tiny model's longest correct response on the tiny job's problems (up to 99 + 99):
#: "Answer: 198" and EOS, one token per character, 12 tokens.
TINY_LONGEST_ANSWER_TOKENS = 12

#: The "tiny" scale's response budget, the CPU job's: 16 tokens with a 4-token cache. The soft
#: punishment starts after max - cache = 12 tokens, the longest correct answer, so no well-formed
#: answer is punished, and bites on anything longer; past 16 tokens a response is truncated (and
#: filtered). A cache of 4 with a 12-token limit would instead punish every answer (penalty from 8
#: tokens, while answers take 10-12).
TINY_RESPONSE_BUDGET: dict[str, int] = {
    key: DEFAULT_JOB["training"][key] for key in ("max_response_length", "overlong_cache_len")
}

#: The "tiny" scale's training settings: the CPU job's (dapo_rl.jobs.DEFAULT_JOB; its group_size and
#: the rest are genuine differences of that job from the paper, response budget above included)
#: minus the technique settings the Table-1 rows set.
TINY_TRAINING: dict[str, Any] = {
    **{key: value for key, value in DEFAULT_JOB["training"].items() if key not in TECHNIQUE_KEYS},
    # Undo the 32B row's bf16 compute and activation checkpointing: the CPU job computes as
    # `dapo-rl train` does, with DAPOConfig's defaults (float32, no checkpointing).
    **{key: DAPO_SETTINGS[key] for key in ("mixed_precision", "gradient_checkpointing")},
}


#: Where the paper-scale run puts its work on 128 GPUs (16 nodes x 8). NOT the reference scripts'
#: layout: verl colocates generation and training on all 128 GPUs (one process per GPU switching
#: roles). RLlib gives env runners and learners their own GPU bundles, and fractional bundles cannot
#: hold a tensor-parallel engine, so here half the GPUs generate (16 vLLM engines, tensor parallel
#: 4, as in the scripts) and half train (64 FSDP2 learners). DAPO's step is synchronous, so each
#: half idles while the other works: roughly half the reference's throughput on the same GPUs. The
#: scripts' Ulysses sequence parallelism (8) is not implemented: a learner processes whole
#: sequences, one at a time at most (``micro_batch_tokens`` = prompt + response limit), with
#: activation checkpointing and bf16 compute; 512 responses per update = 8 per learner.
PAPER_PLACEMENT: dict[str, Any] = {
    "num_env_runners": 16,
    "num_gpus_per_env_runner": 4,
    "num_learners": 64,
    "num_gpus_per_learner": 1,
    "training": {
        "generation_backend": "vllm",
        "vllm_tensor_parallel_size": 4,
        "data_parallel": "fsdp2",
        "micro_batch_tokens": DAPO_SETTINGS["max_prompt_length"] + DAPO_SETTINGS["max_response_length"],
    },
}

#: Rollout steps of a paper-scale row: the paper's figures run to ~10k gradient updates, 16 per step.
PAPER_ITERATIONS = 625


def scale_overrides(scale: str) -> dict[str, Any]:
    """What a scale changes in a row: any of ``env``, ``env_config``, ``model``, ``dtype`` (None: the
    checkpoint's own), ``training`` (``DAPOConfig.training`` settings), ``seed``, ``num_learners``,
    ``num_env_runners``, ``num_gpus_per_learner``, ``num_gpus_per_env_runner``. ``"paper"`` changes
    only where the work runs (:data:`PAPER_PLACEMENT`).

    Raises:
        ValueError: an unknown scale.
    """
    if scale == "paper":
        return {**PAPER_PLACEMENT, "training": dict(PAPER_PLACEMENT["training"])}
    if scale == "gpu":
        return {
            "env": TRAIN_ENV,
            "env_config": {},
            "model": GPU_MODEL,
            "dtype": "float32",
            "training": dict(GPU_TRAINING),
            "num_gpus_per_learner": 1,
        }
    if scale == "tiny":
        return {
            "env": DEFAULT_JOB["env"],
            "env_config": dict(DEFAULT_JOB["env_config"]),
            "model": DEFAULT_JOB["model"],
            "dtype": DEFAULT_JOB["dtype"],  # None: the preset is built in float32
            "training": dict(TINY_TRAINING),
            "seed": DEFAULT_JOB["seed"],
            "num_learners": DEFAULT_JOB["num_learners"],
            "num_env_runners": DEFAULT_JOB["num_env_runners"],
        }
    raise ValueError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")


def apply_scale(config: DAPOConfig, scale: str, *, model_path: str | os.PathLike[str] | None = None) -> DAPOConfig:
    """A new ``DAPOConfig``: ``config`` with the scale's overrides; ``config`` itself is not changed.

    Args:
        model_path: the model to train instead of the scale's default (e.g. a local Qwen2.5-1.5B
            folder for ``"gpu"``, the warm-started tiny model for ``"tiny"``, another 32B path for
            ``"paper"``).
    """
    overrides = scale_overrides(scale)
    scaled = config.copy(copy_frozen=False)
    if "env" in overrides:
        scaled.environment(overrides["env"], env_config=dict(overrides["env_config"]))
    model_config = dict(config.model_config or {})
    if "model" in overrides:
        model_config = {"model": overrides["model"]}
        if overrides["dtype"] is not None:
            model_config["dtype"] = overrides["dtype"]
    if model_path is not None:
        model_config["model"] = os.fspath(model_path)
    scaled.rl_module(model_config=model_config)
    training = dict(overrides.get("training", {}))
    scaled.training(**training)
    if "lr_warmup_steps" not in training:
        scaled.training(lr_warmup_steps=_rescaled_warmup(config, scaled))
    if "seed" in overrides:
        scaled.debugging(seed=overrides["seed"])
    if "num_learners" in overrides:
        scaled.learners(num_learners=overrides["num_learners"])
    if "num_gpus_per_learner" in overrides:
        scaled.learners(num_gpus_per_learner=overrides["num_gpus_per_learner"])
    if "num_env_runners" in overrides:
        scaled.env_runners(num_env_runners=overrides["num_env_runners"])
    if "num_gpus_per_env_runner" in overrides:
        scaled.env_runners(num_gpus_per_env_runner=overrides["num_gpus_per_env_runner"])
    return scaled


def _rescaled_warmup(original: DAPOConfig, scaled: DAPOConfig) -> int:
    """``original``'s warm-up, same number of rollout steps, in ``scaled``'s optimizer steps."""
    return round(original.lr_warmup_steps * updates_per_rollout_step(scaled) / updates_per_rollout_step(original))


# -- the paper's cluster -------------------------------------------------------------------------

#: The reference scripts' cluster (docs/paper_facts.md; the project page says 128 H20 GPUs).
PAPER_CLUSTER: dict[str, Any] = {
    "gpu": "H20",
    "nodes": 16,
    "gpus_per_node": 8,
    "rollout_tensor_parallel": 4,  # vLLM
    "sequence_parallel": 8,  # Ulysses, on the learners
}


def resource_plan(config: DAPOConfig) -> dict[str, Any]:
    """GPUs per role for ``config`` (its env runners and learners), and the step sizes they carry.

    A PLAN derived from the config, not a measured set-up: nothing has run at this scale. Token
    counts are upper bounds (every prompt and response at its length limit).
    """
    engines = int(config.num_env_runners or 0)
    generation_gpus = engines * config.num_gpus_per_env_runner
    learners = max(1, int(config.num_learners or 0))
    learner_gpus = learners * config.num_gpus_per_learner if config.num_learners else config.num_gpus_per_learner
    responses_per_step = config.prompts_per_step * config.group_size
    responses_per_round = (
        config.generation_round_prompts if config.dynamic_sampling else config.prompts_per_step
    ) * config.group_size
    minibatch_responses = config.minibatch_prompts * config.group_size
    sequence_tokens = config.max_prompt_length + config.max_response_length
    return {
        "status": "plan: never run at this scale",
        "gpus": int(generation_gpus + learner_gpus),
        "generation": {
            "backend": config.generation_backend,
            "gpus": generation_gpus,
            "engines": engines,
            "tensor_parallel": config.vllm_tensor_parallel_size if config.generation_backend == "vllm" else None,
            "responses_per_round": responses_per_round,
            "responses_per_engine_per_round": responses_per_round / max(1, engines),
            "max_generated_tokens_per_round": responses_per_round * config.max_response_length,
        },
        "learners": {
            "gpus": learner_gpus,
            "learners": learners,
            "data_parallel": config.data_parallel if learners > 1 else "single",
            "responses_per_learner_per_update": minibatch_responses / learners,
            "micro_batch_tokens": config.micro_batch_tokens or None,
            "mixed_precision": config.mixed_precision,
            "activation_checkpointing": config.gradient_checkpointing,
        },
        "paper_cluster": (
            f"{PAPER_CLUSTER['nodes'] * PAPER_CLUSTER['gpus_per_node']} {PAPER_CLUSTER['gpu']} GPUs = "
            f"{PAPER_CLUSTER['nodes']} nodes x {PAPER_CLUSTER['gpus_per_node']}, generation and training colocated, "
            f"vLLM tensor parallel {PAPER_CLUSTER['rollout_tensor_parallel']}, sequence parallel "
            f"{PAPER_CLUSTER['sequence_parallel']}"
        ),
        "responses_per_step": responses_per_step,
        "updates_per_step": updates_per_rollout_step(config),
        "minibatch_responses": minibatch_responses,
        "max_tokens_per_sequence": sequence_tokens,
        "max_tokens_per_step": responses_per_step * sequence_tokens,
        "max_tokens_per_update": minibatch_responses * sequence_tokens,
    }
