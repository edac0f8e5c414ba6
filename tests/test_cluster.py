"""Which Ray cluster a run uses: decided and checked before any work (dapo_rl.jobs.cluster).

The multi-node runs themselves (placement, an iteration across nodes, a checkpoint restored on
another node, a node lost mid-run) are in tests/test_multinode.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dapo_rl.jobs.cluster import ClusterError, check_bundles_fit, choose_cluster, resource_problem

ROOT = Path(__file__).resolve().parent.parent

#: The job of the CLI tests below: no warm-start, one iteration, a tiny evaluation.
QUICK = ["--set", "warmstart_steps=0", "--set", "iterations=1", "--set", "eval_problems=2", "--set", "eval_samples=1"]


def dead_address() -> str:
    """HOST:PORT where nothing listens (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def ray_tmp():
    """A short Ray temp root (RAY_TMPDIR: unix socket paths must stay under ~100 characters)."""
    root = tempfile.mkdtemp(prefix="dapo_cl_")
    try:
        yield Path(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_stale_cluster_address_left_by_a_dead_head_does_not_decide_where_a_run_goes(ray_tmp):
    """The bug report: a dead head's ``ray_current_cluster`` made ``ray.init(num_cpus=...)`` try to
    join it and die ("When connecting to an existing cluster, num_cpus and num_gpus must not be
    provided"), after the warm-start and the first evaluation. With no address given, a run starts
    its own local instance, whatever Ray's temp folder says."""
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead_address())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    script = (
        "import ray\n"
        "from dapo_rl.jobs import start_ray\n"
        "start_ray(min_cpus=1)\n"
        "print('connected', ray.cluster_resources()['CPU'])\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "connected" in done.stdout


def _train(argv: list[str], capsys) -> tuple[int, str, float]:
    from dapo_rl.cli import main

    start = time.perf_counter()
    code = main(["train", *argv])
    return code, capsys.readouterr().err, time.perf_counter() - start


@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_an_unreachable_cluster_is_refused_before_any_work(via, tmp_path, capsys, monkeypatch):
    """``--address`` (or RAY_ADDRESS) naming a cluster that does not answer: exit status 2 in
    seconds, one line naming the address and what to do, and no output folder (no warm-start)."""
    address, output = dead_address(), tmp_path / "run"
    argv = ["--output", str(output), *QUICK]
    if via == "--address":
        argv += ["--address", address]
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    code, err, seconds = _train(argv, capsys)
    assert code == 2, err
    assert f"no Ray cluster answers at {address} (from {via})" in err, err
    assert "Traceback" not in err and not output.exists()
    assert seconds < 30, seconds


def test_custom_resources_no_node_has_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """learner_resources that no node offers (a new local instance offers none): Tune would wait for
    the trial for ever; the run is refused up front, naming the resource."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    output = tmp_path / "run"
    argv = ["--output", str(output), *QUICK, "--set", "num_learners=1", "--set", "learner_resources={learner_node: 1}"]
    code, err, _ = _train(argv, capsys)
    assert code == 2, err
    assert "learner_node" in err and not output.exists(), err


def test_choose_cluster_takes_the_option_then_ray_address_then_a_new_local_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_cluster(None).local
    assert choose_cluster("10.0.0.1:6379").address == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert (choose_cluster(None).address, choose_cluster(None).source) == ("10.0.0.2:6379", "RAY_ADDRESS")
    assert choose_cluster("10.0.0.1:6379").source == "--address"
    assert choose_cluster("local").local  # a new local instance whatever RAY_ADDRESS says
    for bad in ("auto", "ray://10.0.0.1:10001", "10.0.0.1", "host:port"):
        with pytest.raises(ClusterError, match="HOST:PORT"):
            choose_cluster(bad)


def test_placement_that_no_node_can_hold_is_named():
    nodes = [{"CPU": 1.0, "learner_node": 1.0}, {"CPU": 1.0, "runner_node": 1.0}]
    check_bundles_fit([{"CPU": 1}, {"CPU": 1, "learner_node": 1}, {"CPU": 1, "runner_node": 1}], nodes)
    with pytest.raises(ClusterError, match="gpu_node"):
        check_bundles_fit([{"CPU": 1, "gpu_node": 1}], nodes)
    with pytest.raises(ClusterError, match="no node of the cluster can hold"):  # each fits, not together on one
        check_bundles_fit([{"CPU": 1, "learner_node": 1, "runner_node": 1}], nodes)
    with pytest.raises(ClusterError, match="no node of the cluster can hold"):
        check_bundles_fit([{"CPU": 2}], nodes)


def test_learner_and_env_runner_resources_are_job_keys_mapped_to_rllib():
    from dapo_rl.jobs import JobError, build_config, load_job

    job = load_job(
        None,
        ["num_learners=1", "num_env_runners=2", "learner_resources={learner_node: 1}", "env_runner_resources={r: 0.5}"],
    )
    config = build_config(job)
    assert config.custom_resources_per_learner == {"learner_node": 1}
    assert config.custom_resources_per_env_runner == {"r": 0.5}
    local = build_config(load_job(None, ["learner_resources={learner_node: 1}"]))  # the learner is the trial's process
    assert local.custom_resources_for_main_process == {"learner_node": 1}
    assert resource_problem("learner_resources", {"CPU": 1}) is not None
    for bad in ("learner_resources=[a]", "learner_resources={a: 0}", "env_runner_resources={GPU: 1}"):
        with pytest.raises(JobError):
            build_config(load_job(None, [bad]))


def test_a_local_instance_starts_its_processes_with_passive_openmp_threads_and_actors_size_their_pools(ray_tmp):
    """Processes that share cores (an env runner generating beside the learner) must not spin on each
    other's cores: a local instance's workers start with OMP_WAIT_POLICY=PASSIVE (a value the user
    set is kept), and an actor runs as many torch threads as its CPUs even when the shell exported
    OMP_NUM_THREADS (which Ray would otherwise pass on to every worker)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_WAIT_POLICY")}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="2")
    script = (
        "import os, ray, torch\n"
        "from dapo_rl.jobs import start_ray\n"
        "from dapo_rl.rllib.threads import process_threads, use_process_threads\n"
        "assert [process_threads(c) for c in (1, 2.5, 0.5, 'auto', None, True)] == [1, 2, 1, 1, 1, 1]\n"
        "start_ray(min_cpus=1)\n"
        "@ray.remote(num_cpus=1)\n"
        "def worker():\n"
        "    before = torch.get_num_threads()\n"
        "    return os.environ.get('OMP_WAIT_POLICY'), before, use_process_threads(1), torch.get_num_threads()\n"
        "print('worker', *ray.get(worker.remote()))\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # The shell's OMP_NUM_THREADS=2 reached the worker (Ray keeps a set value); the actor's own call
    # sizes the pool to its 1 CPU.
    assert "worker PASSIVE 2 1 1" in done.stdout, done.stdout
