"""The driver's side of streaming weights from learner rank 0 to vLLM engines over NCCL.

The order matters, because every step below blocks until its peers join: each env runner *starts*
its part in a thread and returns; then the learners do theirs (rank 0 sends); then the driver waits
for the runners to finish. The NCCL group (learner rank 0 plus every engine worker) is formed once,
at the first sync. No Ray import: the driver hands in how to call every learner and every runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: ``on_learners(fn)``: call ``fn(learner)`` on every learner, return the results in rank order of
#: the learner group (each learner's result carries its rank where that matters).
OnLearners = Callable[[Callable[[Any], Any]], list[Any]]
#: ``on_runners(fn or [fn per runner])``: call on every remote env runner and wait.
OnRunners = Callable[[Any], Any]


class EngineWeightSync:
    """Forms the learner-to-engines broadcast group once, then sends the weights at each call.

    Args:
        tensor_parallel_size: GPUs (NCCL ranks) of each engine.
        dtype_name: the engines' weight dtype (``vllm_dtype``); learners cast to it as they send.
    """

    def __init__(self, tensor_parallel_size: int, dtype_name: str) -> None:
        self.tensor_parallel_size = tensor_parallel_size
        self.dtype_name = dtype_name
        self.group_formed = False

    def sync(self, on_learners: OnLearners, on_runners: OnRunners, num_runners: int) -> None:
        if not self.group_formed:
            self._form_group(on_learners, on_runners, num_runners)
        # The same on every learner (full shapes even when sharded).
        metadata = on_learners(lambda learner, d=self.dtype_name: learner.engine_weight_metadata(d))[0]
        on_runners(lambda runner, m=metadata: runner.begin_receive_weights(m))
        on_learners(lambda learner, m=metadata: learner.broadcast_weights_to_engines(m))
        on_runners(lambda runner: runner.finish_weight_transfer())

    def _form_group(self, on_learners: OnLearners, on_runners: OnRunners, num_runners: int) -> None:
        address, port = _from_rank0(on_learners(lambda learner: learner.engine_sync_address()))
        world_size = 1 + num_runners * self.tensor_parallel_size
        on_runners(
            [
                lambda runner, offset=1 + k * self.tensor_parallel_size: runner.begin_weight_sync_group(
                    address, port, offset, world_size
                )
                for k in range(num_runners)
            ]
        )
        on_learners(lambda learner: learner.init_engine_weight_sync(address, port, world_size))
        on_runners(lambda runner: runner.finish_weight_transfer())
        self.group_formed = True


def _from_rank0(results: Sequence[tuple[int, Any]]) -> Any:
    return next(value for rank, value in results if rank == 0)


__all__ = ["EngineWeightSync"]
