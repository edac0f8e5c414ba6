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

With ``max_staleness >= 1`` (asynchronous rollouts, :mod:`dapo_rl.rllib.sampling`) step 1 takes its
rounds from those the remote env runners generated while the previous step's update ran, step 3
adds the truncated behaviour importance weights of the responses older weights generated, and step 6
sends the weights without waiting for the runners.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    TIMERS,
)

from dapo_rl.metrics import episode_metrics, logged_samples, step_metrics
from dapo_rl.models.distributed import (
    SHARDED_STATE_FOLDER,
    SHARDED_STATE_POINTER,
    finish_sharded_checkpoint,
    sharded_state_folder,
    sharded_state_target,
)
from dapo_rl.models.loading import load_tokenizer
from dapo_rl.rllib.checkpoints import write_checkpoint_manifest, write_policy_module_config
from dapo_rl.rllib.config_rules import CROSS_SETTING_RULES, NO_MODEL_MESSAGE
from dapo_rl.rllib.env_runner import (
    DAPOEnvRunner,
    env_registration,
    make_reasoning_env,
)
from dapo_rl.rllib.learner import DAPOTorchLearner, update_was_skipped
from dapo_rl.rllib.module import TEXT_SPACE, CausalLMModule
from dapo_rl.rllib.nodes import NodeWatch, node_states
from dapo_rl.rllib.run_state import RunState
from dapo_rl.rllib.sampling import Rollouts
from dapo_rl.rllib.weights import WeightSync
from dapo_rl.rollout.prompt_sampler import PromptSampler
from dapo_rl.settings import (
    DAPO_SETTINGS,
    GENERATION_ROUND_FACTOR,
    SETTINGS,
    setting_problems,
)
from dapo_rl.training import (
    add_importance_weights,
    add_reward_kl_penalty,
    build_train_batch,
    collect_groups,
    groups_fitting_learners,
    minibatch_indices,
    minibatch_with_loss_normalizer,
    take_generator_logprobs,
    training_signal_warnings,
)

logger = logging.getLogger(__name__)


class LearnerFailedError(RuntimeError):
    """A learner process died (or stopped answering) during a training step; the others cannot go on."""


class LearnerNodeLostError(LearnerFailedError):
    """The Ray node holding a learner was lost (its raylet gone, the cluster reports it dead) during a step."""


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


class DAPOConfig(AlgorithmConfig):
    """Settings of DAPO. Set DAPO's and RLlib's training settings alike through ``.training(...)``.

    Example::

        config = (DAPOConfig()
                  .environment("dapo/Arithmetic-v0")
                  .rl_module(model_config={"model": "tiny-qwen2"})
                  .training(group_size=8, prompts_per_step=32, minibatch_prompts=8, lr=1e-4,
                            max_prompt_length=64, max_response_length=16, overlong_cache_len=4))
        algo = config.build_algo()
        result = algo.train()

    The model comes from ``.rl_module(model_config={"model": M})``: a local Hugging Face model
    folder, a ``.gguf`` file or a preset (``dapo_rl.models.presets.list_presets()``); there is no default
    model. The settings, their defaults (the paper's 32B run) and their allowed values are declared
    once, in ``dapo_rl.settings.SETTINGS`` (reference: docs/settings.md).
    """

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or DAPO)
        for name, setting in SETTINGS.items():
            setattr(self, name, setting.default)
        self.env_runner_cls = DAPOEnvRunner
        self.num_env_runners = 0
        # A failed env runner's share is sampled again by the algorithm (dapo_rl.rllib.sampling)
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


