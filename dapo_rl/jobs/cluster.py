"""Which Ray cluster a run uses, decided and checked before any work; placement and paths across nodes.

A run either starts a new local Ray instance (no address anywhere) or attaches to the running
cluster named by ``dapo-rl train --address HOST:PORT`` (``address=`` of :func:`dapo_rl.jobs.train`),
else by ``RAY_ADDRESS``. Nothing else decides: Ray's own ``ray.init()`` also reads the address a
``ray start`` left in its temp folder (``ray_current_cluster``), which outlives a dead head and made
a run die in ``ray.init`` after its warm-start and first evaluation.

:func:`choose_cluster` decides; :func:`attach` connects to a named cluster and checks, before the run
does anything, that its nodes can hold the trial (custom resources included) and see the paths the
run gives its actors (a model folder, the output folder). :func:`connect` starts the local instance
when no cluster was named.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ray

from dapo_rl.rllib.threads import SHARED_CORES_ENV

#: The environment variable Ray (and ``ray job submit``'s entrypoints) name a cluster by.
ADDRESS_VARIABLE = "RAY_ADDRESS"

#: Seconds to wait for the cluster's address to answer before refusing the run.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(ValueError):
    """The named cluster cannot run this job (unreachable, too small, paths its nodes do not see)."""


@dataclasses.dataclass(frozen=True)
class ClusterChoice:
    """The cluster a run uses: ``address`` None for a new local instance; ``source`` says who named it."""

    address: str | None
    source: str

    @property
    def local(self) -> bool:
        return self.address is None

    def describe(self) -> str:
        return "a new local Ray instance" if self.local else f"the Ray cluster at {self.address} ({self.source})"


def choose_cluster(address: str | None = None) -> ClusterChoice:
    """The cluster a run uses: ``address`` (``--address``), else ``RAY_ADDRESS``, else a new local instance.

    ``"local"`` asks for a new local instance whatever ``RAY_ADDRESS`` says. Ray's ``"auto"`` and
    ``ray://`` client addresses are refused: "auto" is the guess this module exists to avoid, and a Ray
    Client driver cannot hold a Tune run's files (submit the job with ``ray job submit`` instead).
    """
    source = "--address"
    if not address:
        address, source = os.environ.get(ADDRESS_VARIABLE) or None, ADDRESS_VARIABLE
    if address is None or address == "local":
        return ClusterChoice(None, "no address given" if address is None else source)
    if address == "auto" or address.startswith("ray://"):
        raise ClusterError(
            f"{source}={address}: give the cluster's GCS address as HOST:PORT (what `ray start --head` printed, "
            "e.g. 10.0.0.1:6379); for a Ray Client address, run the job on the cluster with `ray job submit` instead"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"{source}={address}: a Ray cluster address is HOST:PORT, e.g. 127.0.0.1:6379")
    return ClusterChoice(address, source)


def check_reachable(choice: ClusterChoice, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a named cluster whose address does not answer (in ``timeout`` seconds, not Ray's minutes of retries)."""
    if choice.local:
        return
    assert choice.address is not None
    host, _, port = choice.address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as error:
        hint = (
            f"unset {ADDRESS_VARIABLE} to start a local Ray instance"
            if choice.source == ADDRESS_VARIABLE
            else "drop --address to start a local Ray instance"
        )
        raise ClusterError(
            f"no Ray cluster answers at {choice.address} (from {choice.source}): {error}. Start one "
            f"(`ray start --head --port {port}`), give the address of a running one, or {hint}"
        ) from None


#: The address this process connected to through :func:`connect` (Ray names it by the node's IP afterwards).
_CONNECTED: dict[str, str] = {}


