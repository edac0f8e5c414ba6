"""A real multi-node Ray cluster on this machine: placement by custom resources, an iteration with the
learner on one node and env runners on the others, a checkpoint restored on another node, a worker
node killed mid-run, the node holding the learner killed mid-run, then the run resumed, and a learner's
node lost while the other learner waits in a collective.

``tests/multinode_scenarios.py`` runs all of it in one process of its own (one cluster of 3 nodes
for all scenarios, about 300 to 400 s on 2 cores; a driver joins one Ray cluster at a time, and this
session's ``ray_session`` must stay as it is); the tests here read what it found. It ends only the
nodes it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def scenarios():
    """The results of ``python -m tests.multinode_scenarios`` (Ray's temp folder, and so the address file a
    head writes, in a short folder of its own: never /tmp/ray, which other Ray users on the machine read)."""
    root = tempfile.mkdtemp(prefix="dapo_mn_")
    try:
        out = Path(root) / "out.json"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=root, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
        done = subprocess.run(
            [sys.executable, "-m", "tests.multinode_scenarios", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
        assert out.is_file(), f"exit status {done.returncode}\n{done.stderr[-5000:]}"
        found = json.loads(out.read_text())
        assert not found.get("errors"), found.get("errors")
        print("multinode scenario seconds:", found["seconds"])
        return found
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_learner_and_env_runners_run_on_the_nodes_their_resources_pin(scenarios):
    """learner_resources {learner_node: 1} puts the learner on the head; env_runner_resources
    {runner_node: 1} one env runner on each worker node (1 CPU each)."""
    nodes, reference = scenarios["nodes"], scenarios["reference"]
    assert reference["learner_nodes"] == [nodes["head"]]
    assert sorted(reference["runner_nodes"]) == nodes["workers"]


def test_an_iteration_trains_with_the_learner_and_env_runners_on_different_nodes(scenarios):
    results = scenarios["reference"]["results"]
    assert [row["optimizer_steps"] for row in results] == [2, 4]  # 2 updates per iteration, as on one node
    assert all(row["prompts_trained"] == 4 and row["env_runner_failures"] == 0 for row in results)


def test_a_checkpoint_written_through_one_node_restores_on_a_learner_on_another(scenarios):
    nodes, restore = scenarios["nodes"], scenarios["restore"]
    assert restore["learner_nodes"][0] in nodes["workers"]  # not the head, whose learner wrote it
    assert restore["weights"] == scenarios["reference"]["weights"]
    assert restore["fresh_weights"] != restore["weights"]  # the restore, not the seed, made them equal


def test_a_worker_node_lost_mid_run_costs_its_share_only_and_training_goes_on(scenarios):
    """The node of an env runner is killed (raylet and workers) while that runner samples: its share is
    sampled again on the other runner, the runner is recreated on a surviving (spare) node, and the run
    trains exactly as the unharmed reference did."""
    loss, reference = scenarios["node_loss"], scenarios["reference"]
    assert loss["victim"] in loss["runner_nodes_before"] and loss["victim"] not in loss["alive_nodes"]
    assert loss["spare"] in loss["runner_nodes_after"] and loss["victim"] not in loss["runner_nodes_after"]
    assert loss["learner_nodes"] == [scenarios["nodes"]["head"]]
    failures = [(row["env_runner_failures"], row["env_runners_restored_total"]) for row in loss["results"]]
    assert failures == [(1, 0), (0, 1)]
    names = ("reward_mean", "generated_accuracy", "response_length_mean", "prompts_trained", "optimizer_steps")
    for expected, got in zip(reference["results"], loss["results"], strict=True):
        assert {n: got[n] for n in names} == {n: expected[n] for n in names}
        assert got["policy_loss"] == expected["policy_loss"]
    print(
        f"node lost -> iteration done {loss['seconds_to_iteration_end']:.1f} s, "
        f"runner back on a surviving node {loss['seconds_to_runner_back']:.1f} s"
    )


def test_a_path_some_node_does_not_see_is_refused_naming_the_nodes(scenarios):
    refused = scenarios["paths"]["refused"]
    assert refused is not None and refused.startswith("the model ") and "only-on-the-driver" in refused
    assert refused.count("(") >= 3  # every node of the 3 is named


def test_dapo_rl_train_runs_on_the_cluster_named_by_address(scenarios):
    """The command line's path: the cluster checked up front (reachable, placement, the run folder seen
    by every node), then a Tune trial with configs/cluster-arithmetic.yaml's placement."""
    assert scenarios["command_line"] == {"exit_status": 0, "iterations": 1}


