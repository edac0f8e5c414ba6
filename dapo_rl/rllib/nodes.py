"""Whether the Ray nodes that held a run's actors are still there: what the error that stops a run names.

A node whose raylet is killed (or whose machine is gone) stays "alive" in the cluster's table until
the GCS's health checks give up on it (about 15 s with Ray's defaults). Before that, its actors are
only "unavailable". :func:`node_states` tells a lost node from a live one at once, by asking its raylet
directly, and waits (a bounded time) for the cluster to agree, so that a run stops on a settled cluster:
a resume started right after does not count the lost node's resources.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ray

#: Seconds to wait for the cluster to report a node dead once its raylet has stopped answering.
LOST_NODE_WAIT_S = 60.0

#: Seconds a raylet has to accept a connection before it counts as not answering.
RAYLET_CONNECT_TIMEOUT_S = 3.0


def raylet_answers(node: Mapping[str, Any], timeout: float = RAYLET_CONNECT_TIMEOUT_S) -> bool:
    """Whether the raylet of ``node`` (a row of ``ray.nodes()``) accepts a TCP connection on its port."""
    try:
        address = (str(node["NodeManagerAddress"]), int(node["NodeManagerPort"]))
    except (KeyError, TypeError, ValueError):
        return False
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class NodeState:
    """One Ray node as a stopped run names it: ``lost`` with the reason, or alive."""

    node_id: str
    address: str
    lost: bool
    reason: str = ""

    def describe(self) -> str:
        where = f"Ray node {self.node_id[:12]} ({self.address})"
        return f"{where}, lost: {self.reason}" if self.lost else f"{where}, still alive"


def node_states(node_ids: Iterable[str], wait_s: float = LOST_NODE_WAIT_S) -> dict[str, NodeState]:
    """The state of each node, by id.

    A node whose raylet does not answer is lost whatever the cluster's table says; this waits up to
    ``wait_s`` for the table to say so too (the GCS's health checks), then reports it lost either way.
    """
    wanted = sorted(set(node_ids))
    deadline = time.monotonic() + wait_s
    while True:
        table = {node["NodeID"]: node for node in ray.nodes()}
        unanswering = [
            node_id for node_id in wanted if table.get(node_id, {}).get("Alive") and not raylet_answers(table[node_id])
        ]
        if not unanswering or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    states = {}
    for node_id in wanted:
        node = table.get(node_id, {})
        address = str(node.get("NodeManagerAddress", "address unknown"))
        if not node.get("Alive"):
            states[node_id] = NodeState(node_id, address, lost=True, reason="the cluster reports it dead")
        elif node_id in unanswering:
            reason = (
                f"its raylet (port {node.get('NodeManagerPort')}) does not answer, though the cluster still lists it"
            )
            states[node_id] = NodeState(node_id, address, lost=True, reason=reason)
        else:
            states[node_id] = NodeState(node_id, address, lost=False)
    return states


class NodeWatch:
    """While in a ``with`` block, watch ``node_ids`` in the cluster's table every ``period_s`` seconds;
    the first time one is reported dead, call ``on_lost`` with the dead ids (from the watching thread)
    and stop watching. ``lost`` holds those ids afterwards (empty: none was lost).

    Why: learners inside a collective (DDP / FSDP2 all-reduce) wait for a peer whose machine is gone
    until the process group's time-out (30 minutes), and the driver waits for them; only the node's
    loss, which the cluster does report, says that the wait is hopeless.
    """

    def __init__(self, node_ids: Iterable[str], on_lost: Callable[[list[str]], None], period_s: float = 2.0) -> None:
        self._node_ids = sorted(set(node_ids))
        self._on_lost = on_lost
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: list[str] = []

    def __enter__(self) -> NodeWatch:
        if self._node_ids:
            self._thread = threading.Thread(target=self._watch, name="dapo-node-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
            except Exception:  # noqa: BLE001 - the cluster's table unreadable for a moment: ask again
                continue
            lost = [node_id for node_id in self._node_ids if node_id not in alive]
            if lost:
                self.lost = lost
                self._on_lost(lost)
                return


__all__ = ["LOST_NODE_WAIT_S", "NodeState", "NodeWatch", "node_states", "raylet_answers"]
