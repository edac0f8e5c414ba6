"""The dapo-rl command line: settings parsing and user errors (no training here; see test_learning.py)."""

import pytest

from dapo_rl.cli import DEFAULT_JOB, UserError, build_config, load_job, main


def test_default_job_builds_a_valid_config():
    job = load_job(None, [])
    assert job == DEFAULT_JOB
    config = build_config(job, job["model"])
    assert config.env == "dapo/Arithmetic-v0"
    assert config.group_size == DEFAULT_JOB["training"]["group_size"]
    assert config.model_config["model"] == "tiny-qwen2"


def test_yaml_and_set_override_in_order(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("iterations: 7\ntraining:\n  group_size: 4\n  clip_high: 0.3\nenv_config:\n  digits: 1\n")
    job = load_job(str(path), ["group_size=6", "lr=1e-5", "env_config.operators=+-", "dual_clip=10"])
    assert job["iterations"] == 7
    assert job["training"]["group_size"] == 6
    assert job["training"]["clip_high"] == 0.3
    assert job["training"]["lr"] == 1e-5
    assert job["training"]["dual_clip"] == 10
    assert job["env_config"] == {"digits": 1, "operators": "+-"}


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("foo=1", "unknown setting 'foo'"),
        ("group_size=abc", "'group_size' .* must be int, got 'abc'"),
        ("dynamic_sampling=3", "'dynamic_sampling' .* must be bool"),
        ("iterations", "--set takes key=value"),
    ],
)
def test_bad_settings_are_named(assignment, message):
    with pytest.raises(UserError, match=message):
        load_job(None, [assignment])


def test_inconsistent_settings_fail_validation_with_values():
    job = load_job(None, ["minibatch_prompts=5"])
    with pytest.raises(UserError, match=r"minibatch_prompts \(5\) must divide prompts_per_step \(32\)"):
        build_config(job, job["model"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "nope=1"], "unknown setting 'nope'"),
        (["train", "--set", "env=dapo/Nope-v0"], "unknown environment id 'dapo/Nope-v0'"),
        (["train", "--set", "model=/no/such/model"], "'/no/such/model' is neither the preset"),
        (["train", "--config", "/no/such.yaml"], "cannot read config file /no/such.yaml"),
        (["train", "--set", "dtype=float33"], "dtype 'float33' is not a torch dtype name"),
        (["train", "--set", "eval_env=dapo/Nope-v0"], "unknown evaluation environment id 'dapo/Nope-v0'"),
        (["eval", "--model", "/no/such/model", "--env", "dapo/AIME24-v0"], "'/no/such/model' is neither the preset"),
        (["eval", "--model", "tiny-qwen2", "--env", "dapo/Nope-v0"], "unknown environment id"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(argv, message, capsys, tmp_path):
    if argv[0] == "train":
        argv = [*argv, "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("dapo-rl: error:")
    import re

    assert re.search(message, err), err


def test_eval_command_reports_avg_pass_cons(capsys):
    assert main(["eval", "--model", "tiny-qwen2", "--env", "dapo/Arithmetic-v0", "--samples", "2", "--problems", "3",
                 "--max-new-tokens", "4", "--env-config", "split=test"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["num_problems"] == 3 and result["samples"] == 2
    assert 0.0 <= result["avg_at_k"] <= result["pass_at_k"] <= 1.0


def test_dtype_reaches_the_module_config():
    job = load_job(None, ["dtype=bfloat16"])
    assert build_config(job, job["model"]).model_config["model"] == "tiny-qwen2"
    assert build_config(job, job["model"]).model_config["dtype"] == "bfloat16"
    assert "dtype" not in build_config(load_job(None, []), "tiny-qwen2").model_config
