"""reproduce.settings and reproduce.scales: the paper's settings, Table 1's rows, the three scales.

Builds and validates DAPOConfig objects only: no Ray cluster, no model loaded.
"""

from __future__ import annotations

import itertools

import gymnasium as gym
import pytest

from dapo_rl.jobs import DEFAULT_JOB
from dapo_rl.models.loading import TINY_PRESET, build_char_tokenizer
from dapo_rl.reproduce import scales, settings
from dapo_rl.reproduce.scales import SCALES, apply_scale, resource_plan, scale_overrides
from dapo_rl.reproduce.settings import (
    PAPER_TABLE1,
    REFERENCE_REPRODUCTIONS,
    TECHNIQUE_KEYS,
    TECHNIQUES,
    aime_eval_32b,
    dapo_32b,
    table1_rows,
)
from dapo_rl.rllib.dapo import DAPO_SETTINGS, DAPOConfig

#: DAPOConfig attributes that make up a row: DAPO's own settings and RLlib's optimizer ones.
COMPARED = [*DAPO_SETTINGS, "lr", "grad_clip", "num_epochs"]

#: docs/paper_facts.md, "Settings of the 32B run": (facts row, DAPOConfig attribute, paper, reference script).
#: Warm-up in optimizer steps: 16 updates per rollout step; paper 20 rollout steps, the script's
#: verl lr_warmup_steps=10 counts rollout steps too (verl steps its scheduler once per update_actor).
FACTS_32B = [
    ("model", "policy_model", "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B"),
    ("optimizer: constant lr", "lr", 1e-6, 1e-6),
    ("weight decay", "weight_decay", 0.1, 0.1),
    ("grad clip", "grad_clip", 1.0, 1.0),
    ("warm-up (20 rollout steps / 10 steps)", "lr_warmup_steps", 20 * 16, 10 * 16),
    ("prompts per rollout step", "prompts_per_step", 512, 512),
    ("generation batch (3 x 512 unless set)", "generation_round_prompts", 1536, 1536),
    ("responses per prompt (G)", "group_size", 16, 16),
    ("mini-batch (32 prompts)", "minibatch_prompts", 32, 32),
    ("16 gradient updates per rollout step: one pass", "num_epochs", 1, 1),
    ("max prompt length", "max_prompt_length", 2048, 2048),
    ("max response length", "max_response_length", 20480, 20480),
    ("overlong cache / buffer", "overlong_cache_len", 4096, 4096),
    ("overlong penalty factor", "overlong_penalty_factor", 1.0, 1.0),
    ("overlong filtering (scripts: not implemented)", "overlong_filter", True, False),
    ("ε_low / clip_ratio_low", "clip_low", 0.2, 0.2),
    ("ε_high / clip_ratio_high", "clip_high", 0.28, 0.28),
    ("dual-clip c", "dual_clip", None, 10.0),
    ("loss aggregation (scripts: token mean per micro-batch)", "loss_agg", "token-mean", "token-mean-legacy"),
    ("advantage: (R - mean) / std", "advantage_scale", "std", "std"),
    ("dynamic sampling", "dynamic_sampling", True, True),
    ("dynamic sampling: give up after 10 rounds", "max_sampling_rounds", 10, 10),
    ("training sampling temperature", "temperature", 1.0, 1.0),
    ("training sampling top_p", "top_p", 1.0, 1.0),
    ("training sampling top_k off", "top_k", -1, -1),
]

TABLE1_NAMES = [
    "Naive GRPO",
    "+ Overlong Filtering",
    "+ Clip-Higher",
    "+ Soft Overlong Punishment",
    "+ Token-level Loss",
    "+ Dynamic Sampling (DAPO)",
]


def settings_of(config) -> dict:
    return {name: getattr(config, name) for name in COMPARED}


def changed(before, after) -> set[str]:
    old, new = settings_of(before), settings_of(after)
    return {name for name in COMPARED if old[name] != new[name]}


@pytest.fixture(scope="module")
def rows_by_variant():
    return {variant: table1_rows(dapo_32b(variant)) for variant in settings.VARIANTS}


# -- the 32B run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, column", [("paper", 0), ("reference-script", 1)])
def test_32b_settings_match_the_facts(variant, column):
    config = dapo_32b(variant)
    wrong = {
        row: (attribute, getattr(config, attribute), expected[column])
        for row, attribute, *expected in FACTS_32B
        if getattr(config, attribute) != expected[column]
    }
    assert wrong == {}
    assert config.env == "dapo/DAPOMath17k-v0"
    assert config.model_config == {"model": "Qwen/Qwen2.5-32B", "dtype": "float32"}
    # float32 master weights, bf16 compute, activation checkpointing: as verl's FSDP workers run it.
    assert (config.mixed_precision, config.gradient_checkpointing) == ("bf16", True)
    assert settings.updates_per_rollout_step(config) == 16
    config.validate()


