"""Shared fixtures. ``ray_session``: one local Ray instance for every RLlib-level test of a run.

Ray and RLlib are imported lazily, inside the fixture, so the Ray-free test files never pay for them.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest

# RLlib on Ray 2.60 asks for a token unless auth is off; set it before any Ray import.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    """``ray.init`` once per test session (4 logical CPUs: room for 2 learners or a Tune trial on a
    2-core box), with Ray's temp folder and RLlib's default results folder in a temp dir.

    Yields a dict with ``address`` (the GCS address, for subprocesses to join) and ``tmp`` (the
    temp root). Torch runs single-threaded in the driver meanwhile (the models are tiny; Ray's
    workers get OMP_NUM_THREADS from their CPU share, 1 here).
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    import ray.tune.trainable.trainable as trainable_module
    import torch

    root = tempfile.mkdtemp(prefix="dapo_ray_")
    results = os.path.join(root, "ray_results")
    os.makedirs(results)
    # An Algorithm built outside Tune writes under DEFAULT_STORAGE_PATH (~/ray_results by default).
    old_storage = trainable_module.DEFAULT_STORAGE_PATH
    trainable_module.DEFAULT_STORAGE_PATH = results
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            _temp_dir=os.path.join(root, "ray"),
            log_to_driver=False,
        )
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "tmp": root, "results": results}
    finally:
        if started:
            ray.shutdown()
        trainable_module.DEFAULT_STORAGE_PATH = old_storage
        torch.set_num_threads(old_threads)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def free_port() -> int:
    """A TCP port free on this machine now, for one torch.distributed rendezvous between test processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
