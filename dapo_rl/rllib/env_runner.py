"""DAPOEnvRunner: RLlib's env runner for reasoning environments, generating whole responses in batches.

RLlib's default runner steps an environment one action at a time; for an LLM that would mean one
token per step. This runner instead takes a batch of problems, generates G responses per problem
in one batched call of its generation backend, and scores them with the environment's vectorised
verifier (:class:`dapo_rl.rollout.runner.GenerationRunner` does the work; this class adds RLlib's
plumbing: module construction, weight sync, metrics, checkpoint state).

Backends (``generation_backend``):

- ``"hf"``: Hugging Face ``generate`` on an inference copy of the RLModule, on the GPU when this
  process sees one (a remote runner with ``num_gpus_per_env_runner > 0``, or the driver's local
  runner on a GPU machine), else on the CPU; ``generation_device`` overrides. Weights arrive
  through RLlib's weight sync.
- ``"vllm"``: a ``vllm.LLM`` engine and no RLModule. On GPUs (``num_gpus_per_env_runner > 0``)
  weights arrive over NCCL from learner rank 0 (``begin_*`` / ``finish_weight_transfer``, driven
  by ``DAPO.sync_runner_weights``); on CPU (vLLM's CPU build, ``num_gpus_per_env_runner=0``) by
  value, through RLlib's weight sync like the hf backend's (``set_state`` -> ``load_weights``).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import gymnasium as gym
import ray
from gymnasium.envs.registration import load_env_creator
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.env import INPUT_ENV_SPACES
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, WEIGHTS_SEQ_NO

import dapo_envs  # registers the dapo/ environment ids in this worker process
import dapo_envs.verifier_pool
from dapo_rl.models.loading import load_tokenizer
from dapo_rl.rllib.module import TEXT_SPACE
from dapo_rl.rllib.threads import use_process_threads
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend, generation_device
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.rollout.vllm_backend import VLLMEngineSettings, VLLMGenerationBackend, engine_model_folder
from dapo_rl.rollout.vllm_transfer import weight_transfer_api_available
from dapo_rl.rollout.weight_sync import WeightMetadata

#: The ``gymnasium.register`` fields a registration carries to other processes.
_REGISTRATION_FIELDS = (
    "entry_point",
    "kwargs",
    "max_episode_steps",
    "reward_threshold",
    "nondeterministic",
    "order_enforce",
    "disable_env_checker",
)


def env_registration(env_id: Any) -> dict[str, Any] | None:
    """How ``env_id`` was registered in this process (``register_reasoning_env``, ``gymnasium.register``),
    for another process to register it the same way; None for the ids ``dapo_envs`` registers on import
    and for ids not registered here.

    Tune's trial and the remote env runners are other processes, where an id registered in the
    driver's script does not exist: the config carries this (the entry point pickled with it, a class
    defined in ``__main__`` included) and :func:`make_reasoning_env` registers it there.
    """
    if not isinstance(env_id, str) or env_id not in gym.registry or env_id in dapo_envs.ENV_IDS:
        return None
    spec = gym.registry[env_id]
    return {"id": env_id, **{name: getattr(spec, name) for name in _REGISTRATION_FIELDS}}


def unknown_env_config_keys(
    env_id: str, env_config: dict[str, Any], registration: dict[str, Any] | None = None
) -> str | None:
    """What is wrong with ``env_config``'s keys for ``env_id`` (None when nothing, or when the
    environment takes any keyword): a key its creator does not take, named with the ones it takes."""
    if env_id in gym.registry:
        entry_point = gym.spec(env_id).entry_point
    elif registration and registration.get("id") == env_id:
        entry_point = registration["entry_point"]
    else:
        return None  # an unknown id is refused elsewhere, naming it
    creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    try:
        parameters = inspect.signature(creator).parameters
    except (TypeError, ValueError):  # a creator whose signature cannot be read: gym.make will tell
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return None
    unknown = sorted(set(env_config) - set(parameters))
    if unknown:
        return f"unknown env_config key(s) {unknown} for {env_id}; it takes: {', '.join(parameters)}"
    return None


def vllm_engine_device(config: Any) -> str:
    """Where a vLLM env runner's engine runs: on its GPUs, or on the CPU (vLLM's CPU build) when
    the runners are given none (``num_gpus_per_env_runner=0``)."""
    return "cuda" if (config.num_gpus_per_env_runner or 0) > 0 else "cpu"


def make_reasoning_env(config: Any) -> Any:
    """The (unwrapped) reasoning environment a config names, with its ``env_config`` keywords."""
    if not isinstance(config.env, str):
        raise ValueError(
            f"env must be a registered Gymnasium id string (e.g. 'dapo/Arithmetic-v0'), got {config.env!r}"
        )
    registration = getattr(config, "env_registration", None)
    if config.env not in gym.registry and registration and registration["id"] == config.env:
        gym.register(**registration)
    return gym.make(config.env, **dict(config.env_config or {})).unwrapped


class DAPOEnvRunner(EnvRunner, Checkpointable):
    """Holds an inference copy of the policy, a generation backend and the environment."""

    def __init__(self, *, config: Any, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        self._weights_seq_no = 0
        # Rollout steps' worth of updates in the weights held (asynchronous rollouts tag each round
        # with it); set by receive_policy. A runner restarted after a failure starts at -1: its
        # rounds count as too old until the algorithm has sent it weights with their version.
        self._policy_version = 0 if self.worker_index == 0 or not self.config.is_async else -1
        if (self.worker_index or 0) > 0:  # None: built outside an EnvRunnerGroup (tests, tools)
            # A remote runner's process is its own: as many torch threads as the CPUs it holds.
            use_process_threads(self.config.num_cpus_per_env_runner)
        self.env = make_reasoning_env(self.config)
        self._transfer: tuple[threading.Thread, list[BaseException], bool] | None = None
        self._joined_weight_sync = False
        config = self.config
        if config.generation_backend == "vllm":
            self.module = None
            tokenizer = load_tokenizer(config.policy_model)
            # The driver's local runner (worker index 0) never generates with remote runners
            # around (validate() requires them), so it holds no engine and no GPU.
            backend = self._vllm_engine(tokenizer) if self.worker_index else None
        else:
            self.module = config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True).build()
            self.module.to(generation_device(config.generation_device))
            tokenizer = self.module.tokenizer
            backend = HFGenerationBackend(
                self.module.causal_lm,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_ids=[tokenizer.eos_token_id],
                prompts_per_call=config.generation_prompts_per_call,
                share_prompt_prefill=config.share_prompt_forward,
            )
        self.backend = backend
        self.generation = GenerationRunner(
            self.env,
            tokenizer,
            backend,
            PromptSettings(
                self.config.max_prompt_length, self.config.apply_chat_template, self.config.prompt_truncation
            ),
        )

    def _vllm_engine(self, tokenizer: Any) -> VLLMGenerationBackend:
        config = self.config
        model_config = dict(config.model_config or {})
        return VLLMGenerationBackend(
            VLLMEngineSettings(
                model=engine_model_folder(
                    config.policy_model,
                    seed=int(model_config.get("init_seed", 0)),
                    tiny_spec=model_config.get("tiny_spec"),
                ),
                device=vllm_engine_device(config),
                weight_transfer_api=vllm_engine_device(config) == "cuda" and weight_transfer_api_available(),
                tensor_parallel_size=config.vllm_tensor_parallel_size,
                dtype=config.vllm_dtype,
                gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                max_model_len=config.max_prompt_length + config.max_response_length,
                enable_sleep_mode=config.vllm_sleep,
                enforce_eager=config.vllm_enforce_eager,
                seed=int(config.seed or 0) + self.worker_index,
                logprobs_mode="processed_logprobs" if config.needs_generator_logprobs else None,
            ),
            eos_token_ids=[tokenizer.eos_token_id],
        )

    # -- the work ------------------------------------------------------------------------------------

    def sampling_settings(self) -> SamplingSettings:
        config = self.config
        return SamplingSettings(
            n=config.group_size,
            max_new_tokens=config.max_response_length,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            # The behaviour policy's log-probs, for the off-policy correction of asynchronous rollouts.
            logprobs=config.needs_generator_logprobs,
        )

    def sample_groups(self, problems: list[Any], seed: int) -> dict[str, Any]:
        """G scored responses for each problem (see ``GenerationRunner.sample`` for the columns)."""
        if self.backend is None:
            raise RuntimeError(
                "this is the driver's local env runner, which holds no vLLM engine: "
                "with generation_backend='vllm' the remote env runners generate"
            )
        rollout = self.generation.sample(problems, self.sampling_settings(), seed=seed)
        num_responses = len(rollout["acc"])
        rollout["weights_seq_no"] = self._weights_seq_no
        rollout["policy_version"] = self._policy_version
        self.num_env_steps_sampled_lifetime += num_responses
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, num_responses, reduce="lifetime_sum")
        return rollout

    def sample(
        self, *, problems: list[Any] | None = None, seed: int | None = None, **rllib_kwargs: Any
    ) -> dict[str, Any]:
        """RLlib's entry point, as :meth:`sample_groups` (DAPO's training step calls that directly).

        RLlib's own sampling arguments (``num_timesteps``, ``num_episodes``, ``explore``, ...) count
        environment steps, which mean nothing for whole-response generation: they are refused by name.
        """
        if rllib_kwargs or problems is None or seed is None:
            raise TypeError(
                "DAPOEnvRunner.sample takes problems= (a list of Problem) and seed= (an int); got "
                f"problems={'set' if problems is not None else None}, seed={seed!r}"
                + (f" and unsupported arguments {sorted(rllib_kwargs)}" if rllib_kwargs else "")
            )
        return self.sample_groups(problems, seed)

    def receive_policy(self, state: Any, version: int) -> None:
        """Take the learners' weights (None: they arrived otherwise, e.g. over NCCL to a vLLM engine)
        and the policy version they are (asynchronous rollouts)."""
        if state is not None:
            self.set_state(
                {**ray.get(state), WEIGHTS_SEQ_NO: 0}
                if isinstance(state, ray.ObjectRef)
                else {**state, WEIGHTS_SEQ_NO: 0}
            )
        self._policy_version = int(version)

    # -- weight transfer to a vLLM engine: started here, completed while the learners send --------

    def begin_weight_sync_group(self, address: str, port: int, rank_offset: int, world_size: int) -> None:
        """Start joining learner rank 0's broadcast group (returns at once; see finish_weight_transfer)."""
        self._begin_transfer(self.backend.init_weight_sync, address, port, rank_offset, world_size, new_weights=False)

    def begin_receive_weights(self, metadata: list[WeightMetadata]) -> None:
        """Start receiving the weights learner rank 0 is about to broadcast (returns at once)."""
        if not self._joined_weight_sync:
            # Raised before the learners send, so nobody waits on a member that is not there.
            raise RuntimeError(
                f"env runner {self.worker_index} is not in the weight-sync group (restarted after a failure?): "
                "the group is formed once; restart the trial from its last checkpoint"
            )
        self._begin_transfer(self.backend.receive_weights, metadata, new_weights=True)

    def finish_weight_transfer(self, timeout_seconds: float = 1800.0) -> None:
        """Wait for the transfer begun last; re-raise its error here."""
        if self._transfer is None:
            raise RuntimeError("finish_weight_transfer without a transfer begun")
        (thread, errors, new_weights), self._transfer = self._transfer, None
        thread.join(timeout_seconds)
        if thread.is_alive():
            raise TimeoutError(f"weight transfer to the vLLM engine did not finish within {timeout_seconds} s")
        if errors:
            raise errors[0]
        if new_weights:
            self._weights_seq_no += 1
        else:
            self._joined_weight_sync = True

    def _begin_transfer(self, function: Any, *args: Any, new_weights: bool) -> None:
        # A thread, because the receive blocks until the learners send, and the driver can only
        # ask the learners to send once this call has returned.
        if self._transfer is not None:
            raise RuntimeError("a weight transfer is already under way")
        errors: list[BaseException] = []

        def run() -> None:
            try:
                function(*args)
            except BaseException as error:  # noqa: BLE001 - re-raised in finish_weight_transfer
                errors.append(error)

        thread = threading.Thread(target=run, name="dapo-weight-transfer", daemon=True)
        thread.start()
        self._transfer = (thread, errors, new_weights)

    # -- EnvRunner API -------------------------------------------------------------------------------

    def get_spaces(self) -> dict[str, Any]:
        return {INPUT_ENV_SPACES: (TEXT_SPACE, TEXT_SPACE), DEFAULT_MODULE_ID: (TEXT_SPACE, TEXT_SPACE)}

    def assert_healthy(self) -> None:
        assert self.env is not None, "DAPOEnvRunner has no environment"

    def get_metrics(self) -> Any:
        return self.metrics.reduce()

    def stop(self) -> None:
        # Verifier worker processes (math_verify, user verifiers); a later score() starts new ones.
        dapo_envs.verifier_pool.shutdown()
        if isinstance(self.backend, VLLMGenerationBackend):
            self.backend.shutdown()  # the engine's processes, now rather than at interpreter exit

    # -- Checkpointable API --------------------------------------------------------------------------

    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        state: dict[str, Any] = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime}
        # A vLLM runner holds no RLModule: its engine's weights are the learners', sent over NCCL.
        if self.module is not None and self._check_component(COMPONENT_RL_MODULE, components, not_components):
            state[COMPONENT_RL_MODULE] = {DEFAULT_MODULE_ID: self.module.get_state(**kwargs)}
            state[WEIGHTS_SEQ_NO] = self._weights_seq_no
        return state

    def _take_weights(self, state: dict[str, Any], load: Any) -> None:
        """Load the RLModule weights of ``state`` with ``load`` unless they are older than the ones
        held: RLlib's SingleAgentEnvRunner protocol, where seq_no 0 forces the update."""
        weights_seq_no = state.get(WEIGHTS_SEQ_NO, 0)
        if weights_seq_no == 0 or self._weights_seq_no < weights_seq_no:
            module_state = state[COMPONENT_RL_MODULE]
            if isinstance(module_state, ray.ObjectRef):
                module_state = ray.get(module_state)
            if isinstance(module_state, dict) and DEFAULT_MODULE_ID in module_state:
                module_state = module_state[DEFAULT_MODULE_ID]
            load(module_state)
        if weights_seq_no > 0:
            self._weights_seq_no = weights_seq_no

    def set_state(self, state: dict[str, Any]) -> None:
        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        if COMPONENT_RL_MODULE in state and self.module is not None:
            self._take_weights(state, self.module.set_state)
        elif COMPONENT_RL_MODULE in state and self.backend is not None:
            # A CPU vLLM engine takes the learners' weights by value (GPU engines get them over NCCL).
            self._take_weights(state, self.backend.load_weights)
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict[str, Any]]:
        return (), {"config": self.config}

    def get_checkpointable_components(self) -> list:
        return []


__all__ = ["DAPOEnvRunner", "env_registration", "make_reasoning_env", "vllm_engine_device"]