def test_32b_overlays_hold_only_differences_from_the_defaults():
    # dapo_rl.settings (DAPO_SETTINGS, OPTIMIZER_DEFAULTS) is the one home of the paper's values: an overlay that
    # restated one would be a second home.
    defaults = DAPOConfig()
    for overlay in (settings.COMMON_32B, *settings.VARIANTS.values()):
        assert {key: value for key, value in overlay.items() if getattr(defaults, key) == value} == {}
    assert all(getattr(defaults, key) == value for change in TECHNIQUES.values() for key, value in change.items())


def test_variants_differ_in_warmup_overlong_filter_dual_clip_and_loss_only():
    differences = changed(dapo_32b("paper"), dapo_32b("reference-script"))
    assert differences == {"lr_warmup_steps", "overlong_filter", "dual_clip", "loss_agg"}


def test_model_path_is_used():
    config = dapo_32b(model_path="/models/qwen32b")
    assert config.model_config == {"model": "/models/qwen32b", "dtype": "float32"}


def test_unknown_variant_names_the_variants():
    with pytest.raises(ValueError, match=r"unknown variant 'verl'.*paper, reference-script"):
        dapo_32b("verl")


def test_aime_eval():
    evaluation = aime_eval_32b()
    assert (
        evaluation.env,
        evaluation.samples,
        evaluation.temperature,
        evaluation.top_p,
        evaluation.max_new_tokens,
        evaluation.metric,
    ) == ("dapo/AIME24-v0", 32, 1.0, 0.7, 20480, "avg@32")
    assert evaluation.env in gym.registry
    with pytest.raises(AttributeError):
        evaluation.samples = 4  # frozen


# -- Table 1 -------------------------------------------------------------------------------------


def test_table1_names_and_paper_scores():
    assert list(table1_rows()) == TABLE1_NAMES
    assert list(PAPER_TABLE1.items()) == list(zip(TABLE1_NAMES, [30, 36, 38, 41, 42, 50]))
    assert dict(REFERENCE_REPRODUCTIONS) == {
        "DAPO (full)": 52,
        "DAPO without dynamic sampling": 50,
        "DAPO early (no token-level loss, no dynamic sampling)": 44,
    }
    assert settings.TABLE1_SOURCE and settings.REFERENCE_REPRODUCTIONS_SOURCE


@pytest.mark.parametrize("variant", list(settings.VARIANTS))
def test_each_row_adds_exactly_its_technique(rows_by_variant, variant):
    rows = list(rows_by_variant[variant].items())
    for (_, before), (name, after) in itertools.pairwise(rows):
        assert changed(before, after) == set(TECHNIQUES[name]), name
        assert all(getattr(after, key) == value for key, value in TECHNIQUES[name].items())


def test_naive_grpo_row():
    naive = table1_rows()["Naive GRPO"]
    assert (
        naive.loss_agg,
        naive.clip_low,
        naive.clip_high,
        naive.dynamic_sampling,
        naive.overlong_filter,
        naive.overlong_penalty_factor,
    ) == ("seq-mean-token-mean", 0.2, 0.2, False, False, 0.0)
    assert changed(dapo_32b(), naive) == TECHNIQUE_KEYS


def test_last_row_is_dapo_and_base_is_untouched():
    base = dapo_32b()
    before = settings_of(base)
    last = table1_rows(base)["+ Dynamic Sampling (DAPO)"]
    assert settings_of(last) == settings_of(dapo_32b())
    assert (last.env, last.model_config) == (base.env, base.model_config)
    assert last is not base
    assert settings_of(base) == before


def test_techniques_cover_the_technique_keys():
    assert {key for change in TECHNIQUES.values() for key in change} == TECHNIQUE_KEYS
    assert set(TECHNIQUE_KEYS) <= set(DAPO_SETTINGS)


# -- scales --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
def test_every_row_validates_at_every_scale(rows_by_variant, scale):
    # The gpu / paper model folders do not exist here: validate() must not load the model. The
    # paper scale's vLLM is needed on the cluster, not on the machine that checks its settings.
    for variant, rows in rows_by_variant.items():
        scaled = [apply_scale(row, scale) for row in rows.values()]
        for config in scaled:
            config.validate_settings(require_installed=scale != "paper")
        pairs = list(zip(rows, scaled))
        for (_, before), (name, after) in itertools.pairwise(pairs):
            assert changed(before, after) == set(TECHNIQUES[name]), (variant, scale, name)


@pytest.mark.parametrize("scale", SCALES)
def test_scales_leave_the_techniques_alone(scale):
    assert not set(scale_overrides(scale).get("training", {})) & TECHNIQUE_KEYS


def test_paper_scale_changes_only_the_placement():
    config = dapo_32b()
    scaled = apply_scale(config, "paper")
    placement = scales.PAPER_PLACEMENT["training"]
    assert {k: v for k, v in settings_of(scaled).items() if k not in placement} == {
        k: v for k, v in settings_of(config).items() if k not in placement
    }
    assert {k: getattr(scaled, k) for k in placement} == placement
    assert (scaled.env, scaled.model_config) == (config.env, config.model_config)
    moved = apply_scale(config, "paper", model_path="/elsewhere")
    assert moved.model_config == {"model": "/elsewhere", "dtype": "float32"}


