"""The verifier process pool: killable worker processes that score items under a hard time limit each.

A training step verifies thousands of responses, and symbolic checkers (sympy through math-verify) can
hang on adversarial input in C code that no signal interrupts: ``9^{9^{9^9}}`` never returns. So
verifiers that are not bounded by construction run here, in a pool of worker processes:

- each worker holds at most one item at a time, and the item's clock starts when it is sent;
- an item still running after its time limit gets its worker killed (SIGKILL) and replaced, and is
  scored wrong with a ``reason`` saying so; a worker that dies (crash, out of memory) is replaced the
  same way, and only its own item is lost;
- a verifier function is sent to each worker once (cloudpickle, so lambdas and functions defined in
  ``__main__`` work) and warmed up there before the worker takes items, so imports never eat the limit.

Workers are fresh interpreters (``subprocess``, with the parent's ``sys.path``), never ``fork``ed copies:
the parent may run threads (torch, Ray) that ``fork`` would copy in a broken state, and unlike
multiprocessing's ``spawn`` they do not re-import the parent's ``__main__``, so scripts without an
``if __name__ == "__main__"`` guard work. On Linux a worker is killed when its parent dies. The pool has
``DAPO_ENVS_VERIFIER_WORKERS`` workers (default: the CPU count, at most 8), is created on first use, is
one per process, and is shut down at exit (or with :func:`shutdown`).

Usage: ``dapo_envs.get_verifier(name).score(responses, references)`` routes isolated verifiers here
(:meth:`dapo_envs.verifiers.Verifier.score` calls :func:`get_pool`). This module does not import the
registry: it needs only the verdict type (:mod:`dapo_envs.verifiers.result`) and what
:class:`PooledVerifier` describes, so the dependencies go one way, registry -> pool.
"""

from __future__ import annotations

import atexit
import collections
import json
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dapo_envs.verifiers.result import VerifierResult, as_text, run_verifier_fn, verifier_failure

__all__ = ["PooledVerifier", "VerifierPool", "default_num_workers", "get_pool", "shutdown"]


class PooledVerifier(Protocol):
    """What the pool needs of a verifier; a :class:`dapo_envs.verifiers.Verifier` has it."""

    @property
    def name(self) -> str:
        """Names the verifier in ``reason`` strings and errors."""

    @property
    def fn(self) -> Callable[[str, str], Any]:
        """``fn(response, reference)``, run in the workers; must pickle with cloudpickle."""

    @property
    def warmup(self) -> Callable[[], None] | None:
        """Run once in each worker before its first item of this verifier."""

    @property
    def token(self) -> int:
        """Identifies ``fn`` in the workers' caches: the same token must always mean the same ``fn``."""


#: Longest a worker may take to start, or to load and warm up a verifier, before it counts as broken.
STARTUP_TIMEOUT_S = 120.0
# Predictions travel back through a pipe; a megabyte-long "answer" is never useful, so cap it.
_MAX_PRED_CHARS = 10_000


def default_num_workers() -> int:
    configured = os.environ.get("DAPO_ENVS_VERIFIER_WORKERS")
    if configured:
        try:
            value = int(configured)
        except ValueError:
            raise ValueError(f"DAPO_ENVS_VERIFIER_WORKERS must be an integer, got {configured!r}") from None
        if value < 1:
            raise ValueError(f"DAPO_ENVS_VERIFIER_WORKERS must be >= 1, got {value}")
        return value
    return max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------
# Worker side.
# ---------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent goes, so a hung item cannot outlive the run."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    import cloudpickle

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    functions: dict[int, tuple[str, Any]] = {}
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or exited
        kind = message[0]
        if kind == "load":
            _, token, name, payload = message
            try:
                fn, warmup = cloudpickle.loads(payload)
                if warmup is not None:
                    warmup()
            except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
                conn.send(("load_failed", token, f"{type(error).__name__}: {error}"))
                continue
            functions[token] = (name, fn)
            conn.send(("loaded", token))
        elif kind == "score":
            _, token, index, response, reference = message
            name, fn = functions[token]
            result = run_verifier_fn(fn, name, response, reference)
            pred = result.pred if len(result.pred) <= _MAX_PRED_CHARS else result.pred[:_MAX_PRED_CHARS] + "..."
            conn.send(
                (
                    "result",
                    index,
                    float(result.score),
                    bool(result.acc),
                    str(pred),
                    str(result.reason),
                    bool(result.failed),
                )
            )
        elif kind == "stop":
            return


