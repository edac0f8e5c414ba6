"""``dapo-rl train --resume`` after a real SIGKILL: the resumed run's metrics equal an unstopped run's.

Each scenario runs the real command three times in subprocesses, each with its own local Ray
cluster: once to the end (the reference), once killed with SIGKILL (its whole process group: the
driver, Ray, the trial, the learners) part-way, and once resumed from the killed run's folder.
Dynamic sampling, overlong filtering (both on by default) and lr warm-up (3 optimizer steps) are on,
and every iteration is checkpointed. DAPO starts from a model warm-started once in this module, so
groups hold right and wrong answers and every iteration really trains.

- One learner, killed once the checkpoint of iteration 2 is complete.
- Two FSDP2 learners writing their shards to a shared folder, killed the moment the folder of a
  later checkpoint appears (while Tune is copying it): the resume must pass over that checkpoint if
  the copy was cut, and the shards of every checkpoint Tune kept must still be there.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import pytest

import dapo_envs  # noqa: F401  (registers dapo/ ids)
from dapo_rl.jobs import experiment_folder, iteration_results
from dapo_rl.jobs.warmstart import WarmStartSettings, supervised_warmstart
from dapo_rl.models.distributed import sharded_state_folder
from dapo_rl.models.loading import TINY_PRESET, load_policy, save_policy
from dapo_rl.rllib.checkpoints import checkpoint_problem, complete_checkpoints, newest_complete_checkpoint
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings

ITERATIONS = 5
#: Every job of this module: the main job's settings, shorter, checkpointing every iteration.
SETTINGS = [
    f"iterations={ITERATIONS}",
    "checkpoint_every=1",
    "keep_checkpoints=2",
    "warmstart_steps=0",
    "eval_problems=2",
    "eval_samples=1",
    "lr_warmup_steps=3",
    "prompts_per_step=8",
    "generation_batch_prompts=12",
]
#: Metrics that measure time, not training, and the count of weight broadcasts (a restore adds one).
TIMING_WORDS = ("seconds", "per_second", "time", "throughput", "weights_seq_no")


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory) -> Path:
    """The tiny preset after 300 supervised warm-start steps: a few percent right, so some groups mix."""
    model, tokenizer = load_policy(TINY_PRESET, seed=0)
    env = gym.make("dapo/Arithmetic-v0", operators="+").unwrapped
    encoder = GenerationRunner(env, tokenizer, None, PromptSettings(64, None))
    supervised_warmstart(model, tokenizer, env, encoder.encode_prompt, WarmStartSettings(steps=300, seed=0))
    folder = tmp_path_factory.mktemp("warm") / "model"
    save_policy(model, tokenizer, folder)
    return folder


def train_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "dapo_rl.cli", "train", *arguments]


def run_to_end(arguments: list[str], log: Path) -> None:
    with open(log, "w") as output:
        finished = subprocess.run(
            arguments,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
    assert finished.returncode == 0, log.read_text()[-3000:]


def run_and_kill(arguments: list[str], log: Path, should_kill, timeout: float = 600) -> None:
    """Start the command in its own process group; SIGKILL the whole group once ``should_kill()``."""
    with open(log, "w") as output:
        process = subprocess.Popen(
            arguments,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if should_kill():
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        assert process.poll() is None or process.returncode == -signal.SIGKILL, (
            f"the run ended (exit {process.returncode}) before the moment to kill it:\n{log.read_text()[-3000:]}"
        )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def training_metrics(row: dict) -> dict[str, float]:
    """The DAPO and learner metrics of one iteration's result, without the ones that measure time."""
    values = {}
    for section, metrics in (("dapo", row["dapo"]), ("learner", row["learners"]["default_policy"])):
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not any(word in name for word in TIMING_WORDS):
                values[f"{section}/{name}"] = value
    return values


def assert_same_training(resumed_output: Path, reference_output: Path, from_iteration: int) -> None:
    reference = {row["training_iteration"]: row for row in iteration_results(reference_output)}
    resumed = {row["training_iteration"]: row for row in iteration_results(resumed_output)}
    assert sorted(resumed) == list(range(1, ITERATIONS + 1))
    for iteration in range(from_iteration + 1, ITERATIONS + 1):
        expected, got = training_metrics(reference[iteration]), training_metrics(resumed[iteration])
        assert expected.keys() == got.keys()
        different = {
            name: (expected[name], got[name])
            for name in expected
            if not (expected[name] == got[name] or (math.isnan(expected[name]) and math.isnan(got[name])))
        }
        assert not different, f"iteration {iteration} differs after the resume: {different}"
    # The lr warm-up went on from the checkpoint's optimizer step, and training really happened.
    rates = [
        resumed[i]["learners"]["default_policy"]["default_optimizer_learning_rate"] for i in range(1, ITERATIONS + 1)
    ]
    assert rates[0] < rates[-1]
    assert resumed[ITERATIONS]["dapo"]["optimizer_steps"] >= ITERATIONS - 1