class DAPO(Algorithm):
    """DAPO on RLlib's new API stack. See the module docstring for one ``train()`` step."""

    @classmethod
    def get_default_config(cls) -> DAPOConfig:
        return DAPOConfig()

    def setup(self, config: Any) -> None:
        super().setup(config)
        self._tokenizer = load_tokenizer(self.config.policy_model)
        seed = int(self.config.seed or 0)
        self._run_state = RunState(PromptSampler(make_reasoning_env(self.config), seed), seed)
        self._weights = WeightSync(self.config, self.learner_group, self.env_runner_group)
        self._rollouts = Rollouts(
            self.config,
            self.env_runner_group,
            self._run_state,
            self._weights,
            lambda: self.restore_env_runners(self.env_runner_group),
        )
        self._latest_samples: list[dict[str, Any]] = []
        self._latest_warnings: list[str] = []
        self._step_extra: dict[str, float] = {}  # this step's metrics of the old log-probs' side
        self._previous_shard_folder: Path | None = None  # shards of the last checkpoint saved or restored
        # Where each remote learner runs, asked now, while they answer: a learner lost with its node
        # is named by that node in the error that stops the run.
        self._learner_nodes = self._remote_learner_nodes()

    # -- one rollout step ----------------------------------------------------------------------------

    def training_step(self) -> None:
        # With several learners, a learner's node lost mid-collective would leave the others (and this
        # call) waiting for the process group's time-out: the watch stops them as soon as the cluster
        # reports the node dead, and the failed call below names the lost one.
        several = int(self.config.num_learners or 0) > 1
        learner_nodes = self._learner_nodes.values() if several else ()
        with NodeWatch(learner_nodes, self._stop_learners) as watch:
            try:
                self._training_step()
            except ray.exceptions.RayActorError as error:
                raise self._learner_failure(error, lost_nodes=watch.lost) from error

    def _stop_learners(self, lost_nodes: list[str]) -> None:
        """End every learner: one is gone with its node, and the others cannot finish an update without it."""
        logger.warning("learner node(s) %s lost: stopping the learners left, which wait for it", lost_nodes)
        for actor in list(getattr(self.learner_group, "_workers", None) or []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass

    def _training_step(self) -> None:
        config = self.config
        step_start = time.perf_counter()
        runner_metrics: list[Any] = []
        self._step_extra = {}
        self._rollouts.begin_step()
        with self.metrics.log_time((TIMERS, "generate_and_score")):
            collected, stats, rounds = collect_groups(
                lambda count: self._rollouts.next_round(count, runner_metrics),
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
            batch["group_index"] = groups_fitting_learners(
                batch["group_index"], group_size=config.group_size, num_learners=config.learner_shards
            )
            # A step cut short by the round limit (on_sampling_limit="train") may keep no group at
            # all: then there is nothing to train on (and a forward pass on zero rows would fail).
            has_data = bool((batch["group_index"] >= 0).any())
            if has_data and config.recompute_old_logprobs:
                batch["old_logprobs"] = self._old_logprobs(batch)
                if config.is_async:
                    self._step_extra.update(
                        add_importance_weights(
                            batch,
                            cap=config.importance_weight_cap,
                            correction=config.off_policy_correction,
                            low=config.importance_ratio_low,
                            high=config.importance_ratio_high,
                            sequence_ratio=config.off_policy_sequence_ratio,
                        )
                    )
            elif has_data:
                self._step_extra.update(take_generator_logprobs(batch))
            if has_data and config.kl_coef > 0 and config.kl_placement == "reward":
                self._step_extra.update(
                    add_reward_kl_penalty(
                        batch,
                        self._old_logprobs(batch, reference=True),
                        coef=config.kl_coef,
                        estimator=config.kl_estimator,
                        advantage_scale=config.advantage_scale,
                    )
                )

        with self.metrics.log_time((TIMERS, "update")):
            for _ in range(config.num_epochs if has_data else 0):
                for rows in minibatch_indices(
                    batch["group_index"],
                    minibatch_prompts=config.minibatch_prompts,
                    generator=self._run_state.shuffle_generator,
                ):
                    self._update(
                        minibatch_with_loss_normalizer(
                            batch, rows, loss_agg=config.loss_agg, max_response_length=config.max_response_length
                        )
                    )

        with self.metrics.log_time((TIMERS, "sync_weights")):
            self._rollouts.send_weights()

        values = self._log_step_metrics(batch, stats, rounds, time.perf_counter() - step_start)
        self._latest_samples = logged_samples(
            rounds[0],
            lambda token_ids: self._tokenizer.decode(token_ids, skip_special_tokens=False),
            count=config.log_samples,
            max_response_length=config.max_response_length,
            overlong_cache_len=config.overlong_cache_len,
            overlong_penalty_factor=config.overlong_penalty_factor,
        )
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

    def _old_logprobs(self, batch: dict[str, torch.Tensor], *, reference: bool = False) -> torch.Tensor:
        """The learners' log-probs of the batch's responses under the current weights, or with
        ``reference`` under the KL penalty's reference policy (each learner a shard)."""
        columns = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids", "response_mask")}
        num_shards = self.config.learner_shards
        results = self._weights.on_all_learners(
            lambda learner, b=columns, k=num_shards, r=reference: learner.compute_old_logprobs(b, k, reference=r)
        )
        shards = sorted(results, key=lambda pair: pair[0])
        return torch.cat([logprobs for _, logprobs in shards], dim=0)

    def _update(self, minibatch: dict[str, torch.Tensor]) -> None:
        counters = self._run_state.counters
        if float(minibatch["loss_tokens"][0]) == 0:
            # Every row masked (truncated responses under the overlong filter): the gradient is
            # zero, but an AdamW step would still decay the weights and follow its momentum. Not an
            # optimizer step, so the lr schedule stays where it is.
            counters.empty_updates_skipped += 1
            return
        rows = len(minibatch["input_ids"])
        sample_batch = SampleBatch({key: value.numpy() for key, value in minibatch.items()})
        results = self.learner_group.update(
            batch=MultiAgentBatch({DEFAULT_MODULE_ID: sample_batch}, env_steps=rows),
            # The lr schedule is keyed on this count; RLlib applies it after the update, so pass
            # the count *after* this step for the next update to run at its own rate.
            timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: counters.optimizer_steps + 1},
        )
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        if not update_was_skipped(results):
            counters.optimizer_steps += 1
            counters.consecutive_nonfinite_updates = 0
            return
        # Not an optimizer step: the lr schedule (keyed on the count) stays where it was.
        counters.nonfinite_updates_skipped += 1
        counters.consecutive_nonfinite_updates += 1
        limit = self.config.max_consecutive_nonfinite_updates
        if counters.consecutive_nonfinite_updates >= limit:
            raise NonFiniteUpdatesError(
                f"iteration {self.iteration + 1}: the last {counters.consecutive_nonfinite_updates} updates had a NaN "
                f"or infinite loss or gradient and were skipped (max_consecutive_nonfinite_updates={limit}); the "
                f"weights are those of optimizer step {counters.optimizer_steps}. Look at the rewards and advantages "
                "of this iteration's samples, lower lr, or resume from an earlier checkpoint"
            )

    def _log_step_metrics(
        self, batch: dict[str, torch.Tensor], stats: Any, rounds: list[dict[str, Any]], seconds: float
    ) -> dict[str, float]:
        counters = self._run_state.counters
        values = step_metrics(batch, stats, rounds)
        values.update(
            optimizer_steps=counters.optimizer_steps,
            nonfinite_updates_skipped=counters.nonfinite_updates_skipped,
            empty_updates_skipped=counters.empty_updates_skipped,
            # Sampling calls whose env runner died (killed, out of memory), redone on another runner.
            env_runner_failures_total=counters.env_runner_failures,
            env_runners_restored_total=self._counters["total_num_restored_workers"],
            data_epoch=self._run_state.prompt_sampler.epoch,
            step_seconds=seconds,
            torch_threads=torch.get_num_threads(),  # of this process (the Tune trial's): its CPUs
        )
        if self.config.is_async:
            values.update(self._rollouts.async_metrics(rounds))
        if "environment_turns" in rounds[0]:
            values.update(episode_metrics(rounds))
        values.update(self._rollouts.step_metrics)
        values.update(self._step_extra)
        for name, value in values.items():
            self.metrics.log_value(("dapo", name), float(value), window=1)
        self.metrics.log_value(
            ("dapo", "verifier_failures_lifetime"), values["verifier_failures"], reduce="lifetime_sum"
        )
        return values

    def _remote_learner_nodes(self) -> dict[int, str]:
        """The Ray node id of each remote learner, by its actor id (empty with a local learner)."""
        if not int(self.config.num_learners or 0):
            return {}
        answers = self.learner_group.foreach_learner(lambda _: ray.get_runtime_context().get_node_id())
        return {answer.actor_id: answer.get() for answer in answers.result_or_errors if answer.ok}

    def _learner_failure(self, error: ray.exceptions.RayActorError, lost_nodes: Sequence[str] = ()) -> Exception:
        """The error to stop the run with when a Ray actor died in a step: which learner, on which node,
        and how to go on.

        Env runners' failures never reach here (their shares are sampled again, see
        ``dapo_rl.rllib.sampling``); so a dead actor is a learner, and learners hold shards of one
        update (DDP/FSDP2 collectives), which the others cannot finish without it.
        """
        num_learners = int(self.config.num_learners or 0)
        if num_learners == 0:
            return error
        answers = self.learner_group.foreach_learner(lambda learner: True, healthy_only=False, timeout_seconds=10)
        answered = {result.actor_id for result in answers.result_or_errors if result.ok}
        actor_ids = sorted(self.learner_group._worker_manager.actor_ids())
        dead = [(index, actor_id) for index, actor_id in enumerate(actor_ids) if actor_id not in answered]
        if lost_nodes:  # the learners left were stopped here (NodeWatch): name those the node took
            dead = [(index, actor_id) for index, actor_id in dead if self._learner_nodes.get(actor_id) in lost_nodes]
        states = node_states(node_id for _, actor_id in dead if (node_id := self._learner_nodes.get(actor_id)))
        lost = [state for state in states.values() if state.lost]
        which = ", ".join(f"learner {index}" for index, _ in dead) or "a learner"
        places = "; ".join(
            states[node_id].describe() for _, actor_id in dead if (node_id := self._learner_nodes.get(actor_id))
        )
        others = (
            "the others cannot finish an update without it"
            if num_learners > 1
            else "it is the run's only learner (num_learners=1)"
        )
        placement = ""
        if lost and self.config.custom_resources_per_learner:
            placement = (
                f"; if no node left offers its learner_resources {dict(self.config.custom_resources_per_learner)}, "
                "start one (ray start ... --resources) or add --set learner_resources=... naming a resource of the "
                "nodes left"
            )
        error_class = LearnerNodeLostError if lost else LearnerFailedError
        return error_class(
            f"{which} of {num_learners} died during iteration {self.iteration + 1} ({type(error).__name__})"
            f"{f' on {places}' if places else ''}; {others}, so the run stops here. The last checkpoint holds every "
            f"learner's state: resume the run from it (dapo-rl train --resume <output folder>{placement})"
        )

    # -- weights, checkpoints and export (routes: dapo_rl.rllib.weights; files: dapo_rl.rllib.checkpoints) --

    def sync_runner_weights(self) -> None:
        """Send the learners' current weights to every env runner (and the local one)."""
        self._weights.to_runners()

    def restore_env_runners(self, env_runner_group: Any) -> list[int]:
        restored = super().restore_env_runners(env_runner_group)
        if restored and env_runner_group is self.env_runner_group:
            self._rollouts.on_runners_restored(list(restored))
        return restored

    def save_to_path(self, path: Any = None, **kwargs: Any) -> str:
        """RLlib's checkpoint; sharded learners add their shards (see ``sharded_checkpoint_dir``).

        A manifest of every file is written last (``dapo_rl.rllib.checkpoints``): a checkpoint without a
        matching one is incomplete and a resume passes it over.
        """
        path = super().save_to_path(path, **kwargs)
        folder = None
        if self._weights.sharded_learners:
            shared = self.config.sharded_checkpoint_dir
            folder = sharded_state_target(path, shared, self.iteration)
            target = os.fspath(folder)
            self._weights.on_all_learners(lambda learner: learner.save_sharded_state(target))
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
        if self._weights.sharded_learners and folder is None:
            raise FileNotFoundError(
                f"{path} holds neither {SHARDED_STATE_FOLDER}/ nor {SHARDED_STATE_POINTER}: it was not saved by "
                "sharded learners (data_parallel='fsdp2'), so their weights cannot be restored from it"
            )
        if folder is not None:
            self._previous_shard_folder = folder  # pruning keeps it until a newer checkpoint is persisted
            # Saved by sharded learners: DCP reshards onto whatever learners load it (sharded or not;
            # each unsharded learner reads the whole weights and optimizer state).
            source = os.fspath(folder)
            self._weights.on_all_learners(lambda learner: learner.load_sharded_state(source))
        if folder is not None or self.config.generation_backend == "vllm":
            # RLlib's own sync after a restore reaches neither sharded learners' weights nor engines.
            self._weights.to_runners()

    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component("dapo", components, not_components):
            state["dapo"] = self._run_state.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if "dapo" in state:
            self._run_state.set_state(state["dapo"])
            self._rollouts.abandon()

    def _policy_module_spec(self) -> RLModuleSpec:
        return self.config.get_rl_module_spec(
            spaces={DEFAULT_MODULE_ID: (TEXT_SPACE, TEXT_SPACE)}, inference_only=False
        )

    def export_policy(self, folder: str | os.PathLike[str]) -> str:
        """Write the current policy as a Hugging Face model folder (weights, config, tokenizer); with
        LoRA, the merged weights, and the adapter folder in ``folder/adapter``."""
        module = self._policy_module_spec().build()
        if self._weights.sharded_learners:
            module.set_state(self._weights.gathered_learner_state()[COMPONENT_RL_MODULE][DEFAULT_MODULE_ID])
        else:
            module.set_state(self.learner_group.get_weights()[DEFAULT_MODULE_ID])
        module.save_hf(folder)
        return os.fspath(folder)
