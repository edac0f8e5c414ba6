"""DAPO's settings: each declared once, with its default, type, allowed values, one-line doc and the
paper's value where the default differs. No Ray import.

:data:`SETTINGS` is the table. ``DAPOConfig`` (``dapo_rl.rllib.dapo``) takes its attributes and its
per-setting checks from it, the job parser (``dapo-rl train --set``, job files) its types, and
``docs/settings.md`` is generated from it (:func:`settings_reference`; a test keeps the page in
step). Rules that tie several settings together are the named functions of
``DAPOConfig`` (``dapo_rl.rllib.dapo``); code that must run without Ray (the GPU benchmarks) reads the
defaults through :func:`paper_settings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from dapo_rl.core.advantages import ADVANTAGE_SCALES
from dapo_rl.core.kl import KL_ESTIMATORS, KL_PLACEMENTS
from dapo_rl.core.losses import LOSS_AGGREGATIONS, clip_setting_problems
from dapo_rl.core.off_policy import (
    OFF_POLICY_CORRECTIONS,
    SEQUENCE_RATIOS,
    importance_weight_cap_problem,
)
from dapo_rl.core.sampling import ON_LIMIT_CHOICES

#: Allowed values declared here (the modules that act on them import them from here). Allowed
#: values that are a function's contract in the Ray-free core (loss aggregations, advantage scales,
#: what to do at the sampling limit) live beside that function and are referenced below.
MIXED_PRECISION_CHOICES: tuple[str | None, ...] = (None, "bf16")
DATA_PARALLEL_CHOICES: tuple[str, ...] = ("ddp", "fsdp2")
PROMPT_TRUNCATION_CHOICES: tuple[str, ...] = ("error", "left")
GENERATION_BACKENDS: tuple[str, ...] = ("hf", "vllm")
VLLM_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
GRAD_CLIP_BY_CHOICES: tuple[str, ...] = ("value", "norm", "global_norm")

#: Generation rounds of dynamic sampling hold this many times ``prompts_per_step`` prompts unless
#: ``generation_batch_prompts`` is set (the paper generates 3 x 512 prompts per round).
GENERATION_ROUND_FACTOR = 3


@dataclass(frozen=True)
class Setting:
    """One setting of ``DAPOConfig.training()``.

    Attributes:
        name: the attribute and keyword name.
        default: the default (the paper's 32B run where the paper sets it, else the reference scripts').
        doc: one line: what it does.
        kind: ``"int"``, ``"number"`` (int or float), ``"bool"``, ``"str"`` or ``"choice"``.
        minimum: the smallest allowed value of an int or number (inclusive unless ``above``).
        maximum: the largest allowed value of a number (inclusive).
        above: True when ``minimum`` is exclusive (``> 0``).
        choices: allowed values of a ``"choice"`` setting (a live collection, e.g. a registry).
        nullable: None is allowed (with its meaning in ``doc``).
        hint: what a value means beyond the range, added to the error (``"<= 0 for unlimited"``).
        rllib: an RLlib training setting whose default DAPO changes (``lr``, ``grad_clip``, ...).
        check: extra rule on the value alone: value -> problem text or None.
    """

    name: str
    default: Any
    doc: str
    kind: str
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    choices: Collection[Any] | None = None
    nullable: bool = False
    hint: str = ""
    rllib: bool = False
    check: Callable[[Any], str | None] | None = None

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this setting, as one line naming it (None when nothing)."""
        if value is None and self.nullable:
            return None
        if self.check is not None and (problem := self.check(value)) is not None:
            return problem
        if self.kind == "choice":
            assert self.choices is not None
            return None if value in self.choices else f"{self.name} must be one of {list(self.choices)}, got {value!r}"
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{self.name} must be True or False, got {value!r}"
        if self.kind == "str":
            ok = isinstance(value, str) and bool(value)
            return None if ok else f"{self.name} must be {self.describe()}, got {value!r}"
        if self.kind == "int":
            ok = is_int(value)
        else:
            ok = is_number(value) and not math.isnan(value)
        if ok and self.minimum is not None:
            ok = value > self.minimum if self.above else value >= self.minimum
        if ok and self.maximum is not None:
            ok = value <= self.maximum
        return None if ok else f"{self.name} must be {self.describe()}, got {value!r}"

    def describe(self) -> str:
        """The allowed values in words: ``an integer >= 1``, ``a number in (0, 1]``, ..."""
        if self.kind == "choice":
            text = f"one of {list(self.choices or ())}"
        elif self.kind == "bool":
            text = "True or False"
        elif self.kind == "str":
            text = "a non-empty string"
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            if self.minimum is not None and self.maximum is not None:
                low = "(" if self.above else "["
                text = f"in {low}{self.minimum:g}, {self.maximum:g}]"
            elif self.minimum is not None:
                text = f"{noun} {'>' if self.above else '>='} {self.minimum:g}"
            else:
                text = noun
        if self.nullable:
            text = f"None or {text}"
        return f"{text} ({self.hint})" if self.hint else text

    def coerce(self, value: Any) -> Any:
        """A value read from text (YAML, ``--set``) in this setting's type where it is unambiguous:
        ``"1e-5"`` (YAML reads no dot as a string) as a float, an int as a float for a number."""
        if self.kind == "number" and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        if self.kind == "number" and is_int(value):
            return float(value)
        return value


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float (Python or numpy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _generation_device_problem(value: Any) -> str | None:
    if value in ("auto", "cpu") or (isinstance(value, str) and value.startswith("cuda")):
        return None
    return f"generation_device must be 'auto', 'cpu' or 'cuda[:N]', got {value!r}"


def _clip_problem(name: str) -> Callable[[Any], str | None]:
    """One clip setting checked by the core's rule (the one home of the clip rules), alone."""
    defaults = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": None}

    def check(value: Any) -> str | None:
        problems = clip_setting_problems(**{**defaults, name: value})
        return problems[0] if problems else None

    return check


def _setting_table(settings: Iterable[Setting]) -> dict[str, Setting]:
    table: dict[str, Setting] = {}
    for setting in settings:
        if setting.name in table:
            raise ValueError(f"setting {setting.name!r} is declared twice")
        table[setting.name] = setting
    return table


#: Every setting of ``DAPOConfig.training()`` that DAPO declares or whose RLlib default it changes.
SETTINGS: dict[str, Setting] = _setting_table(
    [
        # -- the batch ---------------------------------------------------------------------------------
        Setting("group_size", 16, "G responses per prompt", "int", minimum=2, hint="advantages need a group"),
        Setting("prompts_per_step", 512, "prompts trained on per rollout step", "int", minimum=1),
        Setting(
            "minibatch_prompts", 32, "prompts per gradient update (512 / 32 = 16 updates per step)", "int", minimum=1
        ),
        Setting("num_epochs", 1, "passes over each rollout step's mini-batches", "int", minimum=1, rllib=True),
        # -- the optimizer -----------------------------------------------------------------------------
        Setting(
            "lr",
            1e-6,
            "AdamW learning rate after the warm-up",
            "number",
            minimum=0,
            above=True,
            hint="warm-up comes from lr_warmup_steps",
            rllib=True,
        ),
        Setting(
            "lr_warmup_steps",
            320,
            "linear warm-up, in optimizer steps (the paper's 20 rollout steps x 16)",
            "int",
            minimum=0,
        ),
        Setting("weight_decay", 0.1, "AdamW weight decay", "number", minimum=0),
        Setting(
            "grad_clip",
            1.0,
            "gradient clipping threshold; None: no clipping",
            "number",
            minimum=0,
            above=True,
            nullable=True,
            rllib=True,
        ),
        Setting(
            "grad_clip_by", "global_norm", "what grad_clip bounds", "choice", choices=GRAD_CLIP_BY_CHOICES, rllib=True
        ),
        # -- the loss ----------------------------------------------------------------------------------
        Setting(
            "clip_low",
            0.2,
            "epsilon_low: the ratio may fall to 1 - clip_low",
            "number",
            check=_clip_problem("clip_low"),
        ),
        Setting(
            "clip_high",
            0.28,
            "epsilon_high (Clip-Higher): the ratio may rise to 1 + clip_high; math.inf: no bound",
            "number",
            check=_clip_problem("clip_high"),
        ),
        Setting(
            "dual_clip",
            None,
            "dual-clip constant c > 1 (reference scripts: 10.0); None: off",
            "number",
            nullable=True,
            check=_clip_problem("dual_clip"),
        ),
        Setting(
            "loss_agg",
            "token-mean",
            "token-level loss; 'seq-mean-token-mean' is GRPO's per-sample normaliser",
            "choice",
            choices=LOSS_AGGREGATIONS.keys(),
        ),
        Setting(
            "advantage_scale",
            "std",
            "(R - mean) / std per group; 'none': R - mean (Dr. GRPO)",
            "choice",
            choices=ADVANTAGE_SCALES,
        ),
        Setting(
            "kl_coef",
            0.0,
            "weight of a KL(policy || reference) penalty, the reference being the starting weights (placed by "
            "kl_placement); 0: off, as in DAPO (which drops the KL term)",
            "number",
            minimum=0,
        ),
        Setting(
            "kl_estimator",
            "k3",
            "per-token KL estimator with kl_coef > 0: 'k1' log r, 'k2' (log r)^2 / 2, 'k3' the low-variance "
            "1/r - 1 + log r (Schulman 2020; verl's low_var_kl)",
            "choice",
            choices=KL_ESTIMATORS.keys(),
        ),
        Setting(
            "kl_placement",
            "loss",
            "with kl_coef > 0: 'loss' adds kl_coef x the per-token estimate to the token loss; 'reward' "
            "deducts kl_coef x each response's summed estimate from its reward before the group advantages "
            "(verl's use_kl_in_reward)",
            "choice",
            choices=KL_PLACEMENTS,
        ),
        # -- dynamic sampling --------------------------------------------------------------------------
        Setting("dynamic_sampling", True, "train only on groups with both right and wrong answers", "bool"),
        Setting(
            "max_sampling_rounds", 10, "generation rounds per step before the limit", "int", hint="<= 0 for unlimited"
        ),
        Setting(
            "on_sampling_limit",
            "error",
            "at the round limit: 'error' stops, 'train' trains on what was kept",
            "choice",
            choices=ON_LIMIT_CHOICES,
        ),
        Setting(
            "generation_batch_prompts",
            None,
            f"prompts per generation round; None: {GENERATION_ROUND_FACTOR} x prompts_per_step, the paper's ratio",
            "int",
            minimum=1,
            nullable=True,
        ),
        # -- lengths and overlong shaping ----------------------------------------------------------------
        Setting("max_prompt_length", 2048, "prompt tokens; a longer prompt: see prompt_truncation", "int", minimum=1),
        Setting(
            "max_response_length",
            20480,
            "response tokens: 16,384 expected + the 4,096-token overlong cache",
            "int",
            minimum=1,
        ),
        Setting("overlong_cache_len", 4096, "L_cache of the soft overlong punishment", "int", minimum=0),
        Setting(
            "overlong_penalty_factor",
            1.0,
            "scale of the soft overlong punishment; 0 switches it off",
            "number",
            minimum=0,
        ),
        Setting("overlong_filter", True, "truncated responses carry no loss", "bool"),
        Setting(
            "prompt_truncation",
            "error",
            "a prompt over max_prompt_length: 'error' names it and stops (a silently "
            "cut question is a data bug), 'left' keeps its last tokens",
            "choice",
            choices=PROMPT_TRUNCATION_CHOICES,
        ),
        # -- sampling ----------------------------------------------------------------------------------
        Setting(
            "temperature",
            1.0,
            "sampling temperature (log-probs are of softmax(logits / T))",
            "number",
            minimum=0,
            above=True,
        ),
        Setting("top_p", 1.0, "nucleus sampling", "number", minimum=0, maximum=1, above=True),
        Setting("top_k", -1, "top-k sampling", "int", hint="<= 0 for off"),
        Setting(
            "apply_chat_template",
            None,
            "wrap prompts in the tokenizer's chat template; None: when it has one",
            "bool",
            nullable=True,
        ),
        # -- generation --------------------------------------------------------------------------------
        Setting(
            "generation_backend",
            "hf",
            "'hf': transformers generate; 'vllm': a vLLM engine per env runner",
            "choice",
            choices=GENERATION_BACKENDS,
        ),
        Setting(
            "generation_device",
            "auto",
            "hf backend: 'auto' (the GPU when the runner sees one), 'cpu', 'cuda[:N]'",
            "str",
            check=_generation_device_problem,
        ),
        Setting("generation_prompts_per_call", 64, "prompts per batched generate() call on a runner", "int", minimum=1),
        Setting(
            "share_prompt_forward",
            True,
            "run each prompt once per group and share its KV cache with the G responses "
            "(hf generation and the log-prob passes; same values, less work)",
            "bool",
        ),
        Setting("vllm_tensor_parallel_size", 1, "GPUs per vLLM engine (= num_gpus_per_env_runner)", "int", minimum=1),
        Setting(
            "vllm_dtype",
            "bfloat16",
            "vLLM engine weights; the sync casts the learner's weights to it",
            "choice",
            choices=VLLM_DTYPES,
        ),
        Setting(
            "vllm_gpu_memory_utilization",
            0.6,
            "share of each GPU a vLLM engine may take (weights + KV cache)",
            "number",
            minimum=0,
            maximum=1,
            above=True,
        ),
        Setting("vllm_enforce_eager", False, "no CUDA graphs in vLLM (faster start, slower decode)", "bool"),
        Setting(
            "vllm_sleep", False, "release the vLLM engine's GPU memory between rounds (engines sharing GPUs)", "bool"
        ),
        # -- asynchronous rollouts -----------------------------------------------------------------------
        Setting(
            "max_staleness",
            0,
            "remote env runners keep generating while the learners update; a response may come "
            "from weights up to this many rollout steps old",
            "int",
            minimum=0,
            hint="0: synchronous",
        ),
        Setting(
            "importance_weight_cap",
            2.0,
            "C of the behaviour importance weight min(pi_prox / pi_behav, C) on stale responses; None: no correction",
            "number",
            nullable=True,
            check=importance_weight_cap_problem,
        ),
        Setting(
            "off_policy_correction",
            "tis_token",
            "behaviour weight of stale responses, from rho = pi_prox / pi_behav: 'tis_token' min(rho, C) per "
            "token, 'tis_sequence' per response, 'mis_token' / 'mis_sequence' rho inside [importance_ratio_low, "
            "importance_ratio_high] and no loss outside, 'icepop' that mask alone (weight 1 inside), 'none' 1",
            "choice",
            choices=OFF_POLICY_CORRECTIONS.keys(),
        ),
        Setting(
            "importance_ratio_low",
            0.5,
            "lower end of the band of the masked corrections (mis_token, mis_sequence, icepop; prime-rl: 0.5)",
            "number",
            minimum=0,
            maximum=1,
            above=True,
        ),
        Setting(
            "importance_ratio_high",
            5.0,
            "upper end of that band (prime-rl: 5)",
            "number",
            minimum=1,
            hint="math.inf: no upper end",
        ),
        Setting(
            "off_policy_sequence_ratio",
            "product",
            "a response's rho in tis_sequence / mis_sequence: 'product' of its token ratios (its likelihood "
            "ratio), 'geometric_mean' (length-normalised)",
            "choice",
            choices=SEQUENCE_RATIOS,
        ),
        Setting(
            "recompute_old_logprobs",
            True,
            "recompute the old log-probs under the weights the update starts from; False: take the generator's",
            "bool",
        ),
        # -- the learner's passes --------------------------------------------------------------------------
        Setting("logprob_chunk_size", 1024, "tokens per chunk of the log-prob kernel", "int", minimum=1),
        Setting("logprob_batch_rows", 64, "rows per forward pass when recomputing old log-probs", "int", minimum=1),
        Setting("compute_entropy", True, "log the policy's token entropy (one extra pass per chunk)", "bool"),
        Setting(
            "mixed_precision",
            None,
            "'bf16': bf16 compute, float32 master weights; None: the weights' dtype",
            "choice",
            choices=MIXED_PRECISION_CHOICES,
        ),
        Setting("gradient_checkpointing", False, "recompute layer activations in backward (long responses)", "bool"),
        Setting(
            "micro_batch_tokens",
            0,
            "split each learner's update into micro-batches of at most this many padded "
            "tokens, accumulating gradients (the token mean stays exact)",
            "int",
            minimum=0,
            hint="0: one pass",
        ),
        # -- several learners ------------------------------------------------------------------------------
        Setting(
            "data_parallel",
            "ddp",
            "with num_learners > 1: 'ddp' replicates the weights, 'fsdp2' shards them",
            "choice",
            choices=DATA_PARALLEL_CHOICES,
        ),
        Setting(
            "sharded_checkpoint_dir",
            None,
            "fsdp2 across nodes: shared storage for the checkpoint shards; None: "
            "inside the checkpoint folder (persisted from the driver's node only)",
            "str",
            nullable=True,
        ),
        Setting(
            "sharded_checkpoints_kept",
            2,
            "shard folders kept there, newest first (the previous checkpoint's is always kept too)",
            "int",
            minimum=1,
        ),
        # -- reporting and safety --------------------------------------------------------------------------
        Setting("log_samples", 4, "responses reported per iteration in result['samples']", "int", minimum=0),
        Setting(
            "max_consecutive_nonfinite_updates",
            8,
            "NaN/inf updates are skipped; this many in a row stop the run",
            "int",
            minimum=1,
        ),
    ]
)

#: Keys of ``DAPOConfig().rl_module(model_config={...})`` (and the job's ``model`` / ``dtype``): what to load.
#: Anything else is refused by name, so that a typo or a feature not built is never ignored.
MODEL_CONFIG_KEYS: dict[str, str] = {
    "model": "a local Hugging Face model folder, a .gguf file or a preset name (required)",
    "dtype": "torch dtype name of the loaded weights (None: as saved; the tiny preset: float32)",
    "init_seed": "seed of a preset built from random weights (default: the config's seed)",
    "tiny_spec": "the tiny preset's shape (layers, hidden size, ...), for tests and benchmarks",
    "lora": "train LoRA adapters (peft, the lora extra) instead of every weight: a dict of "
    "r, alpha, target_modules, dropout (LORA_DEFAULTS fills the rest); None or absent: full fine-tuning",
}
#: Defaults of the keys of ``model_config["lora"]``; ``target_modules="all-linear"``: every linear
#: layer but the output head (peft's shorthand), or a list of module names such as ["q_proj", "v_proj"].
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "target_modules": "all-linear", "dropout": 0.0}
#: Output-head names that target_modules may not name (the log-prob kernel reads the head's weight directly).
LORA_REFUSED_TARGETS: tuple[str, ...] = ("lm_head", "embed_out", "output")


