"""DAPO (arXiv 2503.14476) as an RLlib algorithm: ``DAPOConfig`` (settings, validate) and ``DAPO`` (training_step).

One ``train()`` call is one rollout step of the paper:

1. generate: G responses for each prompt, scored by the environment's verifier; with dynamic
   sampling, rounds of ``generation_batch_prompts`` prompts until ``prompts_per_step`` prompts with
   both correct and wrong answers are held;
2. shape: soft overlong punishment added to the correctness reward; overlong filtering masks
   truncated responses out of the loss;
3. old log-probs recomputed by the learners under the weights that generated the responses;
4. group-normalised advantages;
5. ``num_epochs`` × (``prompts_per_step`` / ``minibatch_prompts``) gradient updates, each one
   ``learner_group.update`` on a mini-batch of whole groups, with the mini-batch's global loss
   normaliser (token-level loss exact under any sharding);
6. weight sync to the env runners; metrics through RLlib's MetricsLogger.

With ``max_staleness >= 1`` (asynchronous rollouts, :mod:`dapo_rl.async_rollouts`) step 1 takes its
rounds from those the remote env runners generated while the previous step's update ran, step 3
adds the truncated behaviour importance weights of the responses older weights generated, and step 6
sends the weights without waiting for the runners.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    TIMERS,
    WEIGHTS_SEQ_NO,
)

from dapo_rl.async_rollouts import RolloutStream, merge_shares
from dapo_rl.checkpoints import write_checkpoint_manifest, write_policy_module_config
from dapo_rl.core import shaped_rewards
from dapo_rl.core.off_policy import behaviour_importance_weights
from dapo_rl.distributed import (
    SHARDED_STATE_FOLDER,
    SHARDED_STATE_POINTER,
    finish_sharded_checkpoint,
    learners_are_sharded,
    sharded_state_folder,
    sharded_state_target,
)
from dapo_rl.env_runner import (
    DAPOEnvRunner,
    env_registration,
    make_reasoning_env,
    unknown_env_config_keys,
    vllm_engine_device,
)
from dapo_rl.learner import NONFINITE_UPDATE_SKIPPED, DAPOTorchLearner
from dapo_rl.models import load_tokenizer, save_policy
from dapo_rl.module import TEXT_SPACE, CausalLMModule, model_context_length
from dapo_rl.presets import list_presets
from dapo_rl.prompt_sampler import PromptSampler
from dapo_rl.rollout.engine_sync import EngineWeightSync
from dapo_rl.rollout.vllm_backend import CPU_DISTRIBUTION, INSTALL_HINT, vllm_available, vllm_cpu_build
from dapo_rl.settings import (
    DAPO_SETTINGS,
    GENERATION_ROUND_FACTOR,
    MODEL_CONFIG_KEYS,
    MODULE_KEYS_FROM_SETTINGS,
    SETTINGS,
    setting_problems,
)
from dapo_rl.training import (
    build_train_batch,
    collect_groups,
    minibatch_indices,
    minibatch_with_loss_normalizer,
    training_signal_warnings,
)

logger = logging.getLogger(__name__)

#: Longest a round waits for an env runner to come back when every remote runner has failed.
ENV_RUNNER_RECOVERY_S = 300.0


class LearnerFailedError(RuntimeError):
    """A learner process died (or stopped answering) during a training step; the others cannot go on."""


class NonFiniteUpdatesError(RuntimeError):
    """Too many updates in a row had a NaN or infinite loss or gradient (``max_consecutive_nonfinite_updates``)."""


class InvalidConfigError(ValueError):
    """DAPO's settings are inconsistent; ``problems`` names each one with its value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("DAPOConfig is invalid:\n- " + "\n- ".join(self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray and Tune copy an error raised in a worker; the default would pass the message as `problems`.
        return (type(self), (self.problems,))


NO_MODEL_MESSAGE = (
    "no model is set: DAPOConfig().rl_module(model_config={'model': M}) with M a local Hugging Face model "
    f"folder, a .gguf file or a preset ({', '.join(list_presets())}); DAPOConfig's defaults are the paper's "
    "32B settings, so a small preset also needs fitting lengths (max_response_length, ...)"
)