# ---------------------------------------------------------------------------------------------------
# Parent side.
# ---------------------------------------------------------------------------------------------------

_STARTING, _IDLE, _LOADING, _BUSY = "starting", "idle", "loading", "busy"


class _Worker:
    """One worker: a fresh interpreter running :func:`_worker_entry`, talking over a socket pair.

    A plain subprocess rather than ``multiprocessing.Process``: spawn and forkserver re-import the
    parent's ``__main__``, which breaks every script without an ``if __name__ == "__main__"`` guard, and
    fork is unsafe with threads in the parent.
    """

    def __init__(self) -> None:
        parent_socket, child_socket = socket.socketpair()
        with child_socket:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOTSTRAP, str(child_socket.fileno()), json.dumps(sys.path)],
                pass_fds=(child_socket.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self.conn = multiprocessing.connection.Connection(parent_socket.detach())
        self.state = _STARTING
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S
        self.item: int | None = None
        self.loaded: set[int] = set()

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        self.conn.close()
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # still there 5 s after SIGKILL (uninterruptible I/O): the OS reaps it later


# The worker's whole command line: the parent's import path first (so editable installs and the user's
# own modules import), then the loop.
_WORKER_BOOTSTRAP = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[2]); "
    "from dapo_envs.verifier_pool import _worker_entry; _worker_entry(int(sys.argv[1]))"
)


def _worker_entry(fd: int) -> None:
    _worker_main(multiprocessing.connection.Connection(fd))