def resumed_trial_rows(output: Path) -> list[dict]:
    """The result rows of the trial the resume started (the newest result.json)."""
    newest = max(experiment_folder(output).glob("*/result.json"), key=lambda path: path.stat().st_mtime)
    return [json.loads(line) for line in newest.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("lora", [None, "{r: 4, alpha: 8}"], ids=["full", "lora"])
def test_resume_after_sigkill_continues_exactly_with_one_learner(warm_model, tmp_path, lora):
    """With LoRA (issue 28) the checkpoints hold the adapters and their optimizer state alone; the
    resume rebuilds the base from ``model`` and must still continue exactly."""
    if lora is not None:
        pytest.importorskip("peft")
    extra = [f"lora={lora}"] if lora is not None else []
    settings = [item for setting in [*SETTINGS, f"model={warm_model}", *extra] for item in ("--set", setting)]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(train_command("--output", str(reference), *settings), tmp_path / "reference.log")

    def after_checkpoint_2() -> bool:
        record = newest_complete_checkpoint(killed / "tune") if (killed / "tune").is_dir() else None
        return record is not None and record.iteration >= 2

    run_and_kill(train_command("--output", str(killed), *settings), tmp_path / "killed.log", after_checkpoint_2)
    resume_from = newest_complete_checkpoint(killed / "tune")
    assert resume_from is not None and resume_from.iteration < ITERATIONS
    assert not (killed / "summary.json").exists()

    run_to_end(train_command("--resume", str(killed)), tmp_path / "resume.log")
    assert f"resuming {killed} from iteration {resume_from.iteration}" in (tmp_path / "resume.log").read_text()
    assert [row["training_iteration"] for row in resumed_trial_rows(killed)] == list(
        range(resume_from.iteration + 1, ITERATIONS + 1)
    )
    assert_same_training(killed, reference, resume_from.iteration)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed"] is True and summary["iterations"] == ITERATIONS
    # samples.jsonl holds each iteration's samples once: those logged after the checkpoint were dropped.
    iterations = [json.loads(line)["iteration"] for line in (killed / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(iterations)) == list(range(1, ITERATIONS + 1))
    assert len(iterations) == len([line for line in (reference / "samples.jsonl").read_text().splitlines()])
    # The exported policy: with LoRA the merged folder and the adapter beside it.
    assert (killed / "model" / "config.json").is_file()
    assert (killed / "model" / "adapter" / "adapter_config.json").is_file() == (lora is not None)


def test_resume_after_sigkill_mid_checkpoint_with_two_sharded_learners(warm_model, tmp_path):
    shards = tmp_path / "shared_shards"
    settings = [
        *SETTINGS,
        f"model={warm_model}",
        "num_learners=2",
        "data_parallel=fsdp2",
        f"sharded_checkpoint_dir={shards}",
    ]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference_settings = [*settings[:-1], f"sharded_checkpoint_dir={tmp_path / 'reference_shards'}"]
    run_to_end(
        train_command("--output", str(reference), *[i for s in reference_settings for i in ("--set", s)]),
        tmp_path / "reference.log",
    )

    def checkpoint_being_written() -> bool:
        # The third checkpoint's folder exists: Tune is copying it (or just has).
        return any(experiment_folder(killed).glob("*/checkpoint_000002"))

    run_and_kill(
        train_command("--output", str(killed), *[i for s in settings for i in ("--set", s)]),
        tmp_path / "killed.log",
        checkpoint_being_written,
    )
    resume_from = newest_complete_checkpoint(killed / "tune")
    assert resume_from is not None and 2 <= resume_from.iteration < ITERATIONS
    cut = next(experiment_folder(killed).glob("*/checkpoint_000002"))
    print(f"checkpoint of iteration 3 at the kill: {checkpoint_problem(cut) or 'complete'}")  # -s shows it
    # The shards of every complete checkpoint are there (pruning spared the one a resume needs).
    for record in complete_checkpoints(killed / "tune"):
        assert (sharded_state_folder(record.path) / ".metadata").is_file()

    run_to_end(train_command("--resume", str(killed)), tmp_path / "resume.log")
    assert_same_training(killed, reference, resume_from.iteration)
    # Tune kept the last 2 checkpoints; their shards, and only shard folders still needed, remain.
    kept = [record for record in complete_checkpoints(killed / "tune") if record.iteration > resume_from.iteration]
    assert [record.iteration for record in kept] == [ITERATIONS - 1, ITERATIONS]
    assert {sharded_state_folder(record.path) for record in kept} == set(shards.iterdir())
