"""The learners: two learners (DDP) match one, bf16 with activation checkpointing, token-budget
micro-batches, and FSDP2 sharded learners with their sharded checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

import dapo_rl.models.distributed as distributed
from dapo_rl.core import policy_loss
from tests.helpers import (
    TINY,
    built_algo,
    learner_weights,
    make_config,
    max_abs_diff,
    unequal_minibatch,
)


def _minibatch_losses(algo, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(the mini-batch's token-mean loss, the average of the two shards' own token means)."""
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
    with torch.no_grad():
        logprobs = module.forward_train(batch)["logprobs"]
    config = algo.config

    def loss(rows: slice, normalizer: float) -> float:
        value, _ = policy_loss(
            logprobs[rows],
            batch["old_logprobs"][rows],
            batch["advantages"][rows],
            batch["token_mask"][rows],
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            dual_clip=config.dual_clip,
            agg=config.loss_agg,
            normalizer=normalizer,
        )
        return float(value)

    total = float(batch["token_mask"].sum())
    shards = [slice(0, 4), slice(4, 8)]
    naive = sum(loss(rows, float(batch["token_mask"][rows].sum())) for rows in shards) / 2
    return loss(slice(0, 8), total), naive


def test_two_learners_match_one_learner(ray_session):
    # Overlong filtering off: the random model's responses are mostly truncated, and filtering
    # would leave almost no loss tokens.
    settings = dict(overlong_filter=False, lr=1e-3)
    algo_local = make_config(**settings).build_algo()
    algo_ddp = make_config(**settings).learners(num_learners=2).build_algo()
    try:
        backends = [
            r.get()
            for r in algo_ddp.learner_group.foreach_learner(
                lambda learner: (type(learner.module[DEFAULT_MODULE_ID]).__name__, torch.distributed.get_world_size())
            )
        ]
        assert backends == [("TorchDDPRLModule", 2)] * 2
        initial = learner_weights(algo_local)
        assert max_abs_diff(initial, learner_weights(algo_ddp)) == 0.0

        # One whole train(): same generation (local env runner, same seed and weights), old log-probs
        # computed in shards, 2 DDP updates.
        result_local, result_ddp = algo_local.train(), algo_ddp.train()
        for key in ("response_length_mean", "response_length_min", "reward_mean", "advantage_max"):
            assert result_local["dapo"][key] == result_ddp["dapo"][key], key  # the very same batch
        assert result_local["dapo"]["response_length_min"] < TINY["max_response_length"]  # unequal lengths
        local, ddp = result_local["learners"][DEFAULT_MODULE_ID], result_ddp["learners"][DEFAULT_MODULE_ID]
        # Metrics too: RLlib averages them over learners, the learner scales them for that.
        for key in (
            "policy_loss",
            "total_loss",
            "entropy",
            "approx_kl",
            "approx_kl_k1",
            "ratio_mean",
            "clip_frac_high",
            "clip_frac_low",
        ):
            assert ddp[key] == pytest.approx(local[key], rel=1e-5, abs=1e-6), key
        assert ddp["num_tokens"] == local["num_tokens"]  # summed over shards
        grad_key = "gradients_default_optimizer_global_norm"
        assert ddp[grad_key] == pytest.approx(local[grad_key], rel=1e-5)
        after_local, after_ddp = learner_weights(algo_local), learner_weights(algo_ddp)
        assert max_abs_diff(initial, after_local) > 1e-4  # the weights did move (by about lr)
        assert max_abs_diff(after_local, after_ddp) < 1e-5

        # One update on a mini-batch with very unequal shards, fed to both.
        batch = unequal_minibatch(algo_local)
        global_loss, naive_loss = _minibatch_losses(algo_local, batch)
        assert abs(global_loss - naive_loss) > 0.1  # a per-shard token mean would be wrong here
        stats = []
        for algo in (algo_local, algo_ddp):
            algo._update({key: value.clone() for key, value in batch.items()})
            stats.append(algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID])
        assert float(stats[0]["policy_loss"]) == pytest.approx(global_loss, rel=1e-5, abs=1e-6)
        assert float(stats[1]["policy_loss"]) == pytest.approx(global_loss, rel=1e-5, abs=1e-6)
        assert float(stats[0]["clip_frac_high"]) > 0 and float(stats[0]["clip_frac_low"]) > 0  # both clips hit
        for key in (
            "entropy",
            "approx_kl",
            "ratio_mean",
            "clip_frac_high",
            "clip_frac_low",
            "gradients_default_optimizer_global_norm",
        ):
            assert float(stats[1][key]) == pytest.approx(float(stats[0][key]), rel=1e-5, abs=1e-6), key
        assert max_abs_diff(learner_weights(algo_local), learner_weights(algo_ddp)) < 1e-5
        # Both DDP ranks hold the same weights.
        rank_weights = [
            r.get()
            for r in algo_ddp.learner_group.foreach_learner(
                lambda learner: {
                    k: v.detach().numpy().copy()
                    for k, v in learner.module[DEFAULT_MODULE_ID].unwrapped().state_dict().items()
                }
            )
        ]
        assert max_abs_diff(rank_weights[0], rank_weights[1]) == 0.0
    finally:
        algo_local.stop()
        algo_ddp.stop()


