"""The learners' weights on their way to the env runners and their engines.

Three routes, by where the weights are and where they go:

- unsharded learners -> runners: RLlib's own ``EnvRunnerGroup.sync_weights`` (the RLModule's state);
- sharded learners (FSDP2) -> runners: every learner takes part in gathering the full weights, rank 0
  hands them back, and they go to each runner by value through the object store;
- learner rank 0 -> vLLM engines on GPUs: an NCCL broadcast (``dapo_rl.rollout.engine_sync``). CPU
  engines (vLLM's CPU build) take theirs by value, through the runner, like the hf backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from dapo_rl.models.distributed import learners_are_sharded
from dapo_rl.rllib.env_runner import vllm_engine_device
from dapo_rl.rollout.engine_sync import EngineWeightSync


class WeightSync:
    """Weights from ``learner_group`` to the runners of ``env_runner_group``, by the route the config implies."""

    def __init__(self, config: Any, learner_group: Any, env_runner_group: Any) -> None:
        self._config = config
        self._learners = learner_group
        self._runners = env_runner_group
        self._engine_sync = EngineWeightSync(config.vllm_tensor_parallel_size, config.vllm_dtype)
        self.sharded_learners = learners_are_sharded(config.data_parallel, config.num_learners)
        #: vLLM engines on GPUs take their weights over NCCL from learner rank 0.
        self.engines_over_nccl = config.generation_backend == "vllm" and vllm_engine_device(config) == "cuda"

    def to_runners(self) -> None:
        """Send the learners' current weights to every env runner (and the local one), waiting for them."""
        if self.engines_over_nccl:
            self.to_engines()
            return
        if not self.sharded_learners:
            self._runners.sync_weights(from_worker_or_learner_group=self._learners, inference_only=True)
            return
        state_ref = ray.put(self.gathered_learner_state())
        self._runners.foreach_env_runner(
            lambda runner, ref=state_ref: runner.set_state(ray.get(ref)), local_env_runner=True
        )

    def to_restored_runners(self, runner_ids: list[int]) -> None:
        """A restarted CPU vLLM engine starts from the model folder, and RLlib's restore copies nothing
        (the local runner holds no weights with vLLM): send the learners' before it samples."""
        state_ref = self.learner_weights_ref()
        self._runners.foreach_env_runner(
            lambda runner, ref=state_ref: runner.set_state({**ray.get(ref), WEIGHTS_SEQ_NO: 0}),
            remote_worker_ids=list(runner_ids),
            local_env_runner=False,
        )

    def to_engines(self) -> None:
        """Broadcast the weights from learner rank 0 to every vLLM engine over NCCL (unverified: needs GPUs)."""
        runner_ids = self._runners.healthy_env_runner_ids()

        def on_runners(calls: Any) -> None:
            self._runners.foreach_env_runner(calls, remote_worker_ids=runner_ids, local_env_runner=False)

        self._engine_sync.sync(self.on_all_learners, on_runners, len(runner_ids))

    def learner_weights_ref(self) -> Any:
        """The learners' current weights (RLlib's weight state of the RLModule) in the object store."""
        if self.sharded_learners:
            return ray.put(self.gathered_learner_state())
        return ray.put(
            self._learners.get_state(components=COMPONENT_LEARNER + "/" + COMPONENT_RL_MODULE, inference_only=True)[
                COMPONENT_LEARNER
            ]
        )

    def gathered_learner_state(self) -> dict[str, Any]:
        """The full learner state gathered from sharded learners (every learner takes part; rank 0's)."""
        results = self.on_all_learners(lambda learner: learner.gather_weights())
        return next(state for rank, state in results if rank == 0)

    def on_all_learners(self, function: Callable[[Any], Any]) -> list[Any]:
        """Call ``function(learner)`` on every learner and return the results; re-raise any error.

        For collectives: a learner marked unhealthy must not be skipped (the others would wait for
        it forever), and an error must not pass silently.
        """
        results = []
        for result in self._learners.foreach_learner(function, healthy_only=False):
            if not result.ok:  # get() hands back the error rather than raising it
                raise result.get()
            results.append(result.get())
        return results