class VerifierPool:
    """A pool of verifier worker processes; :meth:`map` scores a batch with per-item time limits."""

    def __init__(self, num_workers: int | None = None) -> None:
        self.num_workers = num_workers or default_num_workers()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def map(self, verifier: PooledVerifier, pairs: Sequence[tuple[str, str]], timeout: float) -> list[VerifierResult]:
        """Score ``(response, reference)`` pairs with ``verifier``, each under ``timeout`` seconds.

        Returns one result per pair, in input order. An item over ``timeout`` or whose worker died is
        scored wrong with the ``reason``. Raises RuntimeError when workers cannot start or load the
        verifier, and TypeError when the verifier cannot be pickled.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        pairs = [(as_text(r, "response"), as_text(g, "reference")) for r, g in pairs]
        if not pairs:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError("this VerifierPool was shut down")
            while len(self._workers) < self.num_workers:
                self._workers.append(_Worker())
            try:
                return self._run(verifier, pairs, timeout)
            except BaseException:
                # Interrupted or failed mid-batch: workers may hold items whose answers would arrive
                # later and be mistaken for the next batch's. Start over with fresh workers.
                self._kill_all()
                raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for worker in self._workers:
                try:
                    worker.conn.send(("stop",))
                except OSError:
                    pass
            self._kill_all()

    def _kill_all(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker()

    def _run(self, verifier: PooledVerifier, pairs: list[tuple[str, str]], timeout: float) -> list[VerifierResult]:
        results: list[VerifierResult | None] = [None] * len(pairs)
        todo = collections.deque(range(len(pairs)))
        payload: bytes | None = None
        name = verifier.name

        def send(worker: _Worker, message: tuple[Any, ...]) -> bool:
            try:
                worker.conn.send(message)
                return True
            except OSError:  # the worker died while idle: give its item back and replace it
                if worker.item is not None:
                    todo.appendleft(worker.item)
                    worker.item = None
                self._replace(worker)
                return False

        def send_item(worker: _Worker, index: int) -> None:
            response, reference = pairs[index]
            worker.state, worker.item, worker.deadline = _BUSY, index, time.monotonic() + timeout
            send(worker, ("score", verifier.token, index, response, reference))

        while todo or any(w.item is not None for w in self._workers):
            for worker in list(self._workers):
                if worker.state != _IDLE or not todo:
                    continue
                index = todo.popleft()
                if verifier.token in worker.loaded:
                    send_item(worker, index)
                    continue
                if payload is None:
                    payload = _pickle_verifier(verifier)
                worker.state, worker.item = _LOADING, index
                worker.deadline = time.monotonic() + STARTUP_TIMEOUT_S
                send(worker, ("load", verifier.token, name, payload))

            waiting = {w.conn: w for w in self._workers if w.state != _IDLE}
            if not waiting:
                continue
            soonest = min(w.deadline for w in waiting.values())
            ready = multiprocessing.connection.wait(list(waiting), timeout=max(0.0, soonest - time.monotonic()))
            for ready_conn in ready:
                worker = waiting[ready_conn]  # type: ignore[index]  # wait() returns the connections it was given
                try:
                    message: Any = worker.conn.recv()
                except (EOFError, OSError):
                    try:
                        exitcode = worker.process.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        exitcode = None
                    if worker.state != _BUSY:
                        # Dying at start-up or while loading the verifier would repeat on every worker.
                        what = "starting" if worker.state == _STARTING else f"loading verifier '{name}'"
                        self._replace(worker)
                        raise RuntimeError(
                            f"a verifier worker process died while {what} (exit code {exitcode})"
                        ) from None
                    assert worker.item is not None  # a busy worker holds its item
                    results[worker.item] = verifier_failure(
                        f"verifier '{name}' worker process died (exit code {exitcode})"
                    )
                    self._replace(worker)
                    continue
                kind = message[0]
                if kind == "ready":
                    worker.state = _IDLE
                elif kind == "loaded":
                    worker.loaded.add(message[1])
                    assert worker.item is not None  # a loading worker holds the item it loads for
                    send_item(worker, worker.item)
                elif kind == "load_failed":
                    raise RuntimeError(
                        f"verifier '{name}' could not be loaded in a worker process: {message[2]}. Verifiers that "
                        "cannot be pickled must be registered with isolate=False."
                    )
                elif kind == "result":
                    _, index, score_value, acc, pred, reason, failed = message
                    results[index] = VerifierResult(score_value, acc, pred, reason, failed)
                    worker.state, worker.item = _IDLE, None

            now = time.monotonic()
            for worker in list(self._workers):
                if worker.state == _IDLE or now < worker.deadline:
                    continue
                if worker.state == _BUSY:
                    assert worker.item is not None
                    results[worker.item] = verifier_failure(
                        f"timeout: verifier '{name}' took longer than {timeout:g} s"
                    )
                    self._replace(worker)
                else:
                    what = "start" if worker.state == _STARTING else f"load verifier '{name}'"
                    self._replace(worker)
                    raise RuntimeError(f"a verifier worker process did not {what} within {STARTUP_TIMEOUT_S:g} s")
        return results  # type: ignore[return-value]


def _pickle_verifier(verifier: PooledVerifier) -> bytes:
    import cloudpickle

    try:
        payload: bytes = cloudpickle.dumps((verifier.fn, verifier.warmup))
        return payload
    except Exception as error:  # noqa: BLE001 - any pickling failure means the same thing here
        raise TypeError(
            f"verifier '{verifier.name}' cannot be sent to a worker process ({type(error).__name__}: {error}); "
            "register it with isolate=False to run it in-process"
        ) from error


_POOL: VerifierPool | None = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> VerifierPool:
    """The process-wide pool, created on first use (and again in a forked child)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or os.getpid() != _POOL_PID:
            _POOL, _POOL_PID = VerifierPool(), os.getpid()
        return _POOL


def shutdown() -> None:
    """Stop the process-wide pool's workers (a later call starts a new pool)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and os.getpid() == _POOL_PID:
        pool.close()


atexit.register(shutdown)
