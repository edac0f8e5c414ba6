"""The main job's DAPO iteration on one Ray node against the same work over three nodes of this machine.

Both layouts hold the same 3 logical CPUs and the same actors: the driver (this process), one remote
learner and two env runners, built from the main job's training settings (32 prompts x 8, 4 updates
per iteration) on the tiny preset, with dynamic sampling off so that every iteration does the same
work (one generation round, every group trained):

- ``1 node``: one ``ray.cluster_utils.Cluster`` node with 3 CPUs;
- ``3 nodes``: a head with 1 CPU and ``learner_node`` (the learner, pinned by ``learner_resources``) and
  two workers with 1 CPU and ``runner_node`` each (one env runner each, ``env_runner_resources``).
  Each node is its own raylet and object store: the learners' weights go to the runners, and the
  runners' sampled shares come back to the driver, across nodes.

Rounds alternate the layouts (1, 3, 1, 3, ...), each on a fresh cluster, so that the load of the
machine's other processes falls on both; each round trains ``--warmup`` iterations, then times
``--iterations``. Bytes: per iteration, the pickled size (in the driver) of the payloads that travel
between processes: the weights sent to each remote env runner (one sync per iteration), the shares
the runners return, the mini-batches sent to the learner. In the 3-node layout the first two cross
nodes; the driver and the learner share the head, so the mini-batches do not.

    python benchmarks/multinode.py [--rounds 2] [--warmup 1] [--iterations 4] \\
        [--output benchmarks/results/multinode_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import dapo_rl.rllib.sampling as sampling_module  # noqa: E402
from dapo_rl import DAPOConfig  # noqa: E402
from dapo_rl.jobs import DEFAULT_JOB  # noqa: E402
from dapo_rl.jobs import cluster as dapo_cluster  # noqa: E402

NODE = {"object_store_memory": 100 * 1024 * 1024}
SEED = 0


def config(layout: str) -> DAPOConfig:
    pinned = layout == "3 nodes"
    learner = {"learner_resources": {"learner_node": 1} if pinned else {}}
    runners = {"env_runner_resources": {"runner_node": 1} if pinned else {}}
    return (
        DAPOConfig()
        .environment(DEFAULT_JOB["env"], env_config=dict(DEFAULT_JOB["env_config"]))
        .rl_module(model_config={"model": "tiny-qwen2"})
        .training(**{**DEFAULT_JOB["training"], "dynamic_sampling": False})
        .learners(num_learners=1, **dapo_cluster.learner_placement(learner))
        .env_runners(num_env_runners=2, **dapo_cluster.env_runner_placement(runners))
        .debugging(seed=SEED, log_level="ERROR")
    )


def start(layout: str) -> Cluster:
    cluster = Cluster()
    if layout == "1 node":
        cluster.add_node(**NODE, num_cpus=3, include_dashboard=False)
    else:
        cluster.add_node(**NODE, num_cpus=1, resources={"learner_node": 1}, include_dashboard=False)
        for _ in range(2):
            cluster.add_node(**NODE, num_cpus=1, resources={"runner_node": 1})
    port = cluster.address.rpartition(":")[2]
    dapo_cluster.connect(dapo_cluster.choose_cluster(f"127.0.0.1:{port}"))
    return cluster


class Payloads:
    """Pickled sizes of the runners' shares and the learner's mini-batches, counted in the driver."""

    def __init__(self, algo: Any) -> None:
        self.shares = self.batches = 0
        merge = sampling_module.merge_shares
        update = algo.learner_group.update

        def counted_merge(parts: Any) -> Any:
            self.shares += len(pickle.dumps(parts, protocol=5))
            return merge(parts)

        def counted_update(*args: Any, **kwargs: Any) -> Any:
            self.batches += len(pickle.dumps(kwargs.get("batch", args[0] if args else None), protocol=5))
            return update(*args, **kwargs)

        sampling_module.merge_shares = counted_merge
        algo.learner_group.update = counted_update
        self._restore = lambda: setattr(sampling_module, "merge_shares", merge)

    def close(self) -> None:
        self._restore()


def run_round(layout: str, warmup: int, iterations: int) -> dict[str, Any]:
    cluster = start(layout)
    try:
        algo = config(layout).build_algo()
        try:
            placement = {
                "learner": [
                    r.get()
                    for r in algo.learner_group.foreach_learner(lambda _: ray.get_runtime_context().get_node_id())
                ],
                "runners": algo.env_runner_group.foreach_env_runner(
                    lambda _: ray.get_runtime_context().get_node_id(), local_env_runner=False
                ),
            }
            for _ in range(warmup):
                algo.train()
            payloads = Payloads(algo)
            times = []
            try:
                for _ in range(iterations):
                    start_time = time.perf_counter()
                    algo.train()
                    times.append(time.perf_counter() - start_time)
            finally:
                payloads.close()
            weights = len(pickle.dumps(algo.learner_group.get_weights(), protocol=5))
        finally:
            algo.stop()
        return {
            "layout": layout,
            "times": times,
            "nodes": len({*placement["learner"], *placement["runners"]}),
            "weights_to_runners": 2 * weights,
            "shares": payloads.shares / iterations,
            "batches": payloads.batches / iterations,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--output", default="benchmarks/results/multinode_cpu.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    rounds = [
        run_round(layout, args.warmup, args.iterations) for _ in range(args.rounds) for layout in ("1 node", "3 nodes")
    ]
    by_layout = {layout: [r for r in rounds if r["layout"] == layout] for layout in ("1 node", "3 nodes")}
    median = {layout: statistics.median(t for r in rs for t in r["times"]) for layout, rs in by_layout.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/multinode.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    three = by_layout["3 nodes"][0]
    lines = [
        "# The main job's iteration on 1 Ray node against 3 Ray nodes of one machine",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, shared with other processes (1-min load average "
        f"at the end {load:.1f}); torch {torch.__version__}; Ray {ray.__version__}  ",
        f"Commit: {commit} (the benchmark's own file may be newer)  ",
        f"Seed: {SEED}. Job: the main job's training settings (32 prompts x 8, 4 updates per iteration), tiny preset "
        "from random weights, dynamic sampling off (one generation round per iteration, every group trained); "
        "1 remote learner, 2 env runners, 3 logical CPUs in both layouts; "
        f"{args.rounds} rounds per layout, alternating, each on a fresh cluster: {args.warmup} warm-up iteration(s), "
        f"then {args.iterations} timed.",
        "",
        "| layout | nodes holding the actors | iteration (s), median | each round's iterations (s) |",
        "|---|---:|---:|---|",
    ]
    for layout, rs in by_layout.items():
        each = "; ".join(", ".join(f"{t:.2f}" for t in r["times"]) for r in rs)
        lines.append(f"| {layout} | {rs[0]['nodes']} | {median[layout]:.2f} | {each} |")
    lines += [
        "",
        f"**3 nodes / 1 node: {median['3 nodes'] / median['1 node']:.2f}** (median iteration time).",
        "",
        "Payloads per iteration (pickled sizes in the driver, MiB); the same in both layouts, and in the 3-node "
        "layout the first two cross nodes:",
        "",
        "| payload | MiB per iteration | crosses nodes (3 nodes) |",
        "|---|---:|---|",
        f"| weights, learner -> 2 env runners (one sync) | {mib(three['weights_to_runners'])} | yes |",
        f"| sampled shares, env runners -> driver | {mib(three['shares'])} | yes |",
        f"| mini-batches, driver -> learner | {mib(three['batches'])} | no (both on the head) |",
        "",
        f"Bytes crossing nodes per iteration in the 3-node layout: {mib(three['weights_to_runners'] + three['shares'])} MiB.",
        "Every node is on the same machine: crossing nodes costs a transfer between two object stores over "
        "loopback, not a network; on separate machines the same bytes travel over the network.",
    ]
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