def connect(choice: ClusterChoice, *, min_cpus: int = 1) -> None:
    """Connect this process to ``choice``'s cluster once (a no-op when already connected to it).

    A new local instance is quiet (no dashboard, workers' logs kept off the terminal, whose output is
    the progress bar) and offers at least ``min_cpus`` logical CPUs even on a smaller machine (a trial
    with 2 learners asks for 3 on a 2-core laptop: it runs, sharing the cores, instead of waiting
    forever). It is started with ``address="local"``, so that no stale address decides for it. Ray 2.60
    asks for an auth token unless RAY_AUTH_MODE says otherwise; a single-machine job has no token to give.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    check_reachable(choice)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        named = choice.address is not None and choice.address != _CONNECTED.get("address")
        if named and not _same_address(current, str(choice.address)):
            raise ClusterError(
                f"this process is already connected to the Ray cluster at {current}, not to {choice.describe()}"
            )
        return
    if choice.local:
        # The instance's processes (the trial, its env runners and learners) inherit this process's
        # environment: OpenMP threads that sleep rather than spin when they share cores.
        for name, value in SHARED_CORES_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, min_cpus),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
        return
    try:
        ray.init(address=choice.address, log_to_driver=False, logging_level=logging.ERROR)
        _CONNECTED["address"] = choice.address  # Ray reports 127.0.0.1:PORT as NODE_IP:PORT
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise ClusterError(f"could not connect to {choice.describe()}: {' '.join(str(error).split())}") from None


def _same_address(a: str, b: str) -> bool:
    def canonical(address: str) -> tuple[str, str]:
        host, _, port = address.rpartition(":")
        try:
            host = socket.gethostbyname(host)
        except OSError:
            pass
        return ("127.0.0.1" if host.startswith("127.") else host), port

    return canonical(a) == canonical(b)


# -- what the cluster must offer ---------------------------------------------------------------------


def resource_problem(key: str, value: Any) -> str | None:
    """What is wrong with a job's ``learner_resources`` / ``env_runner_resources`` mapping (None: nothing)."""
    if not isinstance(value, Mapping):
        return (
            f"{key} must be a mapping of custom Ray resource names to amounts, e.g. {{learner_node: 1}}, got {value!r}"
        )
    for name, amount in value.items():
        if not isinstance(name, str) or not name:
            return f"{key}: resource names are text, got {name!r}"
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            return f"{key}: {name!r} is not a custom resource; use num_cpus_per_*/num_gpus_per_* instead"
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not amount > 0:
            return f"{key}: the amount of {name!r} must be a number > 0, got {amount!r}"
    return None


def check_bundles_fit(bundles: Iterable[Mapping[str, float]], node_resources: Iterable[Mapping[str, float]]) -> None:
    """Refuse a trial whose placement no node can hold (Tune would wait for it forever).

    Each bundle (the trial's process, each learner, each env runner) must fit on one node's total
    resources; a custom resource no node has is named.
    """
    nodes = [dict(resources) for resources in node_resources]
    offered = {name for resources in nodes for name in resources}
    for bundle in bundles:
        wanted = {name: amount for name, amount in bundle.items() if amount}
        missing = sorted(name for name in wanted if name not in offered)
        if missing:
            raise ClusterError(
                f"the run asks for the Ray resource(s) {missing} ({_plain(wanted)} for one actor), which no node of "
                "the cluster has: start nodes with `ray start ... --resources '{\"NAME\": 1}'`, or change "
                "learner_resources / env_runner_resources (a resume may: dapo-rl train --resume DIR --set "
                "'learner_resources={NAME: 1}')"
            )
        if not any(all(node.get(name, 0) >= amount for name, amount in wanted.items()) for node in nodes):
            raise ClusterError(
                f"no node of the cluster can hold {_plain(wanted)} (one actor of the run); nodes offer: "
                + "; ".join(_plain(node, keep=set(wanted)) for node in nodes)
            )


def _plain(resources: Mapping[str, float], keep: set[str] | None = None) -> str:
    shown = {k: v for k, v in resources.items() if keep is None or k in keep}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def learner_placement(job: Mapping[str, Any]) -> dict[str, Any]:
    """``DAPOConfig.learners()`` keywords of a job's ``learner_resources`` (RLlib's ``custom_resources_per_learner``)."""
    if (problem := resource_problem("learner_resources", job.get("learner_resources", {}))) is not None:
        raise ClusterError(problem)
    return {"custom_resources_per_learner": dict(job.get("learner_resources", {}))}


def env_runner_placement(job: Mapping[str, Any]) -> dict[str, Any]:
    """``DAPOConfig.env_runners()`` keywords of a job's ``env_runner_resources`` (``custom_resources_per_env_runner``)."""
    if (problem := resource_problem("env_runner_resources", job.get("env_runner_resources", {}))) is not None:
        raise ClusterError(problem)
    return {"custom_resources_per_env_runner": dict(job.get("env_runner_resources", {}))}