def test_a_lost_learner_node_stops_the_run_in_seconds_naming_the_node_and_how_to_resume(scenarios):
    """The node holding the only learner is killed during iteration 2: dapo-rl train stops with
    LearnerNodeLostError naming that node (not a generic actor error, not RLlib's 30-minute collective
    time-out), and the cluster no longer counts the node when it returns."""
    loss = scenarios["learner_node_loss"]
    stopped = loss["first_run"]
    assert stopped["exit_status"] == 1
    message = stopped["stderr"].rpartition("dapo-rl: training stopped: ")[2]
    assert "LearnerNodeLostError: learner 0 of 1 died during iteration 2" in message
    assert f"on Ray node {loss['lost_node'][:12]} " in message and "lost: the cluster reports it dead" in message
    assert "--set learner_resources=" in message and "dapo-rl train --resume " in message
    assert loss["iterations_logged_before_resume"] == 1
    assert loss["lost_node"] not in loss["alive_nodes_at_stop"]
    assert loss["seconds_loss_to_stop"] < 120
    print(f"learner node lost -> dapo-rl train stopped {loss['seconds_loss_to_stop']:.1f} s later")


def test_a_run_whose_learner_node_was_lost_resumes_on_the_nodes_left(scenarios):
    """dapo-rl train --resume as it was is refused in one line (no node left offers remote_learner); with
    --set learner_resources={learner_node: 1} it continues from checkpoint 1 on the nodes left."""
    loss = scenarios["learner_node_loss"]
    refused = loss["refused_resume"]
    assert refused["exit_status"] == 2 and "['remote_learner']" in refused["stderr"]
    assert "--resume DIR --set" in refused["stderr"]
    assert loss["resume"]["exit_status"] == 0, loss["resume"]["stderr"][-3000:]
    assert loss["resumed_from_iteration"] == 1 and loss["iterations"] == 3
    assert loss["seconds_resume_to_first_new_iteration"] is not None
    print(f"resume -> first new iteration {loss['seconds_resume_to_first_new_iteration']:.1f} s")


def test_the_paper_scale_launcher_runs_a_tiny_row_end_to_end_on_the_cluster(scenarios):
    """dapo_rl.reproduce.cluster.run_row_on_cluster, given the address as a user types it (it once passed
    Ray's "auto", which the one connection path refuses): connected and checked as dapo-rl train --address,
    one iteration under Tune, the policy exported, base and trained models evaluated as Ray tasks."""
    row = scenarios["reproduce_row"]
    assert row["iterations"] == 1 and row["problems_evaluated"] == 2
    assert row["accuracy_keys"] == ["eval_accuracy_after", "eval_accuracy_before"]
    assert row["model_exported"] and row["summary_written"]
    assert row["eval_metric"] == "avg@1 on dapo/Arithmetic-v0"


def test_a_learner_node_lost_mid_collective_stops_the_run_without_the_process_group_time_out(scenarios):
    """2 DDP learners on 2 nodes; one node freezes (SIGSTOP: a machine gone without closing its connections)
    as an update is sent, and the other learner waits in its all-reduce. The run stops with
    LearnerNodeLostError naming the frozen node once the cluster reports it dead, not after the process
    group's 30-minute time-out (without the watch, train() was still waiting after 180 s)."""
    frozen = scenarios["learner_node_frozen"]
    assert frozen["frozen"] and frozen["stopped_within_180_s"], frozen
    assert frozen["error"].startswith("LearnerNodeLostError: learner "), frozen["error"]
    assert " of 2 died during iteration 2 " in frozen["error"]
    assert f"on Ray node {frozen['frozen_node'][:12]} " in frozen["error"]
    survivor = next(node for node in frozen["learner_nodes"] if node != frozen["frozen_node"])
    assert survivor[:12] not in frozen["error"]  # the learner stopped here is not named as lost
    print(f"learner node frozen mid-collective -> train() raised {frozen['seconds_to_stop']:.1f} s later")
