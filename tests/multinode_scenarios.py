"""A real multi-node Ray cluster on this machine, driven by tests/test_multinode.py in a process of its own.

``python -m tests.multinode_scenarios OUT.json`` starts 3 Ray nodes with ``ray.cluster_utils.Cluster``
(each its own raylet, object store, worker processes and temp folder; 1 CPU each): the head with the
custom resource ``learner_node``, two workers with ``runner_node``. It connects through
:func:`dapo_rl.jobs.cluster.connect` and runs, one after the other:

0. ``paths``: the checks that every node sees the run folder and the model (a missing one is named);
   ``command_line``: ``dapo-rl train --address`` with ``configs/cluster-arithmetic.yaml``, one iteration;
   ``reproduce_row``: the paper-scale launcher (``dapo_rl.reproduce.cluster``) with a tiny row, end to end.
1. ``reference``: DAPO (tiny preset) with its learner pinned to the head (``learner_resources``) and 2
   env runners pinned to the workers (``env_runner_resources``): which node each actor ran on, two
   iterations' metrics, a checkpoint.
2. ``restore``: a learner pinned to a worker node restores that checkpoint (written through the head's
   learner): its weights.
3. ``node_loss``: the same run as 1, where a verifier call on one worker's env runner signals the
   driver and waits; the driver adds a spare ``runner_node`` node and kills the worker node (its
   raylet and workers, SIGKILL). Timings from the loss to the iteration's end and to the runner
   being back, the nodes afterwards, the metrics.
4. ``learner_node_loss``: ``dapo-rl train --address`` with its one learner on a node of its own, that node
   killed during iteration 2 (after checkpoint 1): the error the command stops with and how long after
   the loss; ``dapo-rl train --resume`` as it was (refused: no node left for the learner), then with the
   learner moved to the head (``--set learner_resources=...``): the time to its first new iteration.

5. ``learner_node_frozen``: 2 DDP learners on 2 nodes of their own; one node frozen (SIGSTOP to its raylet
   and workers) as iteration 2's first update is sent, the other learner waiting in its all-reduce: the
   time until train() raises, and what.

``python -m tests.multinode_scenarios OUT.json NAME ...`` runs only the named scenarios (on the same cluster).

Results go to OUT.json. A separate process because a driver joins one Ray cluster at a time (the
test session's own ``ray_session`` stays untouched), and so that the cluster is ended with the
process whatever happens: only the nodes started here are stopped (``Cluster.shutdown``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.cluster_utils import Cluster

from dapo_rl.jobs import cluster as dapo_cluster
from tests.helpers import ENV, learner_weights, make_config

ROOT = Path(__file__).resolve().parent.parent
NODE = {"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024}

#: Runs inside the env runner (isolate=False): on the node named in TARGET, the first call creates
#: SIGNAL and waits for the node to be killed; elsewhere (and without TARGET) a last-number check.
WAIT_ON_TARGET_NODE = """
import os, time
import ray