def prepare(
    address: str | None, bundles: Iterable[Mapping[str, float]], model_config: Mapping[str, Any]
) -> ClusterChoice:
    """Decide a run's cluster and check it before any work; returns the choice (connect later with :func:`connect`).

    A named cluster is connected to now and must answer, hold every bundle of the trial on some
    node, and show the model folder on every node (so must the cluster this process is already
    connected to, when none is named). A new local instance offers no custom resources, so a trial
    asking for one is refused (it would wait for ever).
    """
    choice = choose_cluster(address)
    bundles = [dict(bundle) for bundle in bundles]
    if choice.local and not ray.is_initialized():
        custom = sorted({name for bundle in bundles for name, amount in bundle.items() if amount} - {"CPU", "GPU"})
        if custom:
            raise ClusterError(
                f"the run asks for the custom Ray resource(s) {custom} (learner_resources / env_runner_resources), "
                "which a new local Ray instance does not have: run it on a cluster whose nodes have them "
                f"(dapo-rl train --address HOST:PORT, or {ADDRESS_VARIABLE}=HOST:PORT)"
            )
        return choice
    connect(choice)  # a named cluster now; with no address, a process already connected keeps its cluster
    check_bundles_fit(bundles, alive_node_resources())
    check_paths_on_nodes(local_paths(str(model_config.get("model") or "")))
    return choice


def largest_node_cpus() -> int:
    """The most CPUs one alive node of the connected cluster has (a large number when not connected)."""
    if not ray.is_initialized():
        return 1 << 30
    return max((int(node.get("CPU", 0)) for node in alive_node_resources()), default=1) or 1


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


@ray.remote(num_cpus=0, max_retries=0)
def _missing_paths(paths: list[str]) -> list[str]:
    return [path for path in paths if not os.path.exists(path)]


def check_paths_on_nodes(paths: Mapping[str, str], timeout: float = 120.0) -> None:
    """Refuse a run whose paths (what they are -> path) some alive node of the cluster does not see.

    One zero-CPU task per node, pinned there, looks for each path. A folder that only the driver's
    machine holds (a model folder, a run folder on a local disk) is named with the nodes that miss it.
    """
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 1 or not paths:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wanted = list(paths.values())
    futures = {
        node["NodeManagerAddress"] + " (" + node["NodeID"][:8] + ")": _missing_paths.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(wanted)
        for node in nodes
    }
    misses: dict[str, list[str]] = {}
    for node_name, future in futures.items():
        try:
            missing = ray.get(future, timeout=timeout)
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError):
            # The node left the cluster between the listing and the check (a node just lost, which the
            # cluster still listed as alive): it runs none of this run's actors.
            continue
        for path in missing:
            misses.setdefault(path, []).append(node_name)
    for what, path in paths.items():
        if path in misses:
            raise ClusterError(
                f"{what} {path} is not visible on node(s) {', '.join(misses[path])} of the Ray cluster; the learners "
                "and env runners there read it: put it on a folder every node mounts at the same path (NFS, ...), "
                "or copy it to that path on every node"
            )


def check_storage_shared(folder: Path) -> None:
    """Refuse a run folder (Tune's storage, checkpoints, FSDP2 shards) that a node of the cluster does not see.

    Writes a marker file in ``folder`` and asks every node to find it; a node with its own local disk
    at that path would keep the checkpoints its actors write where the driver can never restore them.
    """
    marker = folder / f".dapo-node-check-{uuid.uuid4().hex[:12]}"
    marker.write_text("dapo-rl: every node of the cluster must see this folder\n", encoding="utf-8")
    try:
        check_paths_on_nodes({"the run folder": os.fspath(marker)})
    except ClusterError as error:
        raise ClusterError(
            str(error).replace(os.fspath(marker), os.fspath(folder))
            + " (a shared folder, the same path on every node; checkpoints and FSDP2 shards are written there)"
        ) from None
    finally:
        marker.unlink(missing_ok=True)


def local_paths(model: str) -> dict[str, str]:
    """The paths of a run that actors on other nodes open: the model, when it is a local file or folder."""
    return {"the model": model} if os.path.isabs(model) and os.path.exists(model) else {}


def node_of_this_process() -> str:
    """The Ray node id of the calling worker or driver (for placement checks)."""
    return str(ray.get_runtime_context().get_node_id())


__all__ = [
    "ADDRESS_VARIABLE",
    "ClusterChoice",
    "ClusterError",
    "alive_node_resources",
    "check_bundles_fit",
    "check_paths_on_nodes",
    "check_reachable",
    "check_storage_shared",
    "choose_cluster",
    "connect",
    "env_runner_placement",
    "largest_node_cpus",
    "learner_placement",
    "local_paths",
    "node_of_this_process",
    "prepare",
    "resource_problem",
]
