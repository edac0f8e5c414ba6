"""Torch threads and the OpenMP wait policy of the processes a run starts, for cores they share.

Asynchronous rollouts (``max_staleness >= 1``) put a generating env runner and the learner in two
processes on one machine. Each torch process runs an OpenMP pool; under GNU OpenMP's default wait
policy a pool's threads spin for a while after each parallel region before they sleep, so two pools
on too few cores spend each other's cores spinning (``benchmarks/shared_cores.py``). So:

- each actor runs as many torch threads as the CPUs Ray gives it (:func:`use_process_threads`):
  Ray only sets ``OMP_NUM_THREADS`` when the worker's environment has none, so an
  ``OMP_NUM_THREADS=8`` exported in the user's shell would otherwise reach every actor;
- the processes of a local Ray instance start with ``OMP_WAIT_POLICY=PASSIVE`` (:data:`SHARED_CORES_ENV`,
  set by ``dapo_rl.jobs.cluster.connect``; a value the user set is kept): a waiting thread sleeps at
  once instead of spinning on a core another process needs. The policy is read when the OpenMP
  runtime loads, so it must be in a process's environment before it starts; a cluster started with
  ``ray start`` takes it from that command's environment.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: The environment of processes that share cores (read by the OpenMP runtime at process start).
SHARED_CORES_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def process_threads(cpus: Any) -> int:
    """Torch threads for a process holding ``cpus`` (RLlib's "auto" or None: 1; a fraction: 1)."""
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or math.isnan(cpus):
        return 1
    return max(1, math.floor(cpus))


def use_process_threads(cpus: Any) -> int:
    """Run torch's intra-op pool with :func:`process_threads` threads in this process; returns them."""
    threads = process_threads(cpus)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


__all__ = ["SHARED_CORES_ENV", "process_threads", "use_process_threads"]