class DAPOConfig(AlgorithmConfig):
    """Settings of DAPO. Set DAPO's and RLlib's training settings alike through ``.training(...)``.

    Example::

        config = (DAPOConfig()
                  .environment("dapo/Arithmetic-v0")
                  .rl_module(model_config={"model": "tiny-qwen2"})
                  .training(group_size=8, prompts_per_step=32, minibatch_prompts=8, lr=1e-4))
        algo = config.build_algo()
        result = algo.train()

    The model comes from ``.rl_module(model_config={"model": M})``: a local Hugging Face model
    folder, a ``.gguf`` file or a preset (``dapo_rl.presets.list_presets()``); there is no default
    model. The settings, their defaults (the paper's 32B run) and their allowed values are declared
    once, in ``dapo_rl.settings.SETTINGS`` (reference: docs/settings.md).
    """

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or DAPO)
        for name, setting in SETTINGS.items():
            setattr(self, name, setting.default)
        self.env_runner_cls = DAPOEnvRunner
        self.num_env_runners = 0
        # A failed env runner's share is sampled again by the algorithm (DAPO._sample_on_remote_runners)
        # while Ray restarts it; RLlib's own calls (weight syncs) must not stop the run meanwhile.
        self.ignore_env_runner_failures = True
        # RLlib asks for spaces before any env runner exists (e.g. build_learner); ours are text.
        self.observation_space = TEXT_SPACE
        self.action_space = TEXT_SPACE
        self.env_registration: dict[str, Any] | None = None  # see environment()

    @property
    def _dont_auto_sync_env_runner_states(self) -> bool:
        # RLlib's step() ends with a blocking call on every remote runner (connector states, which
        # DAPO's runners do not have). With asynchronous rollouts that call would queue behind the
        # rounds the runners hold, making each step wait for generation: skip it then.
        return self._skip_env_runner_state_sync or self.is_async

    @_dont_auto_sync_env_runner_states.setter
    def _dont_auto_sync_env_runner_states(self, value: bool) -> None:
        self._skip_env_runner_state_sync = bool(value)

    def environment(self, env: Any = NotProvided, **kwargs: Any) -> DAPOConfig:
        """RLlib's ``environment``. An id registered by this process (``register_reasoning_env`` or
        ``gymnasium.register`` in your script) travels with the config, so that Tune's trial and the
        remote env runners, other processes, can make it too (``env_registration``)."""
        super().environment(env, **kwargs)
        if env is not NotProvided:
            self.env_registration = env_registration(self.env)
        return self

    def training(self, **kwargs: Any) -> DAPOConfig:
        """Set training settings: any key of ``dapo_rl.settings.SETTINGS``, or RLlib's own (``lr``, ``grad_clip``,
        ``num_epochs``, ...). An unknown key raises TypeError naming it."""
        for name in [key for key in kwargs if key in DAPO_SETTINGS]:
            setattr(self, name, kwargs.pop(name))
        super().training(**kwargs)
        return self

    def lr_schedule(self) -> float | list[list[float]]:
        """The learning rate per optimizer step: linear warm-up over ``lr_warmup_steps``, then constant.

        Update k (0-based) runs at lr * min(1, (k + 1) / lr_warmup_steps).
        """
        if self.lr_warmup_steps <= 1:
            return self.lr
        return [[0, self.lr / self.lr_warmup_steps], [self.lr_warmup_steps - 1, self.lr]]

    def validate(self) -> None:
        # The env may have been set without environment() (update_from_dict, an attribute): take its
        # registration from this process when it has one (a Tune trial's has not: it keeps the carried one).
        self.env_registration = env_registration(self.env) or self.env_registration
        self.validate_settings(require_installed=True)

    def validate_settings(self, *, require_installed: bool = True) -> None:
        """RLlib's checks and DAPO's; ``require_installed=False`` skips whether optional packages
        (vLLM) are installed here, to check a cluster's configuration from another machine."""
        super().validate()
        if not self._validate_config:  # RLlib's switch, experimental(_validate_config=False), skips DAPO's checks too
            return
        problems = self._dapo_problems(require_installed=require_installed)
        if problems:
            raise InvalidConfigError(problems)

    def _dapo_problems(self, *, require_installed: bool = True) -> list[str]:
        """Each setting alone, by its declaration (dapo_rl.settings.SETTINGS), then the rules that tie
        settings together; a rule is skipped while one of its settings is itself invalid."""
        invalid = setting_problems({name: getattr(self, name) for name in SETTINGS})
        problems = list(invalid.values())
        for rule, needs in CROSS_SETTING_RULES:
            if not needs & invalid.keys():
                problems += rule(self, require_installed)
        return problems

    # -- rules that tie settings together (each a list of problems; CROSS_SETTING_RULES runs them) -----

    def _minibatches_split_the_step(self, _: bool) -> list[str]:
        if self.prompts_per_step % self.minibatch_prompts:
            return [
                f"minibatch_prompts ({self.minibatch_prompts}) must divide prompts_per_step ({self.prompts_per_step})"
            ]
        return []

    def _minibatch_rows_split_over_learners(self, _: bool) -> list[str]:
        rows = self.minibatch_prompts * self.group_size
        if rows % self.learner_shards:
            return [
                f"a mini-batch's rows (minibatch_prompts {self.minibatch_prompts} x group_size {self.group_size} = "
                f"{rows}) must divide evenly over num_learners ({self.learner_shards})"
            ]
        return []

    def _response_budget_exceeds_the_overlong_cache(self, _: bool) -> list[str]:
        if self.max_response_length <= self.overlong_cache_len:
            return [
                f"max_response_length ({self.max_response_length}) must be greater than overlong_cache_len "
                f"({self.overlong_cache_len})"
            ]
        return []

    def _fsdp2_clips_by_global_norm(self, _: bool) -> list[str]:
        if self.data_parallel == "fsdp2" and self.grad_clip is not None and self.grad_clip_by != "global_norm":
            return [
                f"data_parallel='fsdp2' clips gradients by global norm only, got grad_clip_by={self.grad_clip_by!r}"
            ]
        return []

    def _model_fits(self, _: bool) -> list[str]:
        return self._model_problems()

    def _model_config_keys_known(self, _: bool) -> list[str]:
        """An unknown model_config key (a typo, a feature not built) is refused, never ignored."""
        given = set(self.model_config or {})
        from_settings = sorted(given & set(MODULE_KEYS_FROM_SETTINGS))
        unknown = sorted(given - set(MODEL_CONFIG_KEYS) - set(MODULE_KEYS_FROM_SETTINGS))
        problems = []
        if unknown:
            problems.append(f"model_config has unknown key(s) {unknown}; its keys are {sorted(MODEL_CONFIG_KEYS)}")
        if from_settings:
            problems.append(
                f"model_config key(s) {from_settings} are training settings: set them with "
                f".training({from_settings[0]}=...) instead"
            )
        return problems

    def _environment_named(self, _: bool) -> list[str]:
        if not (isinstance(self.env, str) and self.env):
            return [f"env must be a registered Gymnasium id such as 'dapo/Arithmetic-v0', got {self.env!r}"]
        problem = unknown_env_config_keys(self.env, dict(self.env_config or {}), self.env_registration)
        return [problem] if problem else []

    def _vllm_placement(self, require_installed: bool) -> list[str]:
        if self.generation_backend != "vllm":
            return []
        if require_installed and not vllm_available():
            return [INSTALL_HINT]
        problems = []
        if int(self.num_env_runners or 0) < 1 and not self.in_evaluation:
            problems.append(
                "generation_backend='vllm' runs its engines in remote env runners: set "
                f"env_runners(num_env_runners=N >= 1), got num_env_runners={self.num_env_runners}"
            )
        gpus, tensor_parallel = self.num_gpus_per_env_runner, self.vllm_tensor_parallel_size
        if not gpus:
            # No GPUs for the env runners: each engine runs on the CPU, which needs vLLM's CPU build.
            if require_installed and not vllm_cpu_build():
                problems.append(
                    "num_gpus_per_env_runner=0 runs each vLLM engine on the CPU, which needs vLLM's CPU build "
                    f"({CPU_DISTRIBUTION}; see docs/vllm.md); the vLLM installed here is the GPU build: give the env "
                    "runners GPUs (env_runners(num_gpus_per_env_runner=vllm_tensor_parallel_size))"
                )
            if tensor_parallel != 1:
                problems.append(
                    "a CPU vLLM engine (num_gpus_per_env_runner=0) runs in one process: "
                    f"vllm_tensor_parallel_size must be 1, got {tensor_parallel!r}"
                )
            if self.vllm_sleep:
                problems.append(
                    "vllm_sleep=True with CPU engines (num_gpus_per_env_runner=0): vLLM's CPU build has "
                    "no sleep mode (its worker ignores sleep, releasing nothing); set vllm_sleep=False"
                )
        else:
            # A one-GPU engine may take a fraction of a GPU (sharing it with a learner, with vllm_sleep);
            # a tensor-parallel engine needs its whole GPUs.
            shares_one_gpu = tensor_parallel == 1 and 0 < gpus <= 1
            if gpus != tensor_parallel and not shares_one_gpu:
                problems.append(
                    f"num_gpus_per_env_runner ({gpus}) must equal vllm_tensor_parallel_size ({tensor_parallel}), or be "
                    "a fraction of one GPU with tensor parallel size 1: each env runner holds one engine"
                )
        return problems

    def _async_needs_remote_runners(self, _: bool) -> list[str]:
        # RLlib validates a copy for evaluation whose num_env_runners is evaluation_num_env_runners.
        if self.is_async and int(self.num_env_runners or 0) < 1 and not self.in_evaluation:
            return [
                f"max_staleness={self.max_staleness} generates in remote env runners while the learners update: "
                f"set env_runners(num_env_runners=N >= 1), got num_env_runners={self.num_env_runners}"
            ]
        return []

    # -- derived values ---------------------------------------------------------------------------------

    @property
    def is_async(self) -> bool:
        """Asynchronous rollouts: remote runners generate while the learners update (max_staleness >= 1)."""
        return bool(self.max_staleness)

    @property
    def needs_generator_logprobs(self) -> bool:
        """Whether the generators must report their sampled tokens' log-probs: the behaviour policy of
        asynchronous rollouts, or the old log-probs themselves (recompute_old_logprobs=False)."""
        return self.is_async or not self.recompute_old_logprobs

    @property
    def learner_shards(self) -> int:
        """How many learners a mini-batch's rows are split over (the local learner counts as one)."""
        return max(1, int(self.num_learners or 0))

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=CausalLMModule,
            observation_space=TEXT_SPACE,
            action_space=TEXT_SPACE,
            model_config={
                "temperature": self.temperature,
                "logprob_chunk_size": self.logprob_chunk_size,
                "compute_entropy": self.compute_entropy,
                "mixed_precision": self.mixed_precision,
                "gradient_checkpointing": self.gradient_checkpointing,
                "share_prompt_forward": self.share_prompt_forward,
            },
        )

    def get_default_learner_class(self) -> type:
        return DAPOTorchLearner

    @property
    def generation_round_prompts(self) -> int:
        """Prompts per generation round of dynamic sampling (``generation_batch_prompts`` resolved)."""
        return self.generation_batch_prompts or GENERATION_ROUND_FACTOR * self.prompts_per_step

    @property
    def policy_model(self) -> str:
        """The model setting (a local folder or a preset name) this config trains."""
        model = (self.model_config or {}).get("model")
        if not model:
            raise ValueError(NO_MODEL_MESSAGE)
        return str(model)

    def _model_problems(self) -> list[str]:
        model = (self.model_config or {}).get("model")
        if not model:
            return [NO_MODEL_MESSAGE]
        context = model_context_length(str(model), (self.model_config or {}).get("tiny_spec"))
        if context is not None and self.max_prompt_length + self.max_response_length > context:
            return [
                f"max_prompt_length ({self.max_prompt_length}) + max_response_length ({self.max_response_length}) = "
                f"{self.max_prompt_length + self.max_response_length} tokens exceed the context of model {model!r} "
                f"({context} positions)"
            ]
        return []


