"""The dapo-rl command line and dapo_rl.jobs: settings, user errors, eval, and a one-iteration run
with experiment trackers (the learning run itself is test_learning.py)."""

import json
import re
import struct
from pathlib import Path

import pytest

import dapo_rl
import dapo_rl.cli as cli
from dapo_rl.cli import main
from dapo_rl.jobs import DEFAULT_JOB, JobError, build_config, experiment_folder, load_job, resume_job, tracking
from dapo_rl.jobs.evaluation import evaluate_model
from dapo_rl.rllib.checkpoints import CHECKPOINT_MANIFEST


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
    job = load_job(str(path), ["group_size=6", "lr=1e-5", "env_config.operators=+-", "dual_clip=10", "loggers=mlflow"])
    assert job["iterations"] == 7
    assert job["training"]["group_size"] == 6
    assert job["training"]["clip_high"] == 0.3
    assert job["training"]["lr"] == 1e-5
    assert job["training"]["dual_clip"] == 10
    assert job["env_config"] == {"digits": 1, "operators": "+-"}
    assert job["loggers"] == ["mlflow"]


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("foo=1", "unknown setting 'foo'"),
        (
            "group_size=abc",
            "--set group_size=abc: group_size must be an integer >= 2 (advantages need a group), got 'abc'",
        ),
        ("dynamic_sampling=3", "--set dynamic_sampling=3: dynamic_sampling must be True or False, got 3"),
        ("iterations", "--set takes key=value"),
    ],
)
def test_bad_settings_are_named(assignment, message):
    with pytest.raises(JobError, match=re.escape(message)):
        load_job(None, [assignment])


def test_text_values_keep_their_whitespace_and_quoted_ones_their_escapes():
    template = "What is {problem}?\n"
    assert load_job(None, [f"env_config.prompt_template={template}"])["env_config"]["prompt_template"] == template
    quoted = load_job(None, ['env_config.prompt_template="Q: {problem}\\n"'])["env_config"]["prompt_template"]
    assert quoted == "Q: {problem}\n"
    assert load_job(None, ["env_config.operators=+-", "env_config.digits=3"])["env_config"] == {
        "operators": "+-",
        "digits": 3,
    }


def test_asynchronous_settings_from_the_command_line():
    job = load_job(
        None, ["num_env_runners=1", "max_staleness=1", "importance_weight_cap=null", "recompute_old_logprobs=false"]
    )
    config = build_config(job, job["model"])
    assert (config.max_staleness, config.importance_weight_cap, config.recompute_old_logprobs) == (1, None, False)
    with pytest.raises(JobError, match=r"max_staleness must be an integer >= 0 \(0: synchronous\), got None"):
        load_job(None, ["max_staleness=null"])
    with pytest.raises(JobError, match="max_staleness=2 generates in remote env runners"):
        build_config(load_job(None, ["max_staleness=2"]), "tiny-qwen2")


