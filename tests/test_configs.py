"""Every job file shipped in configs/ loads and builds a valid DAPOConfig (without loading its model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dapo_rl.jobs import build_config, load_job

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert [path.name for path in CONFIGS] == [
        "cluster-arithmetic.yaml",
        "smollm2-arithmetic-lora.yaml",
        "smollm2-arithmetic.yaml",
        "tiny-calculator.yaml",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_builds_a_valid_dapo_config(path):
    job = load_job(str(path), [])
    config = build_config(job)
    assert config.policy_model == job["model"]
    assert config.env == job["env"] and config.env_config == job["env_config"]
    assert {key: getattr(config, key) for key in job["training"]} == job["training"]
