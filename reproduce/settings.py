"""The DAPO paper's settings as ``DAPOConfig`` objects: the 32B run, its AIME evaluation, Table 1.

Every number comes from the paper (arXiv 2503.14476) or the authors' verl reference scripts, as
collected in ``docs/paper_facts.md`` ("Settings of the 32B run" and
"Paper Table 1"). Nothing here has been run at the 32B scale.

- :func:`dapo_32b` — the 32B training run, variant ``"paper"`` or ``"reference-script"``.
- :func:`aime_eval_32b` — its evaluation (AIME 2024, avg@32).
- :func:`table1_rows` — the six cumulative ablation rows of Table 1, built from :data:`TECHNIQUES`.
- :data:`PAPER_TABLE1`, :data:`REFERENCE_REPRODUCTIONS` — the published scores to compare against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dapo_rl.rllib.dapo import DAPO_SETTINGS, DAPOConfig

TRAIN_ENV = "dapo/DAPOMath17k-v0"
EVAL_ENV = "dapo/AIME24-v0"
PAPER_MODEL = "Qwen/Qwen2.5-32B"

# -- the four techniques (Table 1) ---------------------------------------------------------------

#: Naive GRPO: every DAPO technique off. Symmetric clipping (ε_high = ε_low), GRPO's per-sample
#: token mean, no overlong filtering, no soft overlong punishment, no dynamic sampling.
NAIVE_GRPO_ROW = "Naive GRPO"
NAIVE_GRPO: dict[str, Any] = {
    "overlong_filter": False,
    "clip_high": DAPO_SETTINGS["clip_low"],
    "overlong_penalty_factor": 0.0,
    "loss_agg": "seq-mean-token-mean",
    "dynamic_sampling": False,
}

#: Table 1's rows after the first, in the paper's order: each switches one technique on, at the
#: 32B DAPO run's value (DAPOConfig's default). The rows are cumulative, so the last one is full DAPO.
TECHNIQUES: dict[str, dict[str, Any]] = {
    name: {key: DAPO_SETTINGS[key]}
    for name, key in (
        ("+ Overlong Filtering", "overlong_filter"),
        ("+ Clip-Higher", "clip_high"),
        ("+ Soft Overlong Punishment", "overlong_penalty_factor"),
        ("+ Token-level Loss", "loss_agg"),
        ("+ Dynamic Sampling (DAPO)", "dynamic_sampling"),
    )
}

#: Every setting a Table-1 row changes. Scales (reproduce.scales) must leave these alone.
TECHNIQUE_KEYS: frozenset[str] = frozenset(NAIVE_GRPO)

# -- the 32B run ---------------------------------------------------------------------------------

#: What the 32B run sets beyond DAPOConfig()'s defaults, which ARE the paper's 32B settings
#: (dapo_rl.settings: DAPO_SETTINGS and OPTIMIZER_DEFAULTS).
COMMON_32B: dict[str, Any] = {
    # verl's FSDP workers compute in bf16 with float32 master weights, and checkpoint activations.
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
}

#: The reference script's linear warm-up, in rollout steps (train() calls); the paper's 20 rollout
#: steps are DAPOConfig's default (``lr_warmup_steps``, counted in optimizer steps: 20 x 16 = 320).
# The reference script sets verl's ``lr_warmup_steps=10``. verl steps its actor lr scheduler once per
# ``update_actor`` call, i.e. once per rollout step after all of that step's mini-batch updates
# (verl/workers/fsdp_workers.py, ``update_actor``), so its 10 are rollout steps too: 160 optimizer
# steps here, where the schedule advances once per optimizer step. (verl's first rollout step also
# runs at lr 0; DAPOConfig's warm-up starts at lr / lr_warmup_steps. Not reproduced.)
REFERENCE_SCRIPT_WARMUP_ROLLOUT_STEPS = 10


def updates_per_rollout_step(config: DAPOConfig) -> int:
    """Optimizer steps per rollout step: ``num_epochs`` × (``prompts_per_step`` / ``minibatch_prompts``)."""
    return config.num_epochs * (config.prompts_per_step // config.minibatch_prompts)


#: Where the reference scripts differ from the paper (docs/paper_facts.md, "Settings of the 32B run"). The
#: paper's variant is DAPOConfig()'s defaults: a warm-up of 20 rollout steps, overlong filtering on,
#: no dual clip.
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "reference-script": {
        "lr_warmup_steps": REFERENCE_SCRIPT_WARMUP_ROLLOUT_STEPS * updates_per_rollout_step(DAPOConfig()),  # 160
        "overlong_filter": False,  # the scripts do not implement overlong filtering
        "dual_clip": 10.0,
        # The run that reported 52% took the token mean of each micro-batch, then divided by the
        # number of accumulation steps (verl's actor at the time): see dapo_rl.core.losses.
        "loss_agg": "token-mean-legacy",
    },
}


def dapo_32b(variant: str = "paper", model_path: str | os.PathLike[str] = PAPER_MODEL) -> DAPOConfig:
    """The DAPO run on Qwen2.5-32B (base) and DAPO-Math-17k, as a ``DAPOConfig``.

    Args:
        variant: ``"paper"`` (warm-up 20 rollout steps, overlong filtering, no dual clip) or
            ``"reference-script"`` (the authors' verl script: warm-up 10 rollout steps, no overlong
            filtering, dual-clip c = 10, the token mean taken per micro-batch: "token-mean-legacy").
        model_path: a local Hugging Face folder of the model (nothing is downloaded). Loaded in
            float32 (the master weights); compute runs in bf16 (``mixed_precision="bf16"``), so
            1e-6 updates are not lost to bf16 rounding.

    Raises:
        ValueError: an unknown ``variant``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return (
        DAPOConfig()
        .environment(TRAIN_ENV)
        .rl_module(model_config={"model": os.fspath(model_path), "dtype": "float32"})
        .training(**COMMON_32B, **VARIANTS[variant])
    )


