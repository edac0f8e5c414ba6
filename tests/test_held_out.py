"""Held-out accuracy is never measured on training problems (issue 29, part 1).

- Data-set environments carve a deterministic held-out share out of their data (a hash of the
  problem's normalized text), or take a test file; train and test never share a problem, in any
  seed or process.
- The paper's recipe (``dapo/DAPOMath17k-v0``) trains on all of DAPO-Math-17k and holds out AIME 2024.
- ``dapo-rl train`` refuses an environment without held-out problems, naming it and the ways out;
  with ``eval_on_training_problems`` it evaluates on the training problems and says so everywhere.
- ``summary.json`` records which problems were evaluated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import gymnasium as gym
import pytest

import dapo_envs
from dapo_envs.arithmetic import ArithmeticEnv
from dapo_envs.held_out import DEFAULT_HELD_OUT_SHARE, in_held_out_share, normalized_problem
from dapo_rl import jobs
from dapo_rl.cli import main
from dapo_rl.jobs import FitResult, JobError, RunSettings, build_config, load_job, pipeline, train_config
from dapo_rl.jobs.eval_problems import choose_eval_problems
from dapo_rl.models import load_policy, save_policy

#: 400 problems, and copies of some of them that differ in case and spacing only.
ROWS = [{"prompt": f"What is {a} plus {a + 3}?", "answer": str(2 * a + 3)} for a in range(400)]
COPIES = [{"prompt": f"  WHAT is {a}   plus {a + 3}? ", "answer": str(2 * a + 3)} for a in range(0, 400, 7)]


def _questions(env) -> list[str]:
    return [env.problem(i).question for i in range(env.num_problems)]


def _split(env_id: str = "dapo/Math-v0", **config) -> tuple[list[str], list[str]]:
    train = gym.make(env_id, **config).unwrapped
    test = gym.make(env_id, **dapo_envs.held_out_env_config(env_id, config)).unwrapped
    return _questions(train), _questions(test)


# -- the carved split -------------------------------------------------------------------------------


def test_a_data_set_without_a_test_file_holds_out_a_share_disjoint_from_training():
    train, test = _split(dataset=ROWS + COPIES, prompt_template="plain")
    assert sorted(train + test) == sorted(row["prompt"] for row in ROWS + COPIES)  # a partition of the data
    # Copies differing only in case and spacing land on the same side.
    same = lambda q: " ".join(q.casefold().split())  # noqa: E731
    assert not {same(q) for q in train} & {same(q) for q in test}
    assert {same(q) for q in test} == {normalized_problem(q) for q in test}
    assert 0.05 < len(test) / len(train + test) < 0.15  # the default share, 0.1
    assert all(in_held_out_share(q, DEFAULT_HELD_OUT_SHARE) for q in test)
    # MathRetry-v0 carves the same split of the same data.
    assert _split("dapo/MathRetry-v0", dataset=ROWS + COPIES, prompt_template="plain") == (train, test)


def test_the_share_is_a_setting_and_zero_holds_out_nothing():
    train, test = _split(dataset=ROWS, prompt_template="plain", held_out_share=0.5)
    assert 0.4 < len(test) / len(ROWS) < 0.6 and not set(train) & set(test)
    everything = gym.make("dapo/Math-v0", dataset=ROWS, held_out_share=0).unwrapped
    assert everything.num_problems == len(ROWS)
    assert dapo_envs.held_out_overrides("dapo/Math-v0", {"held_out_share": 0}) is None
    with pytest.raises(ValueError, match="split='test' but dataset list has no held-out problems"):
        gym.make("dapo/Math-v0", dataset=ROWS, held_out_share=0, split="test")
    with pytest.raises(ValueError, match=r"held_out_share must be a number in \[0, 1\)"):
        gym.make("dapo/Math-v0", dataset=ROWS, held_out_share=1)


_SUBPROCESS = """
import json, sys
import gymnasium as gym
import dapo_envs
rows = json.loads(sys.argv[1])
env = gym.make("dapo/Math-v0", dataset=rows, split="test").unwrapped
print(json.dumps([env.problem(i).question for i in range(env.num_problems)]))
"""


def test_the_carved_split_is_the_same_in_every_seed_and_process():
    _, test = _split(dataset=ROWS, prompt_template="plain")
    env = gym.make("dapo/Math-v0", dataset=ROWS, split="test").unwrapped
    for seed in (0, 1, 12345):
        env.reset(seed=seed)
        assert {env.problem(i).question for i in range(env.num_problems)} == set(test)
        assert {p.question for p in env.sample_problems(len(test), seed)} == set(test)
    for hash_seed in ("0", "4242"):  # str hashes differ between these processes; the split must not
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS, json.dumps(ROWS)],
            capture_output=True,
            text=True,
            env=environment,
            check=True,
        )
        assert json.loads(result.stdout.strip().splitlines()[-1]) == test


def test_a_test_file_is_the_held_out_split_and_its_problems_leave_the_training_split(tmp_path):
    test_file = tmp_path / "test.jsonl"
    held_out_rows = [*ROWS[:5], {"prompt": "What is 1000 plus 1?", "answer": "1001"}]
    test_file.write_text("".join(json.dumps(row) + "\n" for row in held_out_rows))
    train, test = _split(dataset=ROWS, test_dataset=str(test_file), prompt_template="plain")
    assert test == [row["prompt"] for row in held_out_rows]
    assert train == [row["prompt"] for row in ROWS[5:]]  # no carving: only the test file's problems leave
    with pytest.raises(ValueError, match="give test_dataset or held_out_share, not both"):
        gym.make("dapo/Math-v0", dataset=ROWS, test_dataset=str(test_file), held_out_share=0.2)


def test_the_paper_recipe_trains_on_all_of_dapo_math_17k_and_holds_out_aime_2024():
    train = gym.make("dapo/DAPOMath17k-v0").unwrapped
    assert train.num_problems == 17_917  # nothing carved out of the paper's training set
    test = gym.make("dapo/DAPOMath17k-v0", **dapo_envs.held_out_env_config("dapo/DAPOMath17k-v0")).unwrapped
    aime = gym.make("dapo/AIME24-v0").unwrapped
    assert _questions(test) == _questions(aime)


@pytest.mark.parametrize("env_id", ["dapo/AIME24-v0", "dapo/AIME25-v0", "dapo/MATH500-v0", "dapo/GSM8K-v0"])
def test_benchmarks_are_evaluated_whole_and_hold_nothing_out(env_id):
    size = gym.make(env_id).unwrapped.num_problems
    assert dapo_envs.held_out_overrides(env_id) is None
    assert gym.make(env_id, **dapo_envs.held_out_env_config(env_id)).unwrapped.num_problems == size
    # As an eval_env of another environment: all of its problems, called held-out.
    evaluated = choose_eval_problems("dapo/Math-v0", {}, eval_env=env_id, on_training_problems=False)
    assert (evaluated.env_id, evaluated.env_config, evaluated.held_out) == (env_id, {}, True)


# -- the refusal and the opt-in ---------------------------------------------------------------------


def _arithmetic_factory(**kwargs):
    return ArithmeticEnv(operators="+", **kwargs)


class _NoSplitEnv(ArithmeticEnv):
    held_out_env_config = {}  # noqa: RUF012 (the class attribute a user's class overrides)


@pytest.fixture(scope="module")
def user_envs():
    """A factory function and a class that declares no held-out split, registered under new ids."""
    suffix = uuid.uuid4().hex[:6]
    factory, no_split = f"test/Factory-{suffix}-v0", f"test/NoSplit-{suffix}-v0"
    gym.register(id=factory, entry_point=_arithmetic_factory)
    gym.register(id=no_split, entry_point=_NoSplitEnv, kwargs={"operators": "+"})
    return factory, no_split


def _assert_refusal(message: str, env_id: str) -> None:
    assert repr(env_id) in message and "has no held-out problems" in message
    assert "eval_env" in message and "eval_on_training_problems=true" in message
    assert "\n" not in message


def test_an_environment_without_held_out_problems_is_refused_naming_it_and_the_ways_out(user_envs):
    factory, no_split = user_envs
    for env_id, env_config, why in [
        (factory, {}, "is not a dapo_envs.ReasoningEnv class"),
        (no_split, {}, "declares no held_out_env_config"),
        ("dapo/AIME24-v0", {}, "env_config.test_dataset=FILE or env_config.held_out_share=0.1"),
        ("dapo/Math-v0", {"held_out_share": 0}, "held_out_share is 0"),
        ("dapo/Arithmetic-v0", {"split": "test"}, "already selects its held-out problems"),
    ]:
        with pytest.raises(ValueError) as raised:
            choose_eval_problems(env_id, env_config, eval_env=None, on_training_problems=False)
        _assert_refusal(str(raised.value), env_id)
        assert why in str(raised.value)
    # eval_env naming the training environment with its training problems is no way out.
    with pytest.raises(ValueError, match="eval_env names the training environment"):
        choose_eval_problems("dapo/AIME24-v0", {}, eval_env="dapo/AIME24-v0", on_training_problems=False)
    with pytest.raises(ValueError, match=r"give eval_env .* or eval_on_training_problems, not both"):
        choose_eval_problems(factory, {}, eval_env="dapo/Arithmetic-v0", on_training_problems=True)


def test_dapo_rl_train_refuses_it_before_any_work(user_envs, capsys, tmp_path):
    factory, _ = user_envs
    output = tmp_path / "out"
    assert main(["train", "--set", f"env={factory}", "--set", "env_config={}", "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    _assert_refusal(error.strip(), factory)
    assert not output.exists()


def _fake_fit(monkeypatch):
    """train_config without Ray and Tune: "training" leaves the policy it started from."""

    def fit(config, output, **_):
        return FitResult({"training_iteration": 1}, Path(output) / "checkpoint")

    def export(result, output):
        folder = Path(output) / "model"
        save_policy(*load_policy("tiny-qwen2", seed=0), folder)
        return folder

    monkeypatch.setattr(pipeline.cluster, "connect", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "fit", fit)
    monkeypatch.setattr(pipeline, "export_final_policy", export)


SMALL_RUN = ["warmstart_steps=0", "eval_problems=3", "eval_samples=1", "max_response_length=4", "overlong_cache_len=2"]


def test_the_opt_in_evaluates_on_training_problems_and_every_line_and_the_summary_say_so(
    user_envs, monkeypatch, capsys, tmp_path
):
    factory, _ = user_envs
    _fake_fit(monkeypatch)
    job = load_job(None, [f"env={factory}", "env_config={}", "eval_on_training_problems=true", *SMALL_RUN])
    summary = jobs.train(job, tmp_path / "run")
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "accuracy" in line]
    assert len(lines) == 2 and all(line.startswith("accuracy on training problems") for line in lines), printed
    assert "held-out" not in printed
    assert summary["evaluated_on"] == {
        "env": factory,
        "env_config": {},
        "split": "training problems",
        "chosen_by": "eval_on_training_problems",
        "problems": 3,
    }
    assert "its training problems" in summary["eval_metric"] and "held-out" not in json.dumps(summary["evaluated_on"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["evaluated_on"] == summary["evaluated_on"]


def test_the_summary_records_the_held_out_problems_evaluated(monkeypatch, capsys, tmp_path):
    _fake_fit(monkeypatch)
    summary = jobs.train(load_job(None, SMALL_RUN), tmp_path / "run")
    assert summary["evaluated_on"] == {
        "env": "dapo/Arithmetic-v0",
        "env_config": {"operators": "+", "split": "test"},
        "split": "held-out",
        "chosen_by": "the training environment's held-out split",
        "problems": 3,
    }
    printed = capsys.readouterr().out
    assert "held-out accuracy before DAPO" in printed and "held-out accuracy after DAPO" in printed
    # With eval_env: that environment, whole when it is a benchmark.
    config = build_config(load_job(None, ["env=dapo/Math-v0", "env_config={}"]))
    run = RunSettings.from_job(jobs.DEFAULT_JOB, eval_env="dapo/AIME24-v0")
    _, test_env, evaluated = pipeline._environments(config, run)
    assert evaluated.record(test_env.num_problems) == {
        "env": "dapo/AIME24-v0",
        "env_config": {},
        "split": "held-out",
        "chosen_by": "eval_env",
        "problems": 30,
    }


def test_train_config_refuses_too(user_envs, tmp_path):
    """The Python pipeline (reproduce/, Tune users) refuses as the command does."""
    _, no_split = user_envs
    config = build_config(load_job(None, [f"env={no_split}", "env_config={}"]))
    with pytest.raises(JobError, match="declares no held_out_env_config"):
        train_config(config, tmp_path / "run", RunSettings.from_job(jobs.DEFAULT_JOB))
    assert not (tmp_path / "run").exists()