#: DAPOConfig's cross-setting rules, each with the settings it reads: a rule is skipped while one of
#: them is itself invalid (its own problem is reported instead).
CROSS_SETTING_RULES: tuple[tuple[Any, frozenset[str]], ...] = (
    (DAPOConfig._minibatches_split_the_step, frozenset({"prompts_per_step", "minibatch_prompts"})),
    (DAPOConfig._minibatch_rows_split_over_learners, frozenset({"minibatch_prompts", "group_size"})),
    (DAPOConfig._response_budget_exceeds_the_overlong_cache, frozenset({"max_response_length", "overlong_cache_len"})),
    (DAPOConfig._fsdp2_clips_by_global_norm, frozenset({"data_parallel", "grad_clip", "grad_clip_by"})),
    (DAPOConfig._model_fits, frozenset({"max_prompt_length", "max_response_length"})),
    (DAPOConfig._model_config_keys_known, frozenset()),
    (DAPOConfig._environment_named, frozenset()),
    (DAPOConfig._vllm_placement, frozenset({"generation_backend", "vllm_tensor_parallel_size"})),
    (DAPOConfig._async_needs_remote_runners, frozenset({"max_staleness"})),
)


class DAPO(Algorithm):
    """DAPO on RLlib's new API stack. See the module docstring for one ``train()`` step."""

    @classmethod
    def get_default_config(cls) -> DAPOConfig:
        return DAPOConfig()

    def setup(self, config: Any) -> None:
        super().setup(config)
        seed = int(self.config.seed or 0)
        self._prompt_sampler = PromptSampler(make_reasoning_env(self.config), seed)
        self._generation_rng = np.random.default_rng(seed + 1)
        self._shuffle_generator = torch.Generator().manual_seed(seed + 2)
        self._optimizer_steps = 0
        self._consecutive_nonfinite_updates = 0
        self._nonfinite_updates_skipped = 0  # over the run (checkpointed)
        self._empty_updates_skipped = 0  # mini-batches without a loss token, over the run (checkpointed)
        self._env_runner_failures = 0  # sampling calls lost to a failed env runner and redone, over the run
        self._round_env_runner_failures = 0  # the same, this iteration
        self._engine_sync = EngineWeightSync(self.config.vllm_tensor_parallel_size, self.config.vllm_dtype)
        self._tokenizer = load_tokenizer(self.config.policy_model)
        self._latest_samples: list[dict[str, Any]] = []
        self._latest_warnings: list[str] = []
        self._previous_shard_folder: Path | None = None  # shards of the last checkpoint saved or restored
        # Asynchronous rollouts (max_staleness >= 1): rounds requested ahead, the policy version
        # (rollout steps' worth of updates) of the learners' weights, rounds dropped as too old.
        self._stream: RolloutStream | None = None
        self._stream_needs_weights = False
        self._policy_version = 0
        self._stale_rounds_dropped = 0  # over the run
        self._step_extra: dict[str, float] = {}  # reset by each step

    # -- one rollout step ----------------------------------------------------------------------------

    def training_step(self) -> None:
        try:
            self._training_step()
        except ray.exceptions.RayActorError as error:
            raise self._learner_failure(error) from error

    def _learner_failure(self, error: ray.exceptions.RayActorError) -> Exception:
        """The error to stop the run with when a Ray actor died in a step: which learner, and how to go on.

        Env runners' failures never reach here (their shares are sampled again, see
        ``_sample_on_remote_runners``); so a dead actor is a learner, and learners hold shards of one
        update (DDP/FSDP2 collectives), which the others cannot finish without it.
        """
        num_learners = int(self.config.num_learners or 0)
        if num_learners == 0:
            return error
        answers = self.learner_group.foreach_learner(lambda learner: True, healthy_only=False, timeout_seconds=10)
        answered = {result.actor_id for result in answers.result_or_errors if result.ok}
        actor_ids = sorted(self.learner_group._worker_manager.actor_ids())
        dead = [index for index, actor_id in enumerate(actor_ids) if actor_id not in answered]
        which = f"learner {', '.join(map(str, dead))}" if dead else "a learner"
        return LearnerFailedError(
            f"{which} of {num_learners} died during iteration {self.iteration + 1} ({type(error).__name__}); the "
            "others cannot finish an update without it, so the run stops here. The last checkpoint holds every "
            "learner's state: resume the run from it (dapo-rl train --resume <output folder>)"
        )

    def _training_step(self) -> None:
        config = self.config
        step_start = time.perf_counter()
        self._round_env_runner_failures = 0
        runner_metrics: list[Any] = []
        asynchronous = config.is_async
        self._step_extra = {}  # this step's metrics of asynchronous rollouts and generator log-probs
        if asynchronous:
            self._start_stream()
        generate_round = self._next_stream_round if asynchronous else self._generate_round
        with self.metrics.log_time((TIMERS, "generate_and_score")):
            collected, stats, rounds = collect_groups(
                lambda count: generate_round(count, runner_metrics),
                prompts_per_step=config.prompts_per_step,
                generation_batch_prompts=config.generation_round_prompts,
                dynamic_sampling=config.dynamic_sampling,
                max_sampling_rounds=config.max_sampling_rounds,
                on_sampling_limit=config.on_sampling_limit,
            )
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)

        with self.metrics.log_time((TIMERS, "old_logprobs")):
            batch = build_train_batch(
                collected,
                pad_token_id=self._tokenizer.pad_token_id,
                max_response_length=config.max_response_length,
                overlong_cache_len=config.overlong_cache_len,
                overlong_penalty_factor=config.overlong_penalty_factor,
                overlong_filter=config.overlong_filter,
                advantage_scale=config.advantage_scale,
            )
            batch["group_index"] = self._groups_fitting_learners(batch["group_index"])
            # A step cut short by the round limit (on_sampling_limit="train") may keep no group at
            # all: then there is nothing to train on (and a forward pass on zero rows would fail).
            has_data = bool((batch["group_index"] >= 0).any())
            if has_data and config.recompute_old_logprobs:
                batch["old_logprobs"] = self._old_logprobs(batch)
                if asynchronous:
                    self._add_importance_weights(batch)
            elif has_data:
                self._take_generator_logprobs(batch)

        with self.metrics.log_time((TIMERS, "update")):
            for _ in range(config.num_epochs if has_data else 0):
                for rows in minibatch_indices(
                    batch["group_index"], minibatch_prompts=config.minibatch_prompts, generator=self._shuffle_generator
                ):
                    self._update(
                        minibatch_with_loss_normalizer(
                            batch, rows, loss_agg=config.loss_agg, max_response_length=config.max_response_length
                        )
                    )

        with self.metrics.log_time((TIMERS, "sync_weights")):
            if asynchronous:
                self._policy_version += 1
                self._push_weights_to_stream()
            else:
                self.sync_runner_weights()

        values = self._log_step_metrics(batch, stats, rounds, time.perf_counter() - step_start)
        self._latest_samples = self._samples(rounds[0])
        self._latest_warnings = training_signal_warnings(
            values,
            overlong_filter=config.overlong_filter,
            max_response_length=config.max_response_length,
            dynamic_sampling=config.dynamic_sampling,
            on_sampling_limit=config.on_sampling_limit,
        )
        for warning in self._latest_warnings:
            logger.warning("iteration %d: %s", self.iteration + 1, warning)

    def step(self) -> dict[str, Any]:
        """RLlib's iteration, with a few of its responses under ``result["samples"]``: researchers read samples."""
        result = super().step()
        result["samples"] = self._latest_samples
        # Sentences on what made this step train on little or nothing (dapo_rl.training.training_signal_warnings).
        result["warnings"] = list(self._latest_warnings)
        return result

    def _samples(self, rollout: dict[str, Any]) -> list[dict[str, Any]]:
        """The first response to each of the first ``log_samples`` prompts of a generation round,
        with the verifier's score and the shaped reward (whether or not its group was trained on)."""
        config = self.config
        rows = np.flatnonzero(np.diff(rollout["group_index"], prepend=-1) != 0)[: config.log_samples]
        rewards = shaped_rewards(
            torch.as_tensor(rollout["score"][rows]),
            torch.as_tensor(rollout["response_length"][rows]),
            max_response_length=config.max_response_length,
            overlong_cache_len=config.overlong_cache_len,
            overlong_penalty_factor=config.overlong_penalty_factor,
        )
        return [
            {
                "prompt": self._tokenizer.decode(rollout["prompt_token_ids"][row], skip_special_tokens=False),
                "response": rollout["response_text"][row],
                "pred": rollout["pred"][row],
                "score": float(rollout["score"][row]),
                "reason": rollout["reason"][row],
                "reward": float(reward),
                "acc": bool(rollout["acc"][row]),
                "truncated": bool(rollout["truncated"][row]),
            }
            for row, reward in zip(rows.tolist(), rewards.tolist(), strict=True)
        ]

    # -- asynchronous rollouts (max_staleness >= 1; see dapo_rl.async_rollouts) ----------------------

    def _start_stream(self) -> None:
        """Before a step: the stream exists and the runners hold this version's weights."""
        self._step_extra.update(rounds_ready_at_start=0.0, wait_seconds=0.0, stale_rounds_dropped=0.0)
        if self._stream is None:
            self._stream = RolloutStream(
                self.env_runner_group,
                lambda problems, seed: lambda runner: (runner.sample_groups(problems, seed), runner.get_metrics()),
                lambda: self.restore_env_runners(self.env_runner_group),
                recovery_seconds=ENV_RUNNER_RECOVERY_S,
            )
            self._stream_needs_weights = True
        if self._stream_needs_weights:  # a new stream, or one abandoned by a restore (set_state)
            self._push_weights_to_stream()
            self._stream_needs_weights = False
        self._step_extra["rounds_ready_at_start"] = float(self._stream.rounds_complete())

    def _request_round(self) -> None:
        config = self.config
        count = config.generation_round_prompts if config.dynamic_sampling else config.prompts_per_step
        problems = self._prompt_sampler.next(count)
        self._stream.request(problems, int(self._generation_rng.integers(2**31 - 1)))

    def _next_stream_round(self, num_prompts: int, runner_metrics: list[Any]) -> dict[str, Any]:
        """The oldest requested round, with ``max_staleness`` more requested behind it; a round more
        than ``max_staleness`` versions old is dropped (see dapo_rl.async_rollouts for why none is
        in steady state)."""
        while True:
            if not len(self._stream):
                self._request_round()  # needed now: generated by the current weights
            wait_start = time.perf_counter()
            finished = self._stream.next_round()
            self._step_extra["wait_seconds"] += time.perf_counter() - wait_start
            # Replace it at once, so the runners generate while the learners update.
            while len(self._stream) < self.config.max_staleness:
                self._request_round()
            runner_metrics.extend(finished.runner_metrics)
            staleness = self._policy_version - finished.policy_version
            if staleness <= self.config.max_staleness:
                rollout = finished.rollout
                rollout["staleness"] = np.full(len(rollout["group_index"]), staleness, dtype=np.int64)
                return rollout
            self._step_extra["stale_rounds_dropped"] += 1
            self._stale_rounds_dropped += 1

    def _push_weights_to_stream(self, runner_ids: list[int] | None = None) -> None:
        """Send the learners' weights, with their policy version, to the runners, without waiting."""
        if self._engines_over_nccl:
            # Unverified (needs GPUs): the NCCL broadcast needs the engines, so this waits for the
            # rounds the runners hold to finish; the version follows in their call queue.
            self._sync_engine_weights()
            state_ref = None
        else:
            state_ref = self._learner_weights_ref()
        self._stream.push_weights(state_ref, self._policy_version, runner_ids)

    def _learner_weights_ref(self) -> Any:
        """The learners' current weights (RLlib's weight state of the RLModule) in the object store."""
        if self._sharded_learners:
            return ray.put(self._gathered_learner_state())
        return ray.put(
            self.learner_group.get_state(components=COMPONENT_LEARNER + "/" + COMPONENT_RL_MODULE, inference_only=True)[
                COMPONENT_LEARNER
            ]
        )

    def restore_env_runners(self, env_runner_group: Any) -> list[int]:
        restored = super().restore_env_runners(env_runner_group)
        if not restored or env_runner_group is not self.env_runner_group:
            return restored
        if self._stream is not None:
            # RLlib's restore copies the local runner's weights; in the asynchronous path those are
            # not kept current: send the learners' with their version (a restarted runner holds -1).
            self._push_weights_to_stream(list(restored))
        elif self.config.generation_backend == "vllm" and not self._engines_over_nccl:
            # A restarted CPU engine starts from the model folder, and RLlib's restore copies nothing
            # (the local runner holds no weights with vLLM): send the learners' before it samples.
            state_ref = self._learner_weights_ref()
            env_runner_group.foreach_env_runner(
                lambda runner, ref=state_ref: runner.set_state({**ray.get(ref), WEIGHTS_SEQ_NO: 0}),
                remote_worker_ids=list(restored),
                local_env_runner=False,
            )
        return restored

    def _add_importance_weights(self, batch: dict[str, torch.Tensor]) -> None:
        """The truncated behaviour importance weights of the stale responses (dapo_rl.core.off_policy)."""
        weights, metrics = behaviour_importance_weights(
            batch["old_logprobs"],
            batch["behaviour_logprobs"],
            batch["token_mask"],
            batch["staleness"] > 0,
            cap=self.config.importance_weight_cap,
        )
        batch["importance_weights"] = weights
        self._step_extra.update(metrics)

    def _take_generator_logprobs(self, batch: dict[str, torch.Tensor]) -> None:
        """``recompute_old_logprobs=False``: the generator's log-probs are the old (proximal) ones, so
        the ratio and the clip are taken against the policy that sampled each token (its importance
        weight is the ratio itself). A token the generator gave no log-prob for carries no loss."""
        behaviour = batch["behaviour_logprobs"]
        known = torch.isfinite(behaviour)
        batch["old_logprobs"] = torch.where(known, behaviour, 0.0)
        unknown = (batch["token_mask"].bool() & ~known).sum()
        batch["token_mask"] = batch["token_mask"] * known
        self._step_extra["tokens_without_generator_logprob"] = float(unknown)

    def _generate_round(self, num_prompts: int, runner_metrics: list[Any]) -> dict[str, Any]:
        problems = self._prompt_sampler.next(num_prompts)
        seed = int(self._generation_rng.integers(2**31 - 1))
        if int(self.config.num_env_runners or 0) == 0:
            rollout = self.env_runner.sample_groups(problems, seed)
            runner_metrics.append(self.env_runner.get_metrics())
            return rollout
        return self._sample_on_remote_runners(problems, seed, runner_metrics)

    def _sample_on_remote_runners(self, problems: list[Any], seed: int, runner_metrics: list[Any]) -> dict[str, Any]:
        """Split ``problems`` into one share per configured env runner and sample them remotely.

        A runner that dies mid-call (its process killed, out of memory) loses only its share: the
        share is sampled again, with the same seed, on a healthy runner, while Ray restarts the dead
        one (``restart_failed_env_runners``) and ``restore_env_runners`` gives it the current
        weights. So the round's samples are those of a round without the failure. Each failed call
        is counted (``dapo/env_runner_failures``).
        """
        group = self.env_runner_group
        shares = np.array_split(np.arange(len(problems)), group.num_remote_env_runners())
        pending = {k: [problems[i] for i in share] for k, share in enumerate(shares) if len(share)}
        parts: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + ENV_RUNNER_RECOVERY_S
        while pending:
            healthy = group.healthy_env_runner_ids()
            if not healthy:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no env runner came back within {ENV_RUNNER_RECOVERY_S:.0f} s after the runners failed "
                        f"({self._env_runner_failures} failed sampling calls this run)"
                    )
                self.restore_env_runners(group)
                time.sleep(0.2)
                continue
            wave = list(zip(pending, healthy))  # one share per healthy runner at a time
            calls = [
                (lambda runner, part=pending[k], s=seed + k: (runner.sample_groups(part, s), runner.get_metrics()))
                for k, _ in wave
            ]
            share_of_runner = {runner_id: k for k, runner_id in wave}
            results = group._worker_manager.foreach_actor(calls, remote_actor_ids=[r for _, r in wave])
            for result in results.result_or_errors:
                if result.ok:
                    k = share_of_runner[result.actor_id]
                    parts[k] = result.get()
                    del pending[k]
            failed = sum(1 for k, _ in wave if k in pending)
            # A failed runner's share goes to the next healthy one; the failed runner rejoins once Ray
            # has restarted it (restore_env_runners, when no runner is left, and at each iteration's start).
            self._env_runner_failures += failed
            self._round_env_runner_failures += failed
        rollout, metrics = merge_shares(parts)
        runner_metrics.extend(metrics)
        return rollout

    def _groups_fitting_learners(self, group_index: torch.Tensor) -> torch.Tensor:
        """Mark groups that would leave a mini-batch unevenly split over learners as dropped (-1).

        Only a step cut short by the round limit (``on_sampling_limit="train"``) can hold such a
        remainder; an uneven shard would make DDP learners take different numbers of steps and hang.
        """
        num_learners = self.config.learner_shards
        if num_learners == 1:
            return group_index
        groups_per_unit = num_learners // math.gcd(self.config.group_size, num_learners)
        num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
        usable = num_groups - num_groups % groups_per_unit
        return torch.where(group_index < usable, group_index, torch.full_like(group_index, -1))

    def _old_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        columns = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids", "response_mask")}
        num_shards = self.config.learner_shards
        results = self._on_all_learners(lambda learner, b=columns, k=num_shards: learner.compute_old_logprobs(b, k))
        shards = sorted(results, key=lambda pair: pair[0])
        return torch.cat([logprobs for _, logprobs in shards], dim=0)

    def _update(self, minibatch: dict[str, torch.Tensor]) -> None:
        if float(minibatch["loss_tokens"][0]) == 0:
            # Every row masked (truncated responses under the overlong filter): the gradient is
            # zero, but an AdamW step would still decay the weights and follow its momentum. Not an
            # optimizer step, so the lr schedule stays where it is.
            self._empty_updates_skipped += 1
            return
        rows = len(minibatch["input_ids"])
        sample_batch = SampleBatch({key: value.numpy() for key, value in minibatch.items()})
        results = self.learner_group.update(
            batch=MultiAgentBatch({DEFAULT_MODULE_ID: sample_batch}, env_steps=rows),
            # The lr schedule is keyed on this count; RLlib applies it after the update, so pass
            # the count *after* this step for the next update to run at its own rate.
            timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self._optimizer_steps + 1},
        )
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        if not _update_was_skipped(results):
            self._optimizer_steps += 1
            self._consecutive_nonfinite_updates = 0
            return
        # Not an optimizer step: the lr schedule (keyed on the count) stays where it was.
        self._nonfinite_updates_skipped += 1
        self._consecutive_nonfinite_updates += 1
        limit = self.config.max_consecutive_nonfinite_updates
        if self._consecutive_nonfinite_updates >= limit:
            raise NonFiniteUpdatesError(
                f"iteration {self.iteration + 1}: the last {self._consecutive_nonfinite_updates} updates had a NaN or "
                f"infinite loss or gradient and were skipped (max_consecutive_nonfinite_updates={limit}); the weights "
                f"are those of optimizer step {self._optimizer_steps}. Look at the rewards and advantages of this "
                "iteration's samples, lower lr, or resume from an earlier checkpoint"
            )

    def _log_step_metrics(
        self, batch: dict[str, torch.Tensor], stats: Any, rounds: list[dict[str, Any]], seconds: float
    ) -> dict[str, float]:
        log = self.metrics.log_value
        generated_acc = np.concatenate([r["acc"] for r in rounds]).astype(np.float64)
        generated_lengths = np.concatenate([r["response_length"] for r in rounds])
        generated_truncated = np.concatenate([r["truncated"] for r in rounds])
        generate_seconds = sum(r["generate_seconds"] for r in rounds)
        verifier_failures = int(sum(r["verifier_failed"].sum() for r in rounds))
        trained = batch["group_index"] >= 0

        def over_trained(column: str, reduce: str) -> float:
            # NaN when no group was trained on (a step cut short by the sampling round limit).
            values = batch[column][trained].float()
            return float(getattr(values, reduce)()) if values.numel() else float("nan")

        def over_trained_zero_advantage() -> float:
            advantages = batch["advantages"][trained]
            return float((advantages == 0).float().mean()) if advantages.numel() else float("nan")

        values = {
            "reward_mean": over_trained("rewards", "mean"),
            "reward_max": over_trained("rewards", "max"),
            "reward_min": over_trained("rewards", "min"),
            "train_accuracy": over_trained("acc", "mean"),
            "advantage_mean": over_trained("advantages", "mean"),
            "advantage_max": over_trained("advantages", "max"),
            "advantage_min": over_trained("advantages", "min"),
            "generated_accuracy": generated_acc.mean(),
            "response_length_mean": generated_lengths.mean(),
            "response_length_max": generated_lengths.max(),
            "response_length_min": generated_lengths.min(),
            "response_clip_ratio": generated_truncated.mean(),
            # Of the trained responses: the share of their tokens that carry loss, and of them whose
            # advantage is 0 (both NaN when none was trained).
            "loss_token_frac": float(batch["token_mask"][trained].sum() / batch["response_mask"][trained].sum())
            if trained.any()
            else float("nan"),
            "zero_advantage_frac": over_trained_zero_advantage(),
            "sampling_rounds": stats.rounds,
            "prompts_generated": stats.prompts_generated,
            "prompts_trained": int(torch.unique(batch["group_index"][trained]).numel()),
            "kept_group_ratio": stats.groups_kept / max(1, stats.prompts_generated),
            "all_correct_group_ratio": stats.all_correct_groups / max(1, stats.prompts_generated),
            "all_wrong_group_ratio": stats.all_wrong_groups / max(1, stats.prompts_generated),
            "sampling_limit_reached": float(stats.limit_reached),
            "optimizer_steps": self._optimizer_steps,
            "nonfinite_updates_skipped": self._nonfinite_updates_skipped,
            "empty_updates_skipped": self._empty_updates_skipped,
            # Responses scored wrong because the verifier failed on them (see VerifierResult.failed).
            "verifier_failures": verifier_failures,
            # Sampling calls whose env runner died (killed, out of memory), redone on another runner.
            "env_runner_failures": self._round_env_runner_failures,
            "env_runner_failures_total": self._env_runner_failures,
            "env_runners_restored_total": self._counters["total_num_restored_workers"],
            "data_epoch": self._prompt_sampler.epoch,
            "generate_seconds": generate_seconds,
            "score_seconds": sum(r["score_seconds"] for r in rounds),
            "generated_tokens_per_second": float(generated_lengths.sum()) / max(1e-9, generate_seconds),
            "step_seconds": seconds,
            "torch_threads": torch.get_num_threads(),  # of this process (the Tune trial's): its CPUs
        }
        if self.config.is_async:
            values.update(self._async_metrics(rounds))
        if "environment_turns" in rounds[0]:
            values.update(_episode_metrics(rounds))
        values.update(self._step_extra)
        for name, value in values.items():
            log(("dapo", name), float(value), window=1)
        log(("dapo", "verifier_failures_lifetime"), verifier_failures, reduce="lifetime_sum")
        return values

    def _async_metrics(self, rounds: list[dict[str, Any]]) -> dict[str, float]:
        """What asynchronous rollouts did this step: how old the responses it took were (trained on or
        filtered out), what was dropped, and the learner's wait for generation."""
        staleness = np.concatenate([r["staleness"] for r in rounds]).astype(np.float64)
        return {
            "policy_version": self._policy_version,
            "staleness_mean": float(staleness.mean()),
            "staleness_max": float(staleness.max()),
            "stale_rounds_dropped_total": self._stale_rounds_dropped,
            "stream_failed_calls_total": self._stream.failed_calls,
        }

    # -- weights, checkpoints and export -------------------------------------------------------------

    @property
    def _sharded_learners(self) -> bool:
        return learners_are_sharded(self.config.data_parallel, self.config.num_learners)

    @property
    def _engines_over_nccl(self) -> bool:
        """vLLM engines on GPUs take their weights over NCCL from learner rank 0; CPU engines (vLLM's
        CPU build) by value, through the same path as the hf backend's runners."""
        return self.config.generation_backend == "vllm" and vllm_engine_device(self.config) == "cuda"

    def sync_runner_weights(self) -> None:
        """Send the learners' current weights to every env runner (and the local one)."""
        if self._engines_over_nccl:
            self._sync_engine_weights()
            return
        if not self._sharded_learners:
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
            return
        # Sharded: every learner takes part in gathering the full weights; rank 0 returns them.
        state_ref = ray.put(self._gathered_learner_state())
        self.env_runner_group.foreach_env_runner(
            lambda runner, ref=state_ref: runner.set_state(ray.get(ref)), local_env_runner=True
        )

    def _sync_engine_weights(self) -> None:
        """Broadcast the weights from learner rank 0 to every vLLM engine over NCCL."""
        group = self.env_runner_group
        runner_ids = group.healthy_env_runner_ids()

        def on_runners(calls: Any) -> None:
            group.foreach_env_runner(calls, remote_worker_ids=runner_ids, local_env_runner=False)

        self._engine_sync.sync(self._on_all_learners, on_runners, len(runner_ids))

    def _on_all_learners(self, function: Any) -> list[Any]:
        """Call ``function(learner)`` on every learner and return the results; re-raise any error.

        For collectives: a learner marked unhealthy must not be skipped (the others would wait for
        it forever), and an error must not pass silently.
        """
        results = []
        for result in self.learner_group.foreach_learner(function, healthy_only=False):
            if not result.ok:  # get() hands back the error rather than raising it
                raise result.get()
            results.append(result.get())
        return results

    def _gathered_learner_state(self) -> dict[str, Any]:
        results = self._on_all_learners(lambda learner: learner.gather_weights())
        return next(state for rank, state in results if rank == 0)

    def save_to_path(self, path: Any = None, **kwargs: Any) -> str:
        """RLlib's checkpoint; sharded learners add their shards (see ``sharded_checkpoint_dir``).

        A manifest of every file is written last (``dapo_rl.checkpoints``): a checkpoint without a
        matching one is incomplete and a resume passes it over.
        """
        path = super().save_to_path(path, **kwargs)
        folder = None
        if self._sharded_learners:
            shared = self.config.sharded_checkpoint_dir
            folder = sharded_state_target(path, shared, self.iteration)
            target = os.fspath(folder)
            self._on_all_learners(lambda learner: learner.save_sharded_state(target))
            write_policy_module_config(path, self._policy_module_spec().model_config)
            finish_sharded_checkpoint(
                path, folder, shared, keep=self.config.sharded_checkpoints_kept, protect=self._previous_shard_folder
            )
            self._previous_shard_folder = folder
        write_checkpoint_manifest(path, iteration=self.iteration, time_total_s=self._time_total, shards=folder)
        return path

    def restore_from_path(self, path: Any, *args: Any, **kwargs: Any) -> None:
        super().restore_from_path(path, *args, **kwargs)
        if "component" in kwargs:
            return
        folder = sharded_state_folder(path)
        if self._sharded_learners and folder is None:
            raise FileNotFoundError(
                f"{path} holds neither {SHARDED_STATE_FOLDER}/ nor {SHARDED_STATE_POINTER}: it was not saved by "
                "sharded learners (data_parallel='fsdp2'), so their weights cannot be restored from it"
            )
        if folder is not None:
            self._previous_shard_folder = folder  # pruning keeps it until a newer checkpoint is persisted
            # Saved by sharded learners: DCP reshards onto whatever learners load it (sharded or not;
            # each unsharded learner reads the whole weights and optimizer state).
            source = os.fspath(folder)
            self._on_all_learners(lambda learner: learner.load_sharded_state(source))
        if folder is not None or self.config.generation_backend == "vllm":
            # RLlib's own sync after a restore reaches neither sharded learners' weights nor engines.
            self.sync_runner_weights()

    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component("dapo", components, not_components):
            state["dapo"] = {
                "prompt_sampler": self._prompt_sampler.get_state(),
                "generation_rng": self._generation_rng.bit_generator.state,
                "shuffle_generator": self._shuffle_generator.get_state(),
                "optimizer_steps": self._optimizer_steps,
                "nonfinite_updates_skipped": self._nonfinite_updates_skipped,
                "empty_updates_skipped": self._empty_updates_skipped,
                "consecutive_nonfinite_updates": self._consecutive_nonfinite_updates,
                "env_runner_failures": self._env_runner_failures,
                "policy_version": self._policy_version,
                "stale_rounds_dropped": self._stale_rounds_dropped,
            }
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if "dapo" in state:
            dapo_state = state["dapo"]
            self._prompt_sampler.set_state(dapo_state["prompt_sampler"])
            self._generation_rng.bit_generator.state = dapo_state["generation_rng"]
            self._shuffle_generator.set_state(dapo_state["shuffle_generator"])
            self._optimizer_steps = dapo_state["optimizer_steps"]
            self._nonfinite_updates_skipped = dapo_state.get("nonfinite_updates_skipped", 0)
            self._empty_updates_skipped = dapo_state.get("empty_updates_skipped", 0)
            self._consecutive_nonfinite_updates = dapo_state.get("consecutive_nonfinite_updates", 0)
            self._env_runner_failures = dapo_state.get("env_runner_failures", 0)
            self._policy_version = dapo_state.get("policy_version", 0)
            self._stale_rounds_dropped = dapo_state.get("stale_rounds_dropped", 0)
            if self._stream is not None:
                # Rounds requested before the restore come from weights this run no longer has.
                self._stream.abandon()
                self._stream_needs_weights = True

    def _policy_module_spec(self) -> RLModuleSpec:
        return self.config.get_rl_module_spec(
            spaces={DEFAULT_MODULE_ID: (TEXT_SPACE, TEXT_SPACE)}, inference_only=False
        )

    def export_policy(self, folder: str | os.PathLike[str]) -> str:
        """Write the current policy as a Hugging Face model folder (weights, config, tokenizer)."""
        module = self._policy_module_spec().build()
        if self._sharded_learners:
            module.set_state(self._gathered_learner_state()[COMPONENT_RL_MODULE][DEFAULT_MODULE_ID])
        else:
            module.set_state(self.learner_group.get_weights()[DEFAULT_MODULE_ID])
        save_policy(module.causal_lm, module.tokenizer, folder)
        return os.fspath(folder)


