"""The settings table (dapo_rl.settings.SETTINGS): each setting declared once, and everything that
reads settings (DAPOConfig, its validate(), the job parser, docs/settings.md) reading that table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dapo_rl import DAPOConfig
from dapo_rl.jobs import JobError, load_job
from dapo_rl.rllib.dapo import InvalidConfigError
from dapo_rl.settings import SETTINGS, Setting, _setting_table, settings_reference
from tests.helpers import make_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_page_is_generated_from_the_table():
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert page == settings_reference(), (
        "regenerate it: python -c \"import dapo_rl.settings as s; print(s.settings_reference(), end='')\" > docs/settings.md"
    )
    assert all(f"| `{name}` |" in page for name in SETTINGS)


def test_dapoconfig_takes_every_default_from_the_table():
    config = DAPOConfig()
    for name, setting in SETTINGS.items():
        assert getattr(config, name) == setting.default, name


#: Allowed values declared outside settings.py on purpose: the Ray-free core's function contracts
#: (the table refers to these very objects), and the command line's words for a setting's values.
CONTRACTS_OUTSIDE_THE_TABLE = {
    "dapo_rl/core/sampling.py": "ON_LIMIT_CHOICES",
    "dapo_rl/cli.py": "CHAT_TEMPLATE_CHOICES",
}


def test_the_table_refers_to_the_cores_own_contracts():
    from dapo_rl.core.advantages import ADVANTAGE_SCALES
    from dapo_rl.core.losses import LOSS_AGGREGATIONS
    from dapo_rl.core.sampling import ON_LIMIT_CHOICES

    assert SETTINGS["on_sampling_limit"].choices is ON_LIMIT_CHOICES
    assert SETTINGS["advantage_scale"].choices is ADVANTAGE_SCALES
    assert set(SETTINGS["loss_agg"].choices) == set(LOSS_AGGREGATIONS)  # a live view: registered ones count


def test_no_setting_is_declared_outside_the_table():
    """Allowed values, nullability and defaults of settings live in dapo_rl/settings.py only."""
    declared_elsewhere = []
    for path in sorted((ROOT / "dapo_rl").rglob("*.py")):
        if path.name == "settings.py":
            continue
        allowed = CONTRACTS_OUTSIDE_THE_TABLE.get(str(path.relative_to(ROOT)), "-")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.match(r"\s*[A-Z_]*(_CHOICES|NULLABLE_KEYS|_BACKENDS)\s*[:=]", line) and not line.startswith(allowed):
                declared_elsewhere.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
            if re.search(r"setattr\(self, name, default\)", line):
                declared_elsewhere.append(f"{path.relative_to(ROOT)}:{number}: defaults set outside the table")
    assert not declared_elsewhere, "\n".join(declared_elsewhere)


def test_a_setting_cannot_be_declared_twice():
    twice = [Setting("x", 1, "a", "int"), Setting("x", 2, "b", "int")]
    with pytest.raises(ValueError, match="setting 'x' is declared twice"):
        _setting_table(twice)


@pytest.mark.parametrize("name", [name for name, setting in SETTINGS.items() if not setting.rllib])
def test_validate_refuses_a_value_of_the_wrong_type_by_name(name):
    config = make_config(**{name: object()})
    with pytest.raises(InvalidConfigError, match=rf"- {name} must be ") as raised:
        config.validate()
    assert "object object at" in str(raised.value)


@pytest.mark.parametrize("name", [name for name, setting in SETTINGS.items() if setting.rllib])
def test_rllibs_own_settings_are_refused_by_name_too(name):
    """RLlib checks some of its own settings first (in training() or validate()), in its words."""
    with pytest.raises(ValueError, match=rf"{name}") as raised:
        make_config(**{name: object()}).validate()
    assert "object object at" in str(raised.value)


@pytest.mark.parametrize("name", SETTINGS)
def test_every_default_passes_its_own_check(name):
    assert SETTINGS[name].problem(SETTINGS[name].default) is None


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("group_size=1", "--set group_size=1: group_size must be an integer >= 2 (advantages need a group), got 1"),
        ("top_p=1.5", "--set top_p=1.5: top_p must be in (0, 1], got 1.5"),
        ("loss_agg=sum", "--set loss_agg=sum: loss_agg must be one of"),
        ("importance_weight_cap=0.5", "importance_weight_cap must be None (no correction) or a number >= 1"),
        ("dynamic_sampling=maybe", "dynamic_sampling must be True or False, got 'maybe'"),
    ],
)
def test_the_job_parser_checks_training_settings_by_the_table(assignment, message):
    with pytest.raises(JobError, match=re.escape(message)):
        load_job(None, [assignment])


def test_the_job_parser_reads_numbers_as_the_table_types_them():
    job = load_job(None, ["lr=1e-5", "weight_decay=0", "importance_weight_cap=null", "grad_clip=null"])
    training = job["training"]
    assert training["lr"] == 1e-5 and isinstance(training["weight_decay"], float)
    assert training["importance_weight_cap"] is None and training["grad_clip"] is None


def test_derived_values_are_properties():
    assert not DAPOConfig().is_async and DAPOConfig().training(max_staleness=2).is_async
    assert DAPOConfig().training(recompute_old_logprobs=False).needs_generator_logprobs
    assert DAPOConfig().training(max_staleness=1).needs_generator_logprobs
    assert not DAPOConfig().needs_generator_logprobs
    assert DAPOConfig().learner_shards == 1 and DAPOConfig().learners(num_learners=3).learner_shards == 3


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        (
            {"model": "tiny-qwen2", "adapters": {"r": 16}},
            "model_config has unknown key(s) ['adapters']; its keys are ['dtype', 'init_seed', 'lora', 'model', 'tiny_spec']",
        ),
        ({"model": "tiny-qwen2", "dtyp": "bfloat16"}, "unknown key(s) ['dtyp']"),
        (
            {"model": "tiny-qwen2", "temperature": 0.7},
            "model_config key(s) ['temperature'] are training settings: set them with .training(temperature=...) instead",
        ),
    ],
)
def test_an_unknown_model_config_key_is_refused_not_ignored(model_config, message):
    config = make_config().rl_module(model_config=model_config)
    with pytest.raises(InvalidConfigError) as raised:
        config.validate()
    assert message in str(raised.value)
    make_config().rl_module(model_config={"model": "tiny-qwen2", "dtype": "float32", "init_seed": 3}).validate()


def test_an_unknown_env_config_key_is_refused_by_validate_too():
    """The Python API refuses it as the command line does, naming the keys the environment takes."""
    config = make_config(env_config={"operators": "+", "digitz": 3})
    with pytest.raises(InvalidConfigError) as raised:
        config.validate()
    message = str(raised.value)
    assert "unknown env_config key(s) ['digitz'] for dapo/Arithmetic-v0; it takes:" in message and "digits" in message
