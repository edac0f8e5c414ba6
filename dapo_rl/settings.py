"""DAPO's settings and their defaults: the one place a default is written. No Ray import.

``DAPOConfig`` (``dapo_rl.dapo``) takes its attributes from here; code that must run without Ray (the
GPU benchmarks) reads the same values through :func:`paper_settings`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

#: DAPO's own settings and their defaults: the paper's 32B run where the paper sets them
#: (docs/paper_facts.md, "Settings of the 32B run"), else the reference scripts'. ``lr``, ``grad_clip`` and ``num_epochs`` are
#: RLlib's own settings, with DAPO's defaults in ``OPTIMIZER_DEFAULTS``.
DAPO_SETTINGS: dict[str, Any] = {
    "group_size": 16,  # G responses per prompt
    "prompts_per_step": 512,  # prompts trained on per rollout step
    "minibatch_prompts": 32,  # prompts per gradient update: 512/32 = 16 updates per step
    "lr_warmup_steps": 320,  # linear warm-up, in optimizer steps (paper: 20 rollout steps x 16)
    "weight_decay": 0.1,
    "clip_low": 0.2,  # epsilon_low
    "clip_high": 0.28,  # epsilon_high (Clip-Higher)
    "dual_clip": None,  # dual-clip constant c > 1 (reference scripts: 10.0); None = off
    "loss_agg": "token-mean",  # token-level loss; "seq-mean-token-mean" is GRPO's
    "advantage_scale": "std",  # (R - mean) / std per group; "none" = Dr. GRPO
    "dynamic_sampling": True,
    "max_sampling_rounds": 10,  # generation rounds per step before giving up; <= 0 = unlimited
    "on_sampling_limit": "error",  # at the round limit: "error" stops, "train" trains on what was kept
    "generation_batch_prompts": None,  # prompts per generation round with dynamic sampling; None: 3 x
    # prompts_per_step, the paper's ratio (1,536 for 512)
    "max_prompt_length": 2048,  # tokens; a longer prompt: see prompt_truncation
    "max_response_length": 20480,  # tokens: 16384 expected + 4096 overlong cache
    "overlong_cache_len": 4096,  # L_cache of the soft overlong punishment
    "overlong_penalty_factor": 1.0,  # 0 switches the soft overlong punishment off
    "overlong_filter": True,  # truncated responses carry no loss
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,  # <= 0: off
    "apply_chat_template": None,  # None: use the tokenizer's chat template when it has one
    "prompt_truncation": "error",  # a prompt over max_prompt_length tokens: "error" names it and stops
    # (verl's default: a silently cut question is a data bug); "left" keeps its last tokens
    "generation_prompts_per_call": 64,  # prompts per batched generate() call on a runner
    "share_prompt_forward": True,  # run each prompt once per group and share its KV cache with the
    # G responses, in hf generation and in the learner's log-prob passes (same values, less work)
    "logprob_chunk_size": 1024,  # tokens per chunk of the log-prob kernel
    "logprob_batch_rows": 64,  # rows per forward pass when recomputing old log-probs
    "compute_entropy": True,  # log the policy's token entropy (costs one extra pass per chunk)
    "mixed_precision": None,  # "bf16": bf16 compute, float32 master weights; None: the weights' dtype
    "gradient_checkpointing": False,  # recompute layer activations in backward (long responses)
    "micro_batch_tokens": 0,  # > 0: split each learner's update into micro-batches of at most this
    # many padded tokens, accumulating gradients (the token-mean stays exact); 0: one pass
    "data_parallel": "ddp",  # with num_learners > 1: "ddp" replicates the weights, "fsdp2" shards them
    "sharded_checkpoint_dir": None,  # fsdp2 across nodes: shared storage for the checkpoint shards
    # (None: inside the checkpoint folder, which Tune persists from the driver's node only)
    "sharded_checkpoints_kept": 2,  # shard folders kept there, newest first (>= Tune's checkpoints kept;
    # the previous checkpoint's folder is always kept too)
    "generation_backend": "hf",  # "hf": transformers generate; "vllm": a vLLM engine per env runner
    "generation_device": "auto",  # hf backend: "auto" (the GPU when the runner sees one), "cpu", "cuda"
    "vllm_tensor_parallel_size": 1,  # GPUs per engine (= num_gpus_per_env_runner)
    "vllm_dtype": "bfloat16",  # engine weights; the sync casts the learner's weights to it
    "vllm_gpu_memory_utilization": 0.6,  # share of each GPU the engine may take (weights + KV cache)
    "vllm_enforce_eager": False,  # True: no CUDA graphs (faster start, slower decode)
    "vllm_sleep": False,  # release the engine's GPU memory between rounds (engines sharing GPUs)
    "max_staleness": 0,  # asynchronous rollouts: remote env runners keep generating while the learners
    # update, and a response may come from weights up to this many rollout steps old (older rounds
    # are dropped); 0: synchronous, the paper's algorithm
    "importance_weight_cap": 2.0,  # C of the behaviour importance weight min(pi_prox / pi_behav, C) on
    # responses from older weights (max_staleness >= 1); None: no correction
    "recompute_old_logprobs": True,  # True: the learners recompute the old log-probs under the weights
    # the update starts from (the proximal policy); False: take the generator's (no extra forward pass;
    # the clip is then against the policy that sampled each token)
    "log_samples": 4,  # responses reported per iteration in result["samples"] (prompt, response, reward)
    "max_consecutive_nonfinite_updates": 8,  # an update whose loss or gradient is NaN/inf is skipped
    # (the weights and optimizer state are left as they were); this many in a row stop the run
}

#: Generation rounds of dynamic sampling hold this many times ``prompts_per_step`` prompts unless
#: ``generation_batch_prompts`` is set (the paper generates 3 x 512 prompts per round).
GENERATION_ROUND_FACTOR = 3

#: RLlib's own training settings, with the paper's values (AdamW lr 1e-6, grad clip 1.0, one pass
#: over each rollout step's mini-batches).
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "lr": 1e-6,
    "grad_clip": 1.0,
    "grad_clip_by": "global_norm",
    "num_epochs": 1,
}


def paper_settings() -> SimpleNamespace:
    """Every default as attributes (``paper_settings().clip_high``), for code that builds no DAPOConfig."""
    return SimpleNamespace(**DAPO_SETTINGS, **OPTIMIZER_DEFAULTS)


__all__ = ["DAPO_SETTINGS", "GENERATION_ROUND_FACTOR", "OPTIMIZER_DEFAULTS", "paper_settings"]
