"""A trained algorithm's policy out of RLlib: exported as a Hugging Face folder, synced to the env
runner, read by `dapo-rl eval` from a training checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import (
    learner_weights,
    make_config,
    max_abs_diff,
)


@pytest.fixture(scope="module")
def trained_algo(ray_session):
    algo = make_config(overlong_filter=False).build_algo()
    initial = {k: np.array(v, copy=True) for k, v in algo.env_runner.module.get_state().items()}
    algo.train()
    yield algo, initial
    algo.stop()


def test_export_policy_loads_with_transformers(trained_algo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    algo, _ = trained_algo
    folder = algo.export_policy(tmp_path / "policy")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    learner = {key.removeprefix("causal_lm."): value for key, value in learner_weights(algo).items()}
    exported = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    assert set(learner) <= set(exported)
    assert max_abs_diff(learner, {key: exported[key] for key in learner}) == 0.0
    module_tokenizer = algo.env_runner.module.tokenizer
    text = "What is 12 + 30? Answer: 42"
    assert tokenizer(text).input_ids == module_tokenizer(text).input_ids
    assert tokenizer.eos_token_id == module_tokenizer.eos_token_id
    assert tokenizer.pad_token_id == module_tokenizer.pad_token_id


def test_env_runner_weights_follow_the_learner(trained_algo):
    algo, initial = trained_algo
    learner = learner_weights(algo)
    runner = {k: np.asarray(v) for k, v in algo.env_runner.module.get_state().items()}
    assert max_abs_diff(initial, learner) > 0  # training changed the weights ...
    assert max_abs_diff(runner, learner) == 0.0  # ... and the env runner has the new ones


def test_eval_command_reads_a_training_checkpoint(trained_algo, tmp_path, capsys):
    """`dapo-rl eval --model CHECKPOINT` evaluates the checkpoint's policy (exported on the fly)."""

    from dapo_rl.cli import main

    checkpoint = tmp_path / "checkpoint"
    algo, _ = trained_algo
    algo.save_to_path(str(checkpoint))
    assert (
        main(
            [
                "eval",
                "--model",
                str(checkpoint),
                "--env",
                "dapo/Arithmetic-v0",
                "--samples",
                "2",
                "--problems",
                "3",
                "--max-new-tokens",
                "4",
                "--env-config",
                "split=test",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") :])
    assert result["num_problems"] == 3 and result["samples"] == 2
