"""reproduce.table1: the quick Table-1 run end to end (train, resume, table, plots) and the paper-scale plan."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dapo_rl.jobs import DEFAULT_JOB, RunSettings
from dapo_rl.jobs.evaluation import evaluate_model
from dapo_rl.models.loading import TINY_PRESET
from dapo_rl.reproduce import table1
from dapo_rl.reproduce.scales import TINY_RESPONSE_BUDGET
from dapo_rl.reproduce.settings import PAPER_TABLE1, TECHNIQUE_KEYS, table1_rows
from dapo_rl.settings import SETTINGS


def settings_of(config) -> dict:
    return {key: getattr(config, key) for key in SETTINGS}


def test_paper_scale_prints_plan_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert table1.main(["--scale", "paper"]) == 0
    out = capsys.readouterr().out
    assert "ray start --head" in out and "ray start --address=" in out
    assert "python -m dapo_rl.reproduce.table1 --scale paper" in out
    assert "128 H20 GPUs" in out
    assert "responses_per_step" in out
    assert "--scale paper --run" in out and "--model /models/Qwen2.5-32B" in out
    assert not any(tmp_path.iterdir())  # nothing written


def test_paper_scale_run_needs_a_model_and_run_needs_the_paper_scale():
    with pytest.raises(SystemExit, match="needs --model PATH"):
        table1.main(["--scale", "paper", "--run"])
    with pytest.raises(SystemExit, match="--run is for --scale paper"):
        table1.main(["--scale", "tiny", "--run"])


def test_paper_scale_run_connects_as_dapo_rl_train_does_and_refuses_in_one_line(tmp_path, monkeypatch):
    """--run goes through dapo_rl.jobs.cluster like dapo-rl train --address: Ray's "auto" guess (what this
    launcher once passed when RAY_ADDRESS was unset) and a cluster that does not answer are refused before
    any work, in one line; with no cluster named at all, a paper-scale row refuses to train."""
    import socket

    with socket.socket() as sock:  # a port just bound and released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    model = tmp_path / "model"
    model.mkdir()
    run = ["--scale", "paper", "--run", "--model", str(model), "--rows", "naive-grpo", "--seeds", "1"]
    run += ["--output", str(tmp_path / "out")]
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(SystemExit, match=r"^table1: RAY_ADDRESS=auto: give the cluster's GCS address as HOST:PORT"):
        table1.main(run)
    with pytest.raises(SystemExit, match=rf"^table1: no Ray cluster answers at {dead} \(from --address\)"):
        table1.main([*run, "--address", dead])
    monkeypatch.delenv("RAY_ADDRESS")
    rows = table1.scaled_rows("paper", model_path=str(model))
    from dapo_rl.jobs.cluster import ClusterError
    from dapo_rl.reproduce.cluster import run_row_on_cluster
    from dapo_rl.reproduce.settings import aime_eval_32b

    if not ray_is_connected():  # a process already connected keeps its cluster (as dapo-rl train)
        with pytest.raises(ClusterError, match="a paper-scale row trains on a running Ray cluster"):
            run_row_on_cluster(rows["Naive GRPO"], tmp_path / "row", iterations=1, evaluation=aime_eval_32b())
    with pytest.raises(SystemExit, match="--address is for --scale paper --run"):
        table1.main(["--scale", "tiny", "--address", dead])


def ray_is_connected() -> bool:
    import ray

    return ray.is_initialized()


def test_paper_rows_skip_finished_runs_and_seed_the_rest(tmp_path, monkeypatch):
    rows = table1.scaled_rows("paper", model_path="/models/qwen32b")
    config = rows["Naive GRPO"]
    calls = []
    monkeypatch.setattr(
        table1, "run_row_on_cluster", lambda cfg, folder, **kw: calls.append((cfg.seed, folder, kw)) or {"x": 1}
    )
    assert table1.run_paper_row(config, 3, tmp_path / "a", None) == ({"x": 1}, False)
    seed, folder, kwargs = calls[0]
    assert seed == 3 and folder == tmp_path / "a" and kwargs["iterations"] == table1.PAPER_ITERATIONS
    assert kwargs["evaluation"].samples == 32 and kwargs["evaluation"].top_p == 0.7
    assert config.seed != 3  # the row's own config is left as it was
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"eval_accuracy_after": 0.5}))
    assert table1.run_paper_row(config, 0, tmp_path / "b", 7) == ({"eval_accuracy_after": 0.5}, True)
    assert len(calls) == 1


def test_row_runs_train_the_row_config_itself():
    rows = table1.scaled_rows("tiny")
    assert list(rows) == list(table1_rows())
    main_job = RunSettings.from_job(DEFAULT_JOB)
    for name, config in rows.items():
        seeded, run = table1.row_run(config, 2, scale="tiny", quick=False)
        assert seeded.seed == 2 and config.seed != 2  # a seeded copy; the row stays as it was
        assert settings_of(seeded) == settings_of(config), name
        assert (seeded.env, seeded.model_config) == ("dapo/Arithmetic-v0", {"model": TINY_PRESET})  # float32 preset
        assert run == main_job
    _, quick = table1.row_run(config, 0, scale="tiny", quick=True, iterations=5)
    assert quick == dataclasses.replace(main_job, **{**table1.QUICK_JOB, "iterations": 5})
    assert table1.select_rows(list(rows), None, quick=True) == [next(iter(rows)), list(rows)[-1]]
    assert table1.select_rows(list(rows), ["clip-higher", "Naive GRPO"], quick=True) == ["Naive GRPO", "+ Clip-Higher"]


def test_gpu_row_runs_keep_float32_weights_and_evaluate_elsewhere():
    for config in table1.scaled_rows("gpu", model_path="/models/qwen1.5b").values():
        seeded, run = table1.row_run(config, 0, scale="gpu", quick=False)
        assert seeded.model_config == {"model": "/models/qwen1.5b", "dtype": "float32"}
        assert (run.eval_env, run.warmstart_steps) == ("dapo/MATH500-v0", 0)
        # One GPU: the local learner on it (the local runner generates there too), micro-batched.
        assert (seeded.num_learners, seeded.num_gpus_per_learner, seeded.num_env_runners) == (0, 1, 0)
        assert seeded.micro_batch_tokens == 16384 and seeded.gradient_checkpointing


@pytest.mark.slow
def test_quick_table1_runs_and_resumes(ray_session, tmp_path, capsys):
    out = tmp_path / "t1"
    argv = ["--scale", "tiny", "--seeds", "1", "--quick", "--output", str(out)]
    assert table1.main(argv) == 0
    selected = table1.select_rows(list(PAPER_TABLE1), None, quick=True)

    results = json.loads((out / "results.json").read_text())
    assert [(r["row"], r["seed"]) for r in results] == [(row, 0) for row in selected]
    for entry in results:
        assert entry["scale"] == "tiny" and entry["iterations"] == table1.QUICK_JOB["iterations"]
        assert set(entry["techniques"]) == set(TECHNIQUE_KEYS)
        # The accuracies are those of the run's saved policies, evaluated again from their folders
        # with the settings the run states: the held-out split, QUICK_JOB's problems and samples, the
        # tiny scale's lengths, sampling as trained, the run's seed.
        folder = out / "runs" / table1.slug(entry["row"]) / "seed0"
        held_out = dict(
            env_config={**DEFAULT_JOB["env_config"], "split": "test"},
            samples=table1.QUICK_JOB["eval_samples"],
            num_problems=table1.QUICK_JOB["eval_problems"],
            max_new_tokens=TINY_RESPONSE_BUDGET["max_response_length"],
            max_prompt_length=DEFAULT_JOB["training"]["max_prompt_length"],
            seed=0,
        )
        for when, model in (("before", "warmstart"), ("after", "model")):
            again = evaluate_model(folder / model, "dapo/Arithmetic-v0", **held_out)
            assert entry[f"eval_accuracy_{when}"] == again.avg_at_k, (entry["row"], when)
    assert results[0]["techniques"]["dynamic_sampling"] is False
    assert results[-1]["techniques"]["dynamic_sampling"] is True

    table = (out / "table1.md").read_text()
    for row in selected:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        assert f"| {PAPER_TABLE1[row]} |" in line
    assert "not AIME" in table and "python -m dapo_rl.reproduce.table1 --scale tiny" in table
    for stem, *_ in table1.CURVES:
        assert (out / f"{stem}.png").stat().st_size > 1000

    summaries = sorted(out.glob("runs/*/seed0/summary.json"))
    assert len(summaries) == len(selected)
    mtimes = [path.stat().st_mtime_ns for path in summaries]
    capsys.readouterr()
    assert table1.main(argv) == 0
    assert f"0 run(s) trained, {len(selected)} skipped" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in summaries] == mtimes
    assert all(r["skipped"] for r in json.loads((out / "results.json").read_text()))