def test_gpu_scale():
    for variant, warmup in (("paper", 20 * 4), ("reference-script", 10 * 4)):
        config = apply_scale(dapo_32b(variant), "gpu", model_path="/models/qwen1.5b")
        assert config.env == "dapo/DAPOMath17k-v0"
        assert config.model_config == {"model": "/models/qwen1.5b", "dtype": "float32"}
        assert (
            config.prompts_per_step,
            config.group_size,
            config.minibatch_prompts,
            config.generation_batch_prompts,
            config.max_response_length,
            config.overlong_cache_len,
            config.lr,
        ) == (64, 8, 16, 192, 2048, 512, 1e-6)
        # The warm-up keeps its length in rollout steps: 4 updates per rollout step here.
        assert settings.updates_per_rollout_step(config) == 4 and config.lr_warmup_steps == warmup
    assert apply_scale(dapo_32b(), "gpu").policy_model == scales.GPU_MODEL


def test_tiny_scale_is_the_cpu_job():
    config = apply_scale(dapo_32b(), "tiny")
    assert (config.env, config.env_config, config.model_config) == (
        DEFAULT_JOB["env"],
        DEFAULT_JOB["env_config"],
        {"model": TINY_PRESET},
    )
    expected = {**DEFAULT_JOB["training"], **scales.TINY_RESPONSE_BUDGET}
    for key, value in expected.items():
        if key not in TECHNIQUE_KEYS:
            assert getattr(config, key) == value, key
    assert (config.seed, config.num_learners, config.num_env_runners) == (
        DEFAULT_JOB["seed"],
        DEFAULT_JOB["num_learners"],
        DEFAULT_JOB["num_env_runners"],
    )
    assert apply_scale(dapo_32b(), "tiny", model_path="/runs/warmstart").model_config == {"model": "/runs/warmstart"}


def test_tiny_response_budget_spares_correct_answers_only():
    env = gym.make(DEFAULT_JOB["env"], **DEFAULT_JOB["env_config"]).unwrapped
    answers = [env.solution_text(env.problem(index)) for index in range(env.num_problems)]
    longest = max(answers, key=lambda text: len(text.encode()))
    longest_tokens = len(build_char_tokenizer()(longest, add_special_tokens=False).input_ids) + 1  # + EOS
    assert longest_tokens == scales.TINY_LONGEST_ANSWER_TOKENS
    budget = scales.TINY_RESPONSE_BUDGET
    penalty_free = budget["max_response_length"] - budget["overlong_cache_len"]
    # No correct answer is punished, and anything longer is.
    assert penalty_free == longest_tokens


def test_unknown_scale_names_the_scales():
    with pytest.raises(ValueError, match=r"unknown scale 'cluster'.*paper, gpu, tiny"):
        scale_overrides("cluster")
    with pytest.raises(ValueError, match="unknown scale"):
        apply_scale(dapo_32b(), "cluster")


def test_resource_plan_of_the_paper_run():
    config = apply_scale(dapo_32b(), "paper", model_path="/models/qwen32b")
    config.validate_settings(require_installed=False)
    plan = resource_plan(config)
    assert "never run" in plan["status"]
    assert plan["gpus"] == 128
    assert plan["generation"] == {
        "backend": "vllm",
        "gpus": 64,
        "engines": 16,
        "tensor_parallel": 4,
        "responses_per_round": 1536 * 16,
        "responses_per_engine_per_round": 1536.0,
        "max_generated_tokens_per_round": 1536 * 16 * 20480,
    }
    assert plan["learners"]["gpus"] == 64 and plan["learners"]["data_parallel"] == "fsdp2"
    assert plan["learners"]["responses_per_learner_per_update"] == 8
    assert plan["learners"]["micro_batch_tokens"] == 2048 + 20480
    assert "128 H20" in plan["paper_cluster"] and "sequence parallel 8" in plan["paper_cluster"]
    assert plan["responses_per_step"] == 512 * 16
    assert plan["updates_per_step"] == 16
    assert plan["max_tokens_per_step"] == 512 * 16 * (2048 + 20480)
    assert plan["max_tokens_per_update"] == 32 * 16 * (2048 + 20480)


def test_paper_placement_places_every_row_alike():
    for config in settings.table1_rows().values():
        paper = apply_scale(config, "paper")
        assert (paper.num_learners, paper.num_gpus_per_learner) == (64, 1)
        assert (paper.num_env_runners, paper.num_gpus_per_env_runner) == (16, 4)


def test_cluster_check_names_what_is_missing():
    from dapo_rl.reproduce.cluster import ClusterTooSmallError, check_cluster

    config = apply_scale(dapo_32b(), "paper")
    check_cluster({"GPU": 128.0, "CPU": 1024.0}, config)
    with pytest.raises(
        ClusterTooSmallError, match=r"needs 128 GPUs \(16 vLLM engines x 4 \+ 64 learners x 1\); .* has 8"
    ):
        check_cluster({"GPU": 8.0}, config)


def test_tiny_scale_computes_like_the_cpu_job():
    for config in settings.table1_rows().values():
        tiny = scales.apply_scale(config, "tiny")
        assert (tiny.mixed_precision, tiny.gradient_checkpointing) == (None, False)