def wait_on_target(response, reference):
    if os.path.exists(TARGET) and ray.get_runtime_context().get_node_id() == open(TARGET).read():
        try:
            os.close(os.open(SIGNAL, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            time.sleep(300)  # the driver kills this node meanwhile
    return response.strip().endswith(reference)
"""

METRICS = ("reward_mean", "generated_accuracy", "response_length_mean", "prompts_trained", "optimizer_steps")


def verifier(target: Path, signal: Path) -> Any:
    from dapo_envs import Verifier

    namespace = {"__name__": "wait_on_target_source", "TARGET": str(target), "SIGNAL": str(signal)}
    exec(WAIT_ON_TARGET_NODE, namespace)  # noqa: S102 - this file's own source, above
    return Verifier(name="wait-on-target", fn=namespace["wait_on_target"], isolate=False)


def config(work: Path, learner: dict[str, float], runners: int) -> Any:
    env_config = {"operators": "+", "verifier": verifier(work / "target_node", work / "signal")}
    return (
        make_config(lr=1e-3, overlong_filter=False)
        .environment(ENV, env_config=env_config)
        .learners(num_learners=1, **dapo_cluster.learner_placement({"learner_resources": learner}))
        .env_runners(
            num_env_runners=runners,
            **dapo_cluster.env_runner_placement({"env_runner_resources": {"runner_node": 1}}),
        )
    )


def learner_nodes(algo: Any) -> list[str]:
    return [r.get() for r in algo.learner_group.foreach_learner(lambda _: dapo_cluster.node_of_this_process())]


def runner_nodes(algo: Any) -> list[str]:
    return algo.env_runner_group.foreach_env_runner(
        lambda _: dapo_cluster.node_of_this_process(), local_env_runner=False
    )


def metrics(result: dict[str, Any]) -> dict[str, Any]:
    row = {name: result["dapo"][name] for name in METRICS}
    row["policy_loss"] = float(result["learners"]["default_policy"]["policy_loss"])
    for name in ("env_runner_failures", "env_runner_failures_total", "env_runners_restored_total"):
        row[name] = result["dapo"].get(name)
    return row


def weights_digest(weights: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.asarray(value, np.float64).sum()) for name, value in sorted(weights.items())}


def reference(work: Path, nodes: dict[str, str], out: dict[str, Any]) -> None:
    algo = config(work, {"learner_node": 1}, runners=2).build_algo()
    try:
        out["reference"] = {
            "learner_nodes": learner_nodes(algo),
            "runner_nodes": runner_nodes(algo),
            "results": [metrics(algo.train()) for _ in range(2)],
        }
        algo.save_to_path(str(work / "checkpoint"))
        out["reference"]["weights"] = weights_digest(learner_weights(algo))
    finally:
        algo.stop()


def restore(work: Path, out: dict[str, Any]) -> None:
    algo = config(work, {"runner_node": 1}, runners=0).build_algo()  # the learner on a worker node
    try:
        fresh = weights_digest(learner_weights(algo))
        algo.restore_from_path(str(work / "checkpoint"))
        out["restore"] = {
            "learner_nodes": learner_nodes(algo),
            "weights": weights_digest(learner_weights(algo)),
            "fresh_weights": fresh,
        }
    finally:
        algo.stop()


def node_loss(work: Path, cluster: Cluster, workers: dict[str, Any], out: dict[str, Any]) -> None:
    algo = config(work, {"learner_node": 1}, runners=2).build_algo()
    try:
        before = runner_nodes(algo)
        victim = workers[before[0]]  # the node of the first env runner
        (work / "target_node").write_text(victim.node_id)
        results: list[dict[str, Any]] = []
        finished: list[float] = []
        errors: list[BaseException] = []

        def train_once() -> None:
            try:
                results.append(algo.train())
                finished.append(time.monotonic())
            except BaseException as error:  # reported by the test
                errors.append(error)

        thread = threading.Thread(target=train_once)
        thread.start()
        deadline = time.monotonic() + 300
        while not (work / "signal").exists() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.2)
        assert (work / "signal").exists(), f"the target runner never sampled: {errors}"
        spare = cluster.add_node(**NODE, resources={"runner_node": 1})
        lost_at = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)  # its raylet and workers, SIGKILL
        thread.join(timeout=600)
        assert not errors and results, errors
        deadline = time.monotonic() + 300
        while algo.env_runner_group.num_healthy_remote_env_runners() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            algo.restore_env_runners(algo.env_runner_group)
        restored_at = time.monotonic()
        results.append(algo.train())
        out["node_loss"] = {
            "victim": victim.node_id,
            "spare": spare.node_id,
            "runner_nodes_before": before,
            "runner_nodes_after": runner_nodes(algo),
            "learner_nodes": learner_nodes(algo),
            "results": [metrics(result) for result in results],
            "seconds_to_iteration_end": finished[0] - lost_at,
            "seconds_to_runner_back": restored_at - lost_at,
            "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        }
    finally:
        algo.stop()


def paths(work: Path, address: str, out: dict[str, Any]) -> None:
    """The up-front checks of paths every node must see: a shared folder passes, a missing one is named."""
    port = address.rpartition(":")[2]
    dapo_cluster.connect(dapo_cluster.choose_cluster(f"127.0.0.1:{port}"))  # connected already: the same cluster
    dapo_cluster.check_storage_shared(work)
    try:
        dapo_cluster.check_paths_on_nodes({"the model": str(work / "only-on-the-driver")})
    except dapo_cluster.ClusterError as error:
        out["paths"] = {"refused": str(error)}
    else:
        out["paths"] = {"refused": None}


def command_line(work: Path, address: str, out: dict[str, Any]) -> None:
    """``dapo-rl train --address 127.0.0.1:PORT`` with configs/cluster-arithmetic.yaml: a Tune trial on the
    cluster (its learner on the head, its env runner on a worker), one iteration, no warm-start."""
    from dapo_rl.cli import main as dapo_rl

    port = address.rpartition(":")[2]
    output = work / "cli-run"
    argv = ["train", "--address", f"127.0.0.1:{port}", "--config", str(ROOT / "configs" / "cluster-arithmetic.yaml")]
    argv += [
        "--set",
        "iterations=1",
        "--set",
        "warmstart_steps=0",
        "--set",
        "eval_problems=4",
        "--set",
        "eval_samples=1",
    ]
    code = dapo_rl([*argv, "--output", str(output)])
    summary = json.loads((output / "summary.json").read_text()) if (output / "summary.json").is_file() else {}
    out["command_line"] = {"exit_status": code, "iterations": summary.get("iterations")}


def learner_node_loss(work: Path, cluster: Cluster, address: str, out: dict[str, Any]) -> None:
    """``dapo-rl train --address`` with its learner alone on a node of its own (``learner_resources``
    {remote_learner: 1}), a checkpoint every iteration; that node killed (raylet and workers, SIGKILL)
    once checkpoint 1 is complete, during iteration 2. Then ``dapo-rl train --resume`` as the error says:
    first as it was (refused: no node left offers remote_learner), then with the learner moved to the
    head (``--set learner_resources={learner_node: 1}``), on the nodes left. Timings: the loss to the
    command's return, the resume's start to its first new iteration."""
    import contextlib
    import io

    from dapo_rl.cli import main as dapo_rl
    from dapo_rl.jobs.run_folder import RESULTS_FILE, experiment_folder
    from dapo_rl.rllib.checkpoints import newest_complete_checkpoint

    port = address.rpartition(":")[2]
    doomed = cluster.add_node(**NODE, resources={"remote_learner": 1})
    output = work / "learner-loss-run"
    settings = ["iterations=3", "checkpoint_every=1", "warmstart_steps=0", "eval_problems=4", "eval_samples=1"]
    argv = ["train", "--address", f"127.0.0.1:{port}", "--config", str(ROOT / "configs" / "cluster-arithmetic.yaml")]
    argv += [f"--set={assignment}" for assignment in [*settings, "learner_resources={remote_learner: 1}"]]
    argv += ["--output", str(output)]

    def run_cli(arguments: list[str]) -> dict[str, Any]:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            code = dapo_rl(arguments)
        return {"exit_status": code, "ended_at": time.monotonic(), "stderr": errors.getvalue()}

    first: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: first.update(run_cli(argv)))
    thread.start()
    deadline = time.monotonic() + 400
    while thread.is_alive() and time.monotonic() < deadline:
        record = newest_complete_checkpoint(experiment_folder(output))
        if record is not None and record.iteration >= 1:
            break
        time.sleep(0.05)
    assert thread.is_alive(), f"the run ended before its learner's node was killed: {first}"
    lost_at = time.monotonic()
    cluster.remove_node(doomed, allow_graceful=False)  # its raylet and workers, SIGKILL
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not stop within 600 s of its learner's node being lost"
    found = out["learner_node_loss"] = {
        "lost_node": doomed.node_id,
        "first_run": {k: v for k, v in first.items() if k != "ended_at"},
        "seconds_loss_to_stop": first["ended_at"] - lost_at,
        "iterations_logged_before_resume": len((output / RESULTS_FILE).read_text().splitlines()),
        "alive_nodes_at_stop": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
    }

    refused = run_cli(["train", "--resume", str(output), "--address", f"127.0.0.1:{port}"])
    found["refused_resume"] = {k: v for k, v in refused.items() if k != "ended_at"}
    resume_start = time.monotonic()
    second: dict[str, Any] = {}
    resume_argv = ["train", "--resume", str(output), "--address", f"127.0.0.1:{port}"]
    thread = threading.Thread(
        target=lambda: second.update(run_cli([*resume_argv, "--set=learner_resources={learner_node: 1}"]))
    )
    thread.start()
    first_new_iteration_at = None
    resumed_from = newest_complete_checkpoint(experiment_folder(output))
    while thread.is_alive():
        rows = [json.loads(line) for line in (output / RESULTS_FILE).read_text().splitlines()]
        if (
            first_new_iteration_at is None
            and resumed_from
            and any(row["training_iteration"] > resumed_from.iteration for row in rows)
        ):
            first_new_iteration_at = time.monotonic()
        time.sleep(0.05)
    thread.join()
    summary = json.loads((output / "summary.json").read_text()) if (output / "summary.json").is_file() else {}
    found.update(
        {
            "resumed_from_iteration": resumed_from.iteration if resumed_from else None,
            "refused_resume": {k: v for k, v in refused.items() if k != "ended_at"},
            "resume": {k: v for k, v in second.items() if k != "ended_at"},
            "seconds_resume_to_first_new_iteration": (
                first_new_iteration_at - resume_start if first_new_iteration_at is not None else None
            ),
            "iterations": summary.get("iterations"),
            "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        }
    )


def reproduce_row(work: Path, address: str, out: dict[str, Any]) -> None:
    """``dapo_rl.reproduce.cluster.run_row_on_cluster`` (the paper-scale launcher) with a tiny row: connected
    through dapo_rl.jobs.cluster by the address a user types, the learner on the head, an env runner on
    a worker, one iteration, the export, the evaluation of the base model and of the trained one as
    Ray tasks (hf: the engine this row generates with), summary.json."""
    from dapo_rl.reproduce.cluster import run_row_on_cluster
    from dapo_rl.reproduce.settings import EvalSettings

    port = address.rpartition(":")[2]
    row = config(work, {"learner_node": 1}, runners=1)
    evaluation = EvalSettings(
        env=ENV, samples=1, temperature=1.0, top_p=1.0, max_new_tokens=8, metric="avg@1", problems=2
    )
    folder = work / "reproduce-row"
    summary = run_row_on_cluster(
        row, folder, iterations=1, evaluation=evaluation, checkpoint_every=1, address=f"127.0.0.1:{port}"
    )
    out["reproduce_row"] = {
        "iterations": summary["iterations"],
        "eval_metric": summary["eval_metric"],
        "problems_evaluated": summary["eval"].get("num_problems"),
        "accuracy_keys": sorted(k for k in summary if k.startswith("eval_accuracy")),
        "model_exported": (Path(summary["model"]) / "config.json").is_file(),
        "summary_written": (folder / "summary.json").is_file(),
    }


def frozen_processes(node: Any) -> list[int]:
    """The pids of a node started by ``Cluster.add_node``: its own processes (raylet, ...) and their children
    (the worker processes, the actors)."""
    import psutil

    pids = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    children = [child.pid for pid in pids for child in psutil.Process(pid).children(recursive=True)]
    return sorted(set(pids + children))


def learner_node_frozen(work: Path, cluster: Cluster, out: dict[str, Any]) -> None:
    """2 DDP learners, each on a node of its own (``collective_learner``), the driver's local runner sampling.
    In iteration 2, as the first update is sent, the node of learner 1 is frozen (SIGSTOP to its raylet and
    workers: a machine that vanished, its connections neither closed nor answered): learner 0 takes the
    update and waits in its all-reduce for a peer that never comes. The time until train() raises, and what."""
    nodes = [cluster.add_node(**NODE, resources={"collective_learner": 1}) for _ in "ab"]
    by_id = {node.node_id: node for node in nodes}
    algo = config(work, {"collective_learner": 1}, runners=0).learners(num_learners=2).build_algo()
    frozen_pids: list[int] = []
    frozen_at: list[float] = []
    try:
        placed = learner_nodes(algo)
        algo.train()
        victim = by_id[placed[1]]
        send_update = algo.learner_group.update

        def freeze_then_update(*args: Any, **kwargs: Any) -> Any:
            if not frozen_pids:  # the first update of iteration 2: the node vanishes as it is sent
                frozen_pids.extend(frozen_processes(victim))
                for pid in frozen_pids:
                    os.kill(pid, signal.SIGSTOP)
                frozen_at.append(time.monotonic())
            return send_update(*args, **kwargs)

        algo.learner_group.update = freeze_then_update
        raised: list[BaseException] = []
        ended: list[float] = []

        def train_once() -> None:
            try:
                algo.train()
            except BaseException as error:  # reported by the test
                raised.append(error)
            ended.append(time.monotonic())

        thread = threading.Thread(target=train_once)
        thread.start()
        thread.join(timeout=180)
        found = out["learner_node_frozen"] = {
            "learner_nodes": placed,
            "frozen_node": victim.node_id,
            "frozen": bool(frozen_at),
            "stopped_within_180_s": not thread.is_alive(),
            "seconds_to_stop": (ended[0] - frozen_at[0]) if ended and frozen_at else None,
            "error": f"{type(raised[0]).__name__}: {raised[0]}" if raised else None,
        }
        for pid in frozen_pids:  # the frozen node ends for real (and the waiting learner with it, if still waiting)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=300)
        found["ended_after_the_kill"] = not thread.is_alive()
    finally:
        for pid in frozen_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        algo.stop()


SCENARIOS = (
    "paths",
    "command_line",
    "reproduce_row",
    "reference",
    "restore",
    "node_loss",
    "learner_node_loss",
    "learner_node_frozen",
)


def main(target: str, only: list[str] | None = None) -> None:
    out: dict[str, Any] = {"seconds": {}}
    work = Path(tempfile.mkdtemp(prefix="dapo_mn_work_"))
    cluster = Cluster()
    try:
        start = time.monotonic()
        head = cluster.add_node(**NODE, resources={"learner_node": 1}, include_dashboard=False)
        workers = {
            node.node_id: node for node in (cluster.add_node(**NODE, resources={"runner_node": 1}) for _ in "bc")
        }
        port = cluster.address.rpartition(":")[2]
        dapo_cluster.connect(dapo_cluster.choose_cluster(f"127.0.0.1:{port}"))  # as a user types it
        out["nodes"] = {"head": head.node_id, "workers": sorted(workers)}
        out["seconds"]["start"] = time.monotonic() - start
        for name, scenario in (
            ("paths", lambda: paths(work, cluster.address, out)),
            ("command_line", lambda: command_line(work, cluster.address, out)),
            ("reproduce_row", lambda: reproduce_row(work, cluster.address, out)),
            ("reference", lambda: reference(work, out["nodes"], out)),
            ("restore", lambda: restore(work, out)),
            ("node_loss", lambda: node_loss(work, cluster, workers, out)),
            ("learner_node_loss", lambda: learner_node_loss(work, cluster, cluster.address, out)),
            ("learner_node_frozen", lambda: learner_node_frozen(work, cluster, out)),
        ):
            if only and name not in only:
                continue
            start = time.monotonic()
            try:
                scenario()
            except BaseException as error:
                out.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
            out["seconds"][name] = time.monotonic() - start
    finally:
        Path(target).write_text(json.dumps(out, indent=1))
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main(sys.argv[1], sys.argv[2:] or None)  # names after OUT.json: run only those scenarios (of SCENARIOS)
