"""Checkpoints of the algorithm: restored in a new process, restored on steps with a real training
signal, and the lr warm-up counted in optimizer steps across a restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ray.rllib.core import DEFAULT_MODULE_ID

from tests.helpers import (
    MIXED,
    SCRIPTED,
    ScriptedGeneration,
    built_algo,
    learner_weights,
    make_config,
    max_abs_diff,
    record_step_lrs,
)

_RESTORE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import ray
    import ray.tune.trainable.trainable as trainable_module
    trainable_module.DEFAULT_STORAGE_PATH = sys.argv[3]
    ray.init(address=sys.argv[1], log_to_driver=False)
    from ray.rllib.algorithms.algorithm import Algorithm
    algo = Algorithm.from_checkpoint(sys.argv[2])
    result = algo.train()
    weights = algo.learner_group.get_weights()["default_policy"]
    np.savez(sys.argv[4], **{k: np.asarray(v) for k, v in weights.items()})
    learner = result["learners"]["default_policy"]
    print("RESULT " + json.dumps({
        "type": type(algo).__name__,
        "training_iteration": int(result["training_iteration"]),
        "dapo": {k: float(v) for k, v in result["dapo"].items() if not k.endswith("seconds")},
        "policy_loss": float(learner["policy_loss"]),
        "grad_norm": float(learner["gradients_default_optimizer_global_norm"]),
    }))
    algo.stop()
    """
)

_TIMING_KEYS = ("generate_seconds", "score_seconds", "step_seconds", "generated_tokens_per_second")


def test_checkpoint_restored_in_new_process_continues_identically(ray_session, tmp_path):
    config = make_config(overlong_filter=False)
    with built_algo(config) as algo:
        algo.train()
        checkpoint = str(tmp_path / "checkpoint")
        algo.save_to_path(checkpoint)
        expected = algo.train()  # the uninterrupted run's iteration 2
        expected_weights = learner_weights(algo)

    script = tmp_path / "restore.py"
    script.write_text(_RESTORE_SCRIPT)
    weights_file = tmp_path / "restored_weights.npz"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(script), ray_session["address"], checkpoint, ray_session["results"], str(weights_file)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-3000:] + completed.stderr[-5000:]
    restored = json.loads(lines[-1][len("RESULT ") :])

    assert restored["type"] == "DAPO"
    assert restored["training_iteration"] == 2
    for key, value in expected["dapo"].items():
        if key in _TIMING_KEYS:
            continue
        # nan_ok: a mean over nothing is NaN by design (e.g. dropped_response_length_mean when none was dropped).
        assert restored["dapo"][key] == pytest.approx(float(value), rel=1e-6, abs=1e-6, nan_ok=True), key
    learner = expected["learners"][DEFAULT_MODULE_ID]
    assert restored["policy_loss"] == pytest.approx(float(learner["policy_loss"]), rel=1e-6, abs=1e-6)
    assert restored["grad_norm"] == pytest.approx(float(learner["gradients_default_optimizer_global_norm"]), rel=1e-6)
    with np.load(weights_file) as restored_weights:
        assert max_abs_diff(expected_weights, dict(restored_weights)) <= 1e-6


def test_restore_continues_identically_on_steps_with_training_signal(ray_session, tmp_path):
    """Save after one step, restore into a new algorithm, step again: the same update as the
    uninterrupted run's second step. Every group is mixed, so advantages, loss and gradients are not
    zero, and the mini-batches' composition (the shuffle generator) changes the weights."""
    settings = dict(**SCRIPTED, overlong_filter=False)
    with built_algo(make_config(**settings)) as algo:
        ScriptedGeneration(algo, [MIXED])
        algo.train()
        checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
        expected = algo.train()
        expected_weights = learner_weights(algo)
    expected_learner = expected["learners"][DEFAULT_MODULE_ID]
    assert expected_learner["gradients_default_optimizer_global_norm"] > 0 and expected_learner["policy_loss"] != 0

    with built_algo(make_config(**settings)) as restored:
        restored.restore_from_path(checkpoint)
        ScriptedGeneration(restored, [MIXED])
        got = restored.train()
        got_weights = learner_weights(restored)
    got_learner = got["learners"][DEFAULT_MODULE_ID]
    for key in ("policy_loss", "gradients_default_optimizer_global_norm", "entropy"):
        assert float(got_learner[key]) == pytest.approx(float(expected_learner[key]), rel=1e-6, abs=1e-9), key
    assert max_abs_diff(expected_weights, got_weights) <= 1e-6


def test_lr_warmup_per_optimizer_step_survives_save_and_restore(ray_session, tmp_path):
    lr, warmup = 1e-4, 4
    settings = dict(overlong_filter=False, lr=lr, lr_warmup_steps=warmup)  # 2 updates per iteration

    def rate(k: int) -> float:
        return lr * min(1.0, (k + 1) / warmup)

    with built_algo(make_config(**settings)) as algo:
        rates = record_step_lrs(algo)
        results = [algo.train()]
        checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
        results.append(algo.train())
        weights_after_2 = learner_weights(algo)
        results.append(algo.train())
    assert rates == pytest.approx([rate(k) for k in range(6)], rel=1e-6)
    # RLlib logs, after each update, the rate the schedule sets for the next one; an iteration
    # reports the mean over its 2 updates.
    logged = [float(r["learners"][DEFAULT_MODULE_ID]["default_optimizer_learning_rate"]) for r in results]
    assert logged == pytest.approx([(rate(2 * i + 1) + rate(2 * i + 2)) / 2 for i in range(3)], rel=1e-6)

    with built_algo(make_config(**settings)) as restored:
        restored.restore_from_path(checkpoint)
        restored_rates = record_step_lrs(restored)
        result = restored.train()
        restored_weights = learner_weights(restored)
    assert restored_rates == pytest.approx(rates[2:4], rel=1e-6)  # [3/4, 1] x lr, as uninterrupted
    expected, got = results[1]["learners"][DEFAULT_MODULE_ID], result["learners"][DEFAULT_MODULE_ID]
    for key in ("default_optimizer_learning_rate", "policy_loss", "gradients_default_optimizer_global_norm"):
        assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-6, abs=1e-9), key
    assert result["dapo"]["optimizer_steps"] == 4
    assert max_abs_diff(restored_weights, weights_after_2) <= 1e-6
