"""A short learning run: DAPO raises held-out accuracy on the arithmetic task (the main job, cut down).

Everything is seeded, so the run is deterministic on a given machine and torch build; the margin
asked for is well below what the run gains, so it does not hinge on one lucky sample.
"""

import json
from pathlib import Path

import pytest

from dapo_rl.jobs import load_job, train


@pytest.mark.slow
def test_dapo_raises_held_out_accuracy(ray_session, tmp_path, monkeypatch):
    job = load_job(None, LEARNING_RUN)
    # A relative output folder, as README's command gives: Tune runs the trial in another directory.
    monkeypatch.chdir(tmp_path)
    summary = train(job, Path("run"))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["eval_accuracy_before"] == summary["eval_accuracy_before"]
    assert saved["iterations"] == job["iterations"]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    gain = summary["eval_accuracy_after"] - summary["eval_accuracy_before"]
    print(f"held-out accuracy {summary['eval_accuracy_before']:.3f} -> {summary['eval_accuracy_after']:.3f}")
    assert gain >= MIN_GAIN, summary


LEARNING_RUN = [
    "iterations=40",
    "eval_problems=100",
]
MIN_GAIN = 0.08