def test_bf16_mixed_precision_with_activation_checkpointing_trains_float32_weights(ray_session):
    with built_algo(make_config(overlong_filter=False, mixed_precision="bf16", gradient_checkpointing=True)) as algo:
        before = learner_weights(algo)
        result = algo.train()
        after = learner_weights(algo)
    learner = result["learners"]["default_policy"]
    assert np.isfinite(learner["policy_loss"])
    assert all(value.dtype == np.float32 for value in after.values())
    assert max_abs_diff(before, after) > 0


def test_token_budget_micro_batches_give_the_same_update(ray_session, monkeypatch):
    """Gradient accumulation over token-budget micro-batches equals one pass over the mini-batch."""
    import dapo_rl.rllib.learner

    splits = []
    original = dapo_rl.rllib.learner.token_budget_micro_batches
    monkeypatch.setattr(
        dapo_rl.rllib.learner,
        "token_budget_micro_batches",
        lambda *a, **k: splits.append(original(*a, **k)) or splits[-1],
    )
    results, weights = [], []
    for budget in (0, 40):
        with built_algo(make_config(overlong_filter=False, micro_batch_tokens=budget)) as algo:
            results.append(algo.train()["learners"]["default_policy"])
            weights.append(learner_weights(algo))
    whole, micro = results
    assert splits and all(len(parts) > 1 for parts in splits)  # the local learner really split its updates
    # Adam divides each gradient by its own running scale, so a rounding-level difference in a
    # near-zero gradient moves that weight by ~1% of lr (measured: 0.8-1.1e-6 at lr 1e-4). The loss
    # and metrics below are the strict check: Adam's first step hides a gradient's overall scale.
    assert max_abs_diff(weights[0], weights[1]) < 5e-2 * TINY["lr"]
    for name in ("policy_loss", "clip_frac_high", "approx_kl", "entropy", "num_tokens"):
        assert micro[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-7), name


def test_two_learners_with_micro_batches_match_one_learner(ray_session):
    """DDP with token-budget micro-batches (only the last backward syncs) equals one local learner."""
    settings = dict(overlong_filter=False, lr=1e-3)
    algo_local = make_config(**settings).build_algo()
    algo_ddp = make_config(**settings, micro_batch_tokens=40).learners(num_learners=2).build_algo()
    try:
        local = algo_local.train()["learners"][DEFAULT_MODULE_ID]
        ddp = algo_ddp.train()["learners"][DEFAULT_MODULE_ID]
        assert ddp["policy_loss"] == pytest.approx(local["policy_loss"], rel=1e-5, abs=1e-6)
        grad_key = "gradients_default_optimizer_global_norm"
        assert ddp[grad_key] == pytest.approx(local[grad_key], rel=1e-5)
        # Summation order differs (micro-batches, then the all-reduce); Adam's normalised step turns
        # ~1e-7 gradient rounding on near-zero entries into up to ~1e-5 of the 1e-3 step. A shard
        # missing from the sync would move weights by the whole step (~1e-3).
        assert max_abs_diff(learner_weights(algo_local), learner_weights(algo_ddp)) < 1e-4
    finally:
        algo_local.stop()
        algo_ddp.stop()


def gathered_weights(algo) -> dict[str, np.ndarray]:
    state = algo._weights.gathered_learner_state()["rl_module"][DEFAULT_MODULE_ID]
    return {key: value.numpy().copy() for key, value in state.items()}