def _update_was_skipped(learner_results: list[dict[str, Any]]) -> bool:
    """Whether the learners skipped the update for a non-finite loss or gradient.

    Learners decide together (``DAPOTorchLearner.apply_gradients``); a split decision would leave
    their weights apart, so it stops the run.
    """
    skipped = []
    for result in learner_results:
        value = result.get(DEFAULT_MODULE_ID, {}).get(NONFINITE_UPDATE_SKIPPED, 0)
        skipped.append(float(value.peek() if hasattr(value, "peek") else value) > 0)
    if len(set(skipped)) > 1:
        raise RuntimeError(f"learners disagree on skipping a non-finite update (skipped, by learner: {skipped})")
    return bool(skipped) and skipped[0]


def _episode_metrics(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Multi-turn episodes generated this step: turns, the share that had an environment turn (a tool
    call, a retry), and the share of episode tokens the environment wrote (no loss on them)."""
    model_turns = np.concatenate([r["model_turns"] for r in rounds]).astype(np.float64)
    environment_turns = np.concatenate([r["environment_turns"] for r in rounds]).astype(np.float64)
    model_tokens = sum(float(mask.sum()) for r in rounds for mask in r["response_loss_mask"])
    all_tokens = sum(float(r["response_length"].sum()) for r in rounds)
    return {
        "episode_model_turns_mean": model_turns.mean(),
        "episode_model_turns_max": model_turns.max(),
        "environment_turns_mean": environment_turns.mean(),
        "environment_turn_frac": float((environment_turns > 0).mean()),
        "environment_token_frac": 1.0 - model_tokens / max(1.0, all_tokens),
    }