def test_inconsistent_settings_fail_validation_with_values_on_one_line():
    job = load_job(None, ["minibatch_prompts=5"])
    with pytest.raises(JobError, match=r"minibatch_prompts \(5\) must divide prompts_per_step \(32\)") as raised:
        build_config(job, job["model"])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "nope=1"], "unknown setting 'nope'"),
        (["train", "--set", "env=dapo/Nope-v0"], "unknown environment id 'dapo/Nope-v0'"),
        (["train", "--set", "model=/no/such/model"], "'/no/such/model' is neither"),
        (["train", "--config", "/no/such.yaml"], "cannot read config file /no/such.yaml"),
        (["train", "--set", "dtype=float33"], "dtype 'float33' is not a torch dtype name"),
        (["train", "--set", "eval_env=dapo/Nope-v0"], "unknown evaluation environment id 'dapo/Nope-v0'"),
        (["train", "--set", "loggers=[wandb, tensorboardx]"], r"unknown logger\(s\) \['tensorboardx'\]"),
        (["eval", "--model", "/no/such/model", "--env", "dapo/AIME24-v0"], "'/no/such/model' is neither"),
        (["eval", "--model", "tiny-qwen2", "--env", "dapo/Nope-v0"], "unknown environment id"),
        (
            ["eval", "--model", "tiny-qwen2", "--env", "dapo/AIME24-v0", "--env-config", "split"],
            "--env-config takes key=value",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(argv, message, capsys, tmp_path):
    if argv[0] == "train":
        argv = [*argv, "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("dapo-rl: error:"), err
    assert re.search(message, err), err


def test_a_logger_without_its_package_names_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(tracking.LOGGERS, "wandb", ("no_such_module_for_wandb", "wandb"))
    assert main(["train", "--logger", "wandb", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "dapo-rl: error: logger 'wandb' needs the wandb package: pip install wandb (or pip install 'dapo-rl[tracking]')"
    )
    assert not (tmp_path / "out").exists()  # nothing ran


def test_eval_command_is_evaluate_model_with_the_given_options(capsys):
    argv = [
        "eval",
        "--model",
        "tiny-qwen2",
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
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    expected = evaluate_model(
        "tiny-qwen2", "dapo/Arithmetic-v0", env_config={"split": "test"}, samples=2, num_problems=3, max_new_tokens=4
    )
    assert result == expected.as_dict()
    assert (result["num_problems"], result["samples"]) == (3, 2)
    # The dapo verifier needs "Answer: N": no 4-token response holds it, whatever the weights.
    assert (result["avg_at_k"], result["pass_at_k"], result["cons_at_k"]) == (0.0, 0.0, 0.0)
    assert 1 <= result["mean_response_length"] <= 4


def test_eval_command_scores_the_held_out_split_unless_told_and_takes_the_chat_template_switch(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(
        cli,
        "evaluate_policy",
        lambda model, env, **kwargs: calls.append((model, env, kwargs)) or evaluate_model(model, env, **kwargs),
    )
    argv = [
        "eval",
        "--model",
        "tiny-qwen2",
        "--env",
        "dapo/Arithmetic-v0",
        "--samples",
        "1",
        "--problems",
        "2",
        "--max-new-tokens",
        "2",
        "--chat-template",
        "off",
        "--max-prompt-length",
        "8",
    ]
    assert main(argv) == 0 and main([*argv, "--env-config", "split=train"]) == 0
    capsys.readouterr()
    settings = {
        "samples": 1,
        "num_problems": 2,
        "max_new_tokens": 2,
        "apply_chat_template": False,
        "max_prompt_length": 8,
    }
    assert calls == [
        ("tiny-qwen2", "dapo/Arithmetic-v0", {"env_config": {"split": "test"}, **settings}),
        ("tiny-qwen2", "dapo/Arithmetic-v0", {"env_config": {"split": "train"}, **settings}),
    ]


def test_dtype_reaches_the_module_config():
    job = load_job(None, ["dtype=bfloat16"])
    assert build_config(job, job["model"]).model_config["model"] == "tiny-qwen2"
    assert build_config(job, job["model"]).model_config["dtype"] == "bfloat16"
    assert "dtype" not in build_config(load_job(None, []), "tiny-qwen2").model_config


# -- a one-iteration run with trackers --------------------------------------------------------------

#: The smallest run: no warm-start, one DAPO iteration of 4 prompts x 2 responses, 2 held-out problems.
ONE_ITERATION = [
    "iterations=1",
    "warmstart_steps=0",
    "eval_problems=2",
    "eval_samples=1",
    "prompts_per_step=4",
    "minibatch_prompts=2",
    "group_size=2",
    "generation_batch_prompts=4",
    "dynamic_sampling=false",
]


def wandb_history(path) -> list[dict]:
    """The logged rows of an offline W&B run file (LevelDB-log blocks of wandb_internal Record protos)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
                )
    return rows


@pytest.mark.slow
def test_train_logs_offline_to_wandb_and_mlflow_and_appends_samples(ray_session, tmp_path):
    output = tmp_path / "run"
    argv = ["train", "--logger", "wandb", "--logger", "mlflow", "--output", str(output)]
    assert main([*argv, *(arg for setting in ONE_ITERATION for arg in ("--set", setting))]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["job"]["loggers"] == ["wandb", "mlflow"]
    assert summary["evaluated_on"] == {  # which problems "held-out accuracy" was measured on
        "env": "dapo/Arithmetic-v0",
        "env_config": {"operators": "+", "split": "test"},
        "split": "held-out",
        "chosen_by": "the training environment's held-out split",
        "problems": 2,
    }
    # The run and its checkpoint record the code that made them (dapo-rl, torch, Ray, ... versions).
    assert summary["versions"]["dapo_rl"] == dapo_rl.__version__ and summary["versions"]["torch"]
    manifest = json.loads((Path(summary["checkpoint"]) / CHECKPOINT_MANIFEST).read_text())
    assert manifest["versions"] == summary["versions"]
    (result_file,) = experiment_folder(output).glob("*/result.json")
    (result,) = [json.loads(line) for line in result_file.read_text().splitlines()]
    reward_mean = result["dapo"]["reward_mean"]

    (wandb_file,) = (output / "wandb").glob("offline-run-*/run-*.wandb")
    (logged,) = wandb_history(wandb_file)
    assert logged["training_iteration"] == 1 and logged["dapo/reward_mean"] == reward_mean

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(output / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("dapo-rl").experiment_id])
    assert run.data.metrics["dapo/reward_mean"] == reward_mean and run.data.metrics["training_iteration"] == 1

    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    # The first response of each trained group, up to log_samples: all 4 groups train without dynamic sampling.
    assert samples == [{"iteration": 1, **sample} for sample in result["samples"]]
    assert len(samples) == 4 and {"prompt", "response", "reward", "acc"} <= set(samples[0])


def _bad_inputs(folder):
    """(arguments, message) of each bad input that `dapo-rl train` must refuse before it starts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "broken.yaml").write_text("training: {lr: 1e-4\n")
    (folder / "list.yaml").write_text("- lr\n- 1e-4\n")
    pq.write_table(pa.table({"prompt": ["What is 1 + 1?", None], "answer": ["2", "3"]}), folder / "bad_row.parquet")
    pq.write_table(
        pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), folder / "empty.parquet"
    )
    from dapo_rl.models.loading import load_policy, save_policy

    save_policy(*load_policy("tiny-qwen2"), folder / "no_weights")
    (folder / "no_weights" / "model.safetensors").unlink()
    save_policy(*load_policy("tiny-qwen2"), folder / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / "no_tokenizer" / name).unlink()
    math_env = ["--set", "env=dapo/Math-v0", "--set", "env_config={}"]
    return [
        (
            ["--config", str(folder / "broken.yaml")],
            f"config file {folder / 'broken.yaml'} is not valid YAML: line 2, column 1: expected ',' or '}}'",
        ),
        (["--config", str(folder / "list.yaml")], "must hold a mapping of settings, got list"),
        (
            ["--set", "env_config.digitz=3"],
            r"unknown env_config key\(s\) \['digitz'\] for dapo/Arithmetic-v0; it takes: operands, operators, digits",
        ),
        (
            [*math_env, "--set", f"env_config.dataset={folder / 'bad_row.parquet'}"],
            rf"{folder / 'bad_row.parquet'}: row 1, column 'prompt': expected a string, got null",
        ),
        ([*math_env, "--set", f"env_config.dataset={folder / 'empty.parquet'}"], "the data set has no rows"),
        (
            ["--set", "max_prompt_length=12"],
            r"prompts checked are over max_prompt_length; the first: the prompt of problem 0 \(id .*\) has \d+ tokens, "
            r"over max_prompt_length 12: raise max_prompt_length, or set prompt_truncation='left'",
        ),
        (["--set", f"model={folder / 'no_weights'}"], rf"model folder {folder / 'no_weights'} has no weights"),
        (["--set", f"model={folder / 'no_tokenizer'}"], rf"model folder {folder / 'no_tokenizer'} has no tokenizer"),
    ]


def test_bad_input_is_refused_up_front_with_one_line_naming_it(capsys, tmp_path):
    bad_inputs = _bad_inputs(tmp_path)
    capsys.readouterr()
    for arguments, message in bad_inputs:
        output = tmp_path / "out"
        assert main(["train", *arguments, "--output", str(output)]) == 2, arguments
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), (arguments, err)
        assert not output.exists(), arguments  # refused before anything was written


def test_resume_refuses_a_folder_that_is_not_a_run_and_settings_it_cannot_change(capsys, tmp_path):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert f"cannot resume {tmp_path}: it has no job.json" in capsys.readouterr().err
    (tmp_path / "job.json").write_text(json.dumps({"iterations": 3}))
    assert main(["train", "--resume", str(tmp_path), "--set", "lr=1"]) == 2
    assert "--set lr=1: a resume can change only iterations" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--config", "x.yaml"]) == 2
    assert "drop --config/--output" in capsys.readouterr().err


def test_resume_may_move_the_learners_and_env_runners_to_other_nodes(tmp_path):
    """Placement changes where actors run, not what they compute: a run whose learner's node was lost
    resumes on the nodes left with the custom resources they offer (docs/scale-out.md#on-a-ray-cluster)."""
    (tmp_path / "job.json").write_text(json.dumps({"iterations": 3, "learner_resources": {"remote_learner": 1}}))
    job = resume_job(tmp_path, ["learner_resources={learner_node: 1}", "env_runner_resources={runner_node: 2}"])
    assert job["learner_resources"] == {"learner_node": 1} and job["env_runner_resources"] == {"runner_node": 2}
    assert job["iterations"] == 3