def test_sharded_learners_match_one_learner_and_restore_from_sharded_checkpoint(ray_session, tmp_path):
    """FSDP2 over 2 gloo learners, with micro-batches: the update of one learner; checkpoints shard."""
    from ray.rllib.algorithms.algorithm import Algorithm
    from transformers import AutoModelForCausalLM

    from dapo_rl.rllib.checkpoints import export_checkpoint

    settings = dict(overlong_filter=False, lr=1e-3)
    algo_local = make_config(**settings).build_algo()
    shared = tmp_path / "shared_shards"  # where learners on several nodes would write their shards
    sharded_config = make_config(
        **settings, data_parallel="fsdp2", micro_batch_tokens=40, sharded_checkpoint_dir=str(shared)
    ).learners(num_learners=2)
    algo_sharded = sharded_config.build_algo()
    restored = None
    try:
        modules = [
            r.get()
            for r in algo_sharded.learner_group.foreach_learner(
                lambda learner: (
                    type(learner.module[DEFAULT_MODULE_ID]).__name__,
                    type(next(learner.module[DEFAULT_MODULE_ID].parameters())).__name__,
                )
            )
        ]
        assert modules == [("CausalLMModule", "DTensor")] * 2  # sharded, not DDP-wrapped
        initial = learner_weights(algo_local)
        assert max_abs_diff(initial, gathered_weights(algo_sharded)) == 0.0

        local = algo_local.train()["learners"][DEFAULT_MODULE_ID]
        sharded = algo_sharded.train()["learners"][DEFAULT_MODULE_ID]
        assert sharded["policy_loss"] == pytest.approx(local["policy_loss"], rel=1e-5, abs=1e-6)
        grad_key = "gradients_default_optimizer_global_norm"
        assert sharded[grad_key] == pytest.approx(local[grad_key], rel=1e-5)
        after = gathered_weights(algo_sharded)
        assert max_abs_diff(initial, after) > 1e-4
        # As with DDP and micro-batches: summation order differs, a lost shard would be ~1e-3 off.
        assert max_abs_diff(learner_weights(algo_local), after) < 1e-4
        runner = {k: np.asarray(v) for k, v in algo_sharded.env_runner.module.get_state().items()}
        assert max_abs_diff(runner, after) == 0.0  # the gathered weights reached the env runner

        for attempt in ("a", "b"):  # older shard folders are pruned: the 2 newest stay
            algo_sharded.save_to_path(str(tmp_path / f"old_checkpoint_{attempt}"))
        checkpoint = algo_sharded.save_to_path(str(tmp_path / "checkpoint"))
        shard_folder = distributed.sharded_state_folder(checkpoint)
        assert shard_folder.parent == shared and (shard_folder / ".metadata").is_file()
        assert len(list(shared.iterdir())) == distributed.SHARDED_CHECKPOINTS_KEPT
        # The shards consolidate into a Hugging Face folder in this process, without any learner.
        export_checkpoint(checkpoint, tmp_path / "exported")
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", local_files_only=True).state_dict()
        assert max_abs_diff({f"causal_lm.{k}": v.numpy() for k, v in exported.items()}, after) == 0.0
        expected = algo_sharded.train()
        expected_weights = gathered_weights(algo_sharded)

        # The shards also load onto one unsharded learner (training on fewer GPUs), weights exact.
        with built_algo(make_config(**settings)) as unsharded:
            unsharded.restore_from_path(checkpoint)
            assert max_abs_diff(learner_weights(unsharded), after) == 0.0
            runner = {k: np.asarray(v) for k, v in unsharded.env_runner.module.get_state().items()}
            assert max_abs_diff(runner, after) == 0.0

        restored = Algorithm.from_checkpoint(checkpoint)
        assert max_abs_diff(gathered_weights(restored), after) == 0.0
        result = restored.train()
        for key in ("policy_loss", grad_key):
            assert result["learners"][DEFAULT_MODULE_ID][key] == pytest.approx(
                float(expected["learners"][DEFAULT_MODULE_ID][key]), rel=1e-6, abs=1e-7
            ), key
        assert max_abs_diff(gathered_weights(restored), expected_weights) <= 1e-6
    finally:
        for algo in (algo_local, algo_sharded, restored):
            if algo is not None:
                algo.stop()