# -- evaluation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How a trained policy is scored: ``samples`` responses per problem, mean accuracy (avg@k)."""

    env: str
    samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    metric: str
    problems: int | None = None  # the first N problems of ``env`` (None: all of them, as the paper)

    def evaluate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`dapo_rl.jobs.evaluation.evaluate_model` (after the model)."""
        return {
            "env_id": self.env,
            "samples": self.samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "num_problems": self.problems,
        }


def aime_eval_32b() -> EvalSettings:
    """The paper's evaluation: AIME 2024, 32 samples per problem, temperature 1.0, top_p 0.7, avg@32."""
    return EvalSettings(env=EVAL_ENV, samples=32, temperature=1.0, top_p=0.7, max_new_tokens=20480, metric="avg@32")


# -- Table 1 -------------------------------------------------------------------------------------

TABLE1_SOURCE = "DAPO paper (arXiv 2503.14476), Table 1: Qwen2.5-32B base, AIME 2024 avg@32, in percent"

#: The paper's Table 1 (cumulative rows), AIME 2024 avg@32 in percent.
PAPER_TABLE1: MappingProxyType[str, int] = MappingProxyType(
    {
        "Naive GRPO": 30,
        "+ Overlong Filtering": 36,
        "+ Clip-Higher": 38,
        "+ Soft Overlong Punishment": 41,
        "+ Token-level Loss": 42,
        "+ Dynamic Sampling (DAPO)": 50,
    }
)

#: The same table's baseline, not a DAPO row.
PAPER_BASELINE: MappingProxyType[str, int] = MappingProxyType({"DeepSeek-R1-Zero-Qwen-32B": 47})

REFERENCE_REPRODUCTIONS_SOURCE = (
    "the authors' reproduction runs with their verl reference scripts (docs/paper_facts.md, 'Paper Table 1'): "
    "AIME 2024 avg@32 in percent; these runs use the reference-script variant (dual clip, no overlong filtering)"
)

#: Reproductions with the reference scripts, AIME 2024 avg@32 in percent. Closest Table-1 rows:
#: full DAPO ~ "+ Dynamic Sampling (DAPO)", without dynamic sampling ~ "+ Token-level Loss",
#: early ~ "+ Soft Overlong Punishment".
REFERENCE_REPRODUCTIONS: MappingProxyType[str, int] = MappingProxyType(
    {
        "DAPO (full)": 52,
        "DAPO without dynamic sampling": 50,
        "DAPO early (no token-level loss, no dynamic sampling)": 44,
    }
)


def table1_rows(base: DAPOConfig | None = None) -> dict[str, DAPOConfig]:
    """Table 1's six cumulative rows, in order: name → a new ``DAPOConfig``.

    The first row is ``base`` with every technique off (:data:`NAIVE_GRPO`); each later row switches
    on its technique (:data:`TECHNIQUES`) on top of the row before. Everything else (model, data,
    lengths, warm-up, dual clip...) comes from ``base`` (default: ``dapo_32b()``), which is not changed.
    """
    base = dapo_32b() if base is None else base
    rows: dict[str, DAPOConfig] = {}
    settings = dict(NAIVE_GRPO)
    rows[NAIVE_GRPO_ROW] = _with_training(base, settings)
    for name, change in TECHNIQUES.items():
        settings.update(change)
        rows[name] = _with_training(base, settings)
    return rows


def _with_training(config: DAPOConfig, settings: dict[str, Any]) -> DAPOConfig:
    return config.copy(copy_frozen=False).training(**settings)