def lora_problems(value: Any) -> list[str]:
    """What is wrong with a ``model_config["lora"]`` value (empty when nothing); None means no LoRA."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"model_config['lora'] must be a dict of {sorted(LORA_DEFAULTS)} or None, got {value!r}"]
    problems = []
    unknown = sorted(set(value) - set(LORA_DEFAULTS))
    if unknown:
        problems.append(f"model_config['lora'] has unknown key(s) {unknown}; its keys are {sorted(LORA_DEFAULTS)}")
    values = {**LORA_DEFAULTS, **value}
    if not (is_int(values["r"]) and values["r"] >= 1):
        problems.append(f"model_config['lora']['r'] must be an integer >= 1, got {values['r']!r}")
    if not (is_number(values["alpha"]) and values["alpha"] > 0):
        problems.append(f"model_config['lora']['alpha'] must be a number > 0, got {values['alpha']!r}")
    if not (is_number(values["dropout"]) and 0 <= values["dropout"] < 1):
        problems.append(f"model_config['lora']['dropout'] must be in [0, 1), got {values['dropout']!r}")
    targets = values["target_modules"]
    names_ok = isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets)
    if targets != "all-linear" and not names_ok:
        problems.append(
            "model_config['lora']['target_modules'] must be 'all-linear' or a non-empty list of module names, "
            f"got {targets!r}"
        )
    elif names_ok and (head := sorted(set(targets) & set(LORA_REFUSED_TARGETS))):
        problems.append(
            f"model_config['lora']['target_modules'] names the output head {head}: the log-prob kernel reads "
            "the head's weight directly, so its adapter would be skipped"
        )
    return problems


#: Keys DAPO itself sets in the module's model_config from training settings (not the user's to set there).
MODULE_KEYS_FROM_SETTINGS: tuple[str, ...] = (
    "temperature",
    "logprob_chunk_size",
    "compute_entropy",
    "mixed_precision",
    "gradient_checkpointing",
    "share_prompt_forward",
)


#: DAPO's own settings and their defaults (the table's, less RLlib's own).
DAPO_SETTINGS: dict[str, Any] = {name: s.default for name, s in SETTINGS.items() if not s.rllib}
#: RLlib's own training settings, with the paper's values.
OPTIMIZER_DEFAULTS: dict[str, Any] = {name: s.default for name, s in SETTINGS.items() if s.rllib}


def setting_problems(values: dict[str, Any]) -> dict[str, str]:
    """Setting name -> the problem of its value alone, by the table, for the values that have one
    (cross-setting rules are DAPOConfig's)."""
    return {name: problem for name, value in values.items() if (problem := SETTINGS[name].problem(value)) is not None}


def paper_settings() -> SimpleNamespace:
    """Every default as attributes (``paper_settings().clip_high``), for code that builds no DAPOConfig."""
    return SimpleNamespace(**{name: setting.default for name, setting in SETTINGS.items()})


def settings_reference() -> str:
    """The settings reference page (``docs/settings.md``), from the table."""
    lines = [
        "# Settings reference",
        "",
        "Generated from the table in `dapo_rl/settings.py` (`dapo_rl.settings.settings_reference()`); do not edit by hand.",
        "Every setting of `DAPOConfig().training(...)`, also a key of a job file or of `dapo-rl train --set`. The",
        "defaults are the paper's Qwen2.5-32B run; `validate()` refuses a value outside its allowed values, naming it.",
        "",
        "| setting | default | allowed values | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for setting in SETTINGS.values():
        doc = setting.doc.replace("|", "\\|")
        if setting.rllib:
            doc += " (RLlib's setting, DAPO's default)"
        lines.append(f"| `{setting.name}` | `{setting.default!r}` | {setting.describe()} | {doc} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "DAPO_SETTINGS",
    "DATA_PARALLEL_CHOICES",
    "GENERATION_BACKENDS",
    "GENERATION_ROUND_FACTOR",
    "MIXED_PRECISION_CHOICES",
    "LORA_DEFAULTS",
    "MODEL_CONFIG_KEYS",
    "MODULE_KEYS_FROM_SETTINGS",
    "OPTIMIZER_DEFAULTS",
    "PROMPT_TRUNCATION_CHOICES",
    "SETTINGS",
    "Setting",
    "paper_settings",
    "setting_problems",
    "lora_problems",
    "settings_reference",
]
