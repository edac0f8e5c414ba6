"""DAPO as an RLlib algorithm: config validation, Tune, DDP exactness, checkpoints, dynamic sampling,
export and weight sync; what one step computes (on scripted responses), the learner's settings (dual
clip, lr warm-up across a restore, epochs, token-mean-legacy). Tiny settings (the random-init
"tiny-qwen2" preset, 4 prompts x 4 responses of at most 8 tokens), one Ray instance for the whole
file (``ray_session`` in conftest.py)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import zlib

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray import tune
from ray.rllib.core import DEFAULT_MODULE_ID

import dapo_rl.dapo as dapo_module
import dapo_rl.distributed as distributed
from dapo_rl import DAPOConfig
from dapo_rl.core import policy_loss
from dapo_rl.core.sampling import SamplingRoundLimitError
from dapo_rl.rollout.base import GeneratedResponses
from dapo_rl.rollout.batch import pack_sequences
from dapo_rl.training import minibatch_with_loss_normalizer
from tests.helpers import ENV, ENV_CONFIG, TINY, built_algo, exception_text, learner_weights, make_config, max_abs_diff


# -- 1. validate() -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(prompts_per_step=4, minibatch_prompts=3), ["minibatch_prompts (3)", "prompts_per_step (4)"]),
        (dict(max_response_length=4, overlong_cache_len=4), ["max_response_length (4)", "overlong_cache_len (4)"]),
        (dict(max_response_length=3, overlong_cache_len=5), ["max_response_length (3)", "overlong_cache_len (5)"]),
        (dict(loss_agg="sequence-sum"), ["loss_agg", "'sequence-sum'", "token-mean"]),
        (dict(group_size=1), ["group_size must be >= 2", "got 1"]),
        (dict(env=None), ["env must be", "None"]),
        # 1 prompt x 3 responses = 3 rows per update cannot be split over 2 learners.
        (dict(group_size=3, minibatch_prompts=1, num_learners=2), ["= 3)", "num_learners (2)"]),
    ],
    ids=["minibatch", "overlong-equal", "overlong-greater", "loss-agg", "group-size", "no-env", "learner-rows"],
)
def test_validate_rejects_inconsistent_settings(settings, expected):
    settings = dict(settings)
    env = settings.pop("env", ENV)
    num_learners = settings.pop("num_learners", None)
    config = make_config(env=env, **settings)
    if num_learners is not None:
        config.learners(num_learners=num_learners)
    with pytest.raises(ValueError) as info:
        config.validate()
    message = str(info.value)
    for text in expected:
        assert text in message, f"{text!r} not in: {message}"


def test_validate_accepts_consistent_settings():
    for config in (make_config(), make_config(group_size=3, minibatch_prompts=2).learners(num_learners=2)):  # 6 rows / 2
        assert config._dapo_problems() == []
        config.validate()  # RLlib's own checks pass too


def test_rllibs_validation_switch_skips_dapos_checks_too():
    with pytest.raises(dapo_module.InvalidConfigError, match="group_size"):
        make_config(group_size=0).validate()
    make_config(group_size=0).experimental(_validate_config=False).validate()


def test_training_rejects_unknown_key():
    with pytest.raises(TypeError, match="unknown_key"):
        DAPOConfig().training(unknown_key=1)
    with pytest.raises(TypeError, match="group_sise"):
        DAPOConfig().training(group_sise=4)


# -- 2. Tune -----------------------------------------------------------------------------------------


def test_tune_runs_two_iterations_with_metrics(ray_session, tmp_path):
    tuner = tune.Tuner(
        "DAPO",  # registered by `import dapo_rl`
        # Unfiltered: the random-init model's responses mostly run to the limit, and a mini-batch
        # without loss tokens is skipped (no learner metrics).
        param_space=make_config(overlong_filter=False),
        run_config=tune.RunConfig(
            name="dapo_tune_test", stop={"training_iteration": 2}, storage_path=str(tmp_path), verbose=0
        ),
    )
    results = tuner.fit()
    assert results.num_errors == 0, [str(r.error) for r in results]
    metrics = results[0].metrics
    assert metrics["training_iteration"] == 2
    dapo = metrics["dapo"]
    # Counts that follow from the config (4 prompts x 4 responses, 2 mini-batches of 8 rows, no
    # dynamic sampling): what each metric measures is checked against scripted responses below.
    assert dapo["prompts_generated"] == TINY["prompts_per_step"]
    assert dapo["prompts_trained"] == TINY["prompts_per_step"]
    assert dapo["kept_group_ratio"] == 1.0
    assert dapo["sampling_rounds"] == 1
    assert dapo["optimizer_steps"] == 4  # 2 iterations x 2 mini-batches
    # Without dynamic sampling the trained responses are the generated ones.
    assert dapo["train_accuracy"] == dapo["generated_accuracy"]
    responses = TINY["prompts_per_step"] * TINY["group_size"]
    assert dapo["generated_tokens_per_second"] == pytest.approx(
        dapo["response_length_mean"] * responses / dapo["generate_seconds"], rel=1e-6)
    learner = metrics["learners"][DEFAULT_MODULE_ID]
    for key in ("policy_loss", "clip_frac_high", "clip_frac_low", "entropy", "approx_kl"):
        assert math.isfinite(learner[key]), key
    # The random-init tiny model is close to uniform over its 258 tokens (entropy log 258 = 5.55).
    assert learner["entropy"] > 0.95 * math.log(258)
    # 0 when the last update's groups were uniform (the random-init model's answers are mostly all
    # truncated alike); gradients' flow is checked by the learning and equivalence tests.
    assert math.isfinite(learner["gradients_default_optimizer_global_norm"])
    assert learner["default_optimizer_learning_rate"] == pytest.approx(TINY["lr"])  # no warm-up
    rows_per_update = TINY["minibatch_prompts"] * TINY["group_size"]
    assert learner["num_module_steps_trained"] == 2 * rows_per_update  # this iteration's 2 updates
    assert learner["num_module_steps_trained_lifetime"] == 4 * rows_per_update
    assert metrics["env_runners"]["num_env_steps_sampled_lifetime"] == 2 * responses
    for timer in ("generate_and_score", "old_logprobs", "update", "sync_weights", "training_iteration"):
        assert timer in metrics["timers"], timer


# -- 3. num_learners=2 equals num_learners=0 -----------------------------------------------------------


def _unequal_minibatch(algo) -> dict[str, torch.Tensor]:
    """8 rows (2 groups of 4) with very unequal response lengths: shard 0 (rows 0-3) holds 7 loss
    tokens, shard 1 (rows 4-7) 31, and their advantages have opposite signs, so a per-shard token
    mean differs clearly from the mini-batch's token mean. Old log-probs are the current ones,
    perturbed so that both clip sides are hit."""
    generator = torch.Generator().manual_seed(7)
    prompt_lengths = [3, 5, 4, 6, 2, 5, 3, 4]
    response_lengths = [1, 2, 1, 3, 8, 8, 7, 8]
    prompts = [torch.randint(2, 250, (n,), generator=generator).tolist() for n in prompt_lengths]
    responses = [torch.randint(2, 250, (n,), generator=generator).tolist() for n in response_lengths]
    packed = pack_sequences(prompts, responses, pad_token_id=algo._tokenizer.pad_token_id)
    batch = {key: packed[key] for key in ("input_ids", "attention_mask", "position_ids", "response_mask")}
    batch["token_mask"] = packed["response_mask"].clone()
    batch["advantages"] = torch.tensor([1.5, 0.5, 1.0, 0.8, -1.0, -0.5, -1.2, -0.3])
    current = algo._old_logprobs(batch)
    noise = 0.4 * torch.randn(current.shape, generator=generator)
    batch["old_logprobs"] = (current + noise) * batch["response_mask"]
    config = algo.config
    return minibatch_with_loss_normalizer(batch, torch.arange(8), loss_agg=config.loss_agg, max_response_length=config.max_response_length)


def _minibatch_losses(algo, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(the mini-batch's token-mean loss, the average of the two shards' own token means)."""
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
    with torch.no_grad():
        logprobs = module.forward_train(batch)["logprobs"]
    config = algo.config

    def loss(rows: slice, normalizer: float) -> float:
        value, _ = policy_loss(
            logprobs[rows], batch["old_logprobs"][rows], batch["advantages"][rows], batch["token_mask"][rows],
            clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=config.dual_clip,
            agg=config.loss_agg, normalizer=normalizer,
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
        backends = [r.get() for r in algo_ddp.learner_group.foreach_learner(
            lambda learner: (type(learner.module[DEFAULT_MODULE_ID]).__name__, torch.distributed.get_world_size()))]
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
        for key in ("policy_loss", "total_loss", "entropy", "approx_kl", "approx_kl_k1", "ratio_mean",
                    "clip_frac_high", "clip_frac_low"):
            assert ddp[key] == pytest.approx(local[key], rel=1e-5, abs=1e-6), key
        assert ddp["num_tokens"] == local["num_tokens"]  # summed over shards
        grad_key = "gradients_default_optimizer_global_norm"
        assert ddp[grad_key] == pytest.approx(local[grad_key], rel=1e-5)
        after_local, after_ddp = learner_weights(algo_local), learner_weights(algo_ddp)
        assert max_abs_diff(initial, after_local) > 1e-4  # the weights did move (by about lr)
        assert max_abs_diff(after_local, after_ddp) < 1e-5

        # One update on a mini-batch with very unequal shards, fed to both.
        batch = _unequal_minibatch(algo_local)
        global_loss, naive_loss = _minibatch_losses(algo_local, batch)
        assert abs(global_loss - naive_loss) > 0.1  # a per-shard token mean would be wrong here
        stats = []
        for algo in (algo_local, algo_ddp):
            algo._update({key: value.clone() for key, value in batch.items()})
            stats.append(algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID])
        assert float(stats[0]["policy_loss"]) == pytest.approx(global_loss, rel=1e-5, abs=1e-6)
        assert float(stats[1]["policy_loss"]) == pytest.approx(global_loss, rel=1e-5, abs=1e-6)
        assert float(stats[0]["clip_frac_high"]) > 0 and float(stats[0]["clip_frac_low"]) > 0  # both clips hit
        for key in ("entropy", "approx_kl", "ratio_mean", "clip_frac_high", "clip_frac_low",
                    "gradients_default_optimizer_global_norm"):
            assert float(stats[1][key]) == pytest.approx(float(stats[0][key]), rel=1e-5, abs=1e-6), key
        assert max_abs_diff(learner_weights(algo_local), learner_weights(algo_ddp)) < 1e-5
        # Both DDP ranks hold the same weights.
        rank_weights = [r.get() for r in algo_ddp.learner_group.foreach_learner(
            lambda learner: {k: v.detach().numpy().copy() for k, v in
                             learner.module[DEFAULT_MODULE_ID].unwrapped().state_dict().items()})]
        assert max_abs_diff(rank_weights[0], rank_weights[1]) == 0.0
    finally:
        algo_local.stop()
        algo_ddp.stop()


# -- 4. checkpoint, restored in a new process ----------------------------------------------------------

_RESTORE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import ray
    import ray.tune.trainable.trainable as trainable_module
    trainable_module.DEFAULT_STORAGE_PATH = sys.argv[3]
    ray.init(address=sys.argv[1], log_to_driver=False)
    from ray.rllib.algorithms.algorithm import Algorithm
    algo = Algorithm.from_checkpoint(sys.argv[2])
    result = algo.train()
    weights = algo.learner_group.get_weights()["default_policy"]
    np.savez(sys.argv[4], **{k: np.asarray(v) for k, v in weights.items()})
    learner = result["learners"]["default_policy"]
    print("RESULT " + json.dumps({
        "type": type(algo).__name__,
        "training_iteration": int(result["training_iteration"]),
        "dapo": {k: float(v) for k, v in result["dapo"].items() if not k.endswith("seconds")},
        "policy_loss": float(learner["policy_loss"]),
        "grad_norm": float(learner["gradients_default_optimizer_global_norm"]),
    }))
    algo.stop()
    """
)

_TIMING_KEYS = ("generate_seconds", "score_seconds", "step_seconds", "generated_tokens_per_second")


def test_checkpoint_restored_in_new_process_continues_identically(ray_session, tmp_path):
    config = make_config(overlong_filter=False)
    with built_algo(config) as algo:
        algo.train()
        checkpoint = str(tmp_path / "checkpoint")
        algo.save_to_path(checkpoint)
        expected = algo.train()  # the uninterrupted run's iteration 2
        expected_weights = learner_weights(algo)

    script = tmp_path / "restore.py"
    script.write_text(_RESTORE_SCRIPT)
    weights_file = tmp_path / "restored_weights.npz"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(script), ray_session["address"], checkpoint, ray_session["results"], str(weights_file)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-3000:] + completed.stderr[-5000:]
    restored = json.loads(lines[-1][len("RESULT "):])

    assert restored["type"] == "DAPO"
    assert restored["training_iteration"] == 2
    for key, value in expected["dapo"].items():
        if key in _TIMING_KEYS:
            continue
        assert restored["dapo"][key] == pytest.approx(float(value), rel=1e-6, abs=1e-6), key
    learner = expected["learners"][DEFAULT_MODULE_ID]
    assert restored["policy_loss"] == pytest.approx(float(learner["policy_loss"]), rel=1e-6, abs=1e-6)
    assert restored["grad_norm"] == pytest.approx(float(learner["gradients_default_optimizer_global_norm"]), rel=1e-6)
    with np.load(weights_file) as restored_weights:
        assert max_abs_diff(expected_weights, dict(restored_weights)) <= 1e-6


# -- 5. dynamic sampling -----------------------------------------------------------------------------

ALL_WRONG = dict(dynamic_sampling=True, max_sampling_rounds=2, generation_batch_prompts=4)


def test_dynamic_sampling_limit_error_names_limit_rounds_and_kept(ray_session):
    # The random model never answers an arithmetic problem right: every group is all wrong.
    with built_algo(make_config(**ALL_WRONG, on_sampling_limit="error")) as algo:
        with pytest.raises(Exception) as info:
            algo.train()
    text = exception_text(info.value)
    assert "SamplingRoundLimitError" in text, text
    assert "max_sampling_rounds=2" in text and "after 2 generation rounds" in text, text
    assert "kept 0 of the 4 prompts" in text, text


def test_sampling_round_limit_error_survives_copy_and_pickle():
    # Ray/Tune copy.copy an exception raised in train() and pickle it between processes.
    import copy
    import pickle

    error = SamplingRoundLimitError(max_sampling_rounds=3, rounds=3, num_groups=1, target_groups=4)
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is SamplingRoundLimitError
        assert str(clone) == str(error)
        assert (clone.max_sampling_rounds, clone.rounds, clone.num_groups, clone.target_groups) == (3, 3, 1, 4)


def test_dynamic_sampling_limit_train_with_nothing_kept(ray_session):
    with built_algo(make_config(**ALL_WRONG, on_sampling_limit="train")) as algo:
        before = learner_weights(algo)
        result = algo.train()
        dapo = result["dapo"]
        assert dapo["sampling_rounds"] == 2
        assert dapo["sampling_limit_reached"] == 1.0
        assert dapo["prompts_trained"] == 0
        assert dapo["prompts_generated"] == 8
        assert dapo["all_wrong_group_ratio"] == 1.0
        assert dapo["optimizer_steps"] == 0
        assert math.isnan(dapo["reward_mean"])  # nothing trained on
        assert max_abs_diff(before, learner_weights(algo)) == 0.0  # no update happened
        assert algo.train()["training_iteration"] == 2  # and the run goes on


HASH_ENV = "dapo_test/HashCoin-v0"


def _hash_coin(response: str, reference: str) -> bool:
    """'Correct' for about one response in four, decided by a hash of its text: groups are mixed
    or all wrong at random, whatever the model."""
    return zlib.crc32(response.encode("utf-8")) % 4 == 0


def test_dynamic_sampling_keeps_only_mixed_groups(ray_session, monkeypatch):
    import dapo_envs

    if HASH_ENV not in gym.registry:
        dapo_envs.register_reasoning_env(
            HASH_ENV,
            dataset=[{"prompt": f"question {i}", "answer": str(i)} for i in range(32)],
            verifier=dapo_envs.Verifier(name="hash_coin", fn=_hash_coin, isolate=False),
            prompt_template="plain",
        )
    batches = []
    real_build = dapo_module.build_train_batch

    def spy(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        batches.append(batch)
        return batch

    monkeypatch.setattr(dapo_module, "build_train_batch", spy)
    algo = make_config(
        env=HASH_ENV, env_config={}, dynamic_sampling=True, generation_batch_prompts=4,
        max_sampling_rounds=8, on_sampling_limit="error", overlong_filter=False,
    ).build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
    dapo = result["dapo"]
    assert dapo["prompts_trained"] == TINY["prompts_per_step"]
    assert dapo["sampling_limit_reached"] == 0.0
    assert 0.0 < dapo["train_accuracy"] < 1.0
    assert dapo["all_wrong_group_ratio"] + dapo["all_correct_group_ratio"] > 0  # some groups were filtered out
    assert dapo["prompts_generated"] > TINY["prompts_per_step"]
    assert dapo["optimizer_steps"] == 2
    (batch,) = batches
    group_index, acc = batch["group_index"], batch["acc"].float()
    assert sorted(torch.unique(group_index).tolist()) == [0, 1, 2, 3]
    for group in range(4):
        group_acc = acc[group_index == group]
        assert len(group_acc) == TINY["group_size"]
        assert 0 < float(group_acc.mean()) < 1, f"group {group} is not mixed: {group_acc.tolist()}"


# -- 6 and 7. export and weight sync (one trained algorithm) -------------------------------------------


@pytest.fixture(scope="module")
def trained_algo(ray_session):
    algo = make_config(overlong_filter=False).build_algo()
    initial = {k: np.array(v, copy=True) for k, v in algo.env_runner.module.get_state().items()}
    algo.train()
    yield algo, initial
    algo.stop()


def test_export_policy_loads_with_transformers(trained_algo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    algo, _ = trained_algo
    folder = algo.export_policy(tmp_path / "policy")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    learner = {key.removeprefix("causal_lm."): value for key, value in learner_weights(algo).items()}
    exported = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    assert set(learner) <= set(exported)
    assert max_abs_diff(learner, {key: exported[key] for key in learner}) == 0.0
    module_tokenizer = algo.env_runner.module.tokenizer
    text = "What is 12 + 30? Answer: 42"
    assert tokenizer(text).input_ids == module_tokenizer(text).input_ids
    assert tokenizer.eos_token_id == module_tokenizer.eos_token_id
    assert tokenizer.pad_token_id == module_tokenizer.pad_token_id


def test_env_runner_weights_follow_the_learner(trained_algo):
    algo, initial = trained_algo
    learner = learner_weights(algo)
    runner = {k: np.asarray(v) for k, v in algo.env_runner.module.get_state().items()}
    assert max_abs_diff(initial, learner) > 0  # training changed the weights ...
    assert max_abs_diff(runner, learner) == 0.0  # ... and the env runner has the new ones


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
    import dapo_rl.learner

    splits = []
    original = dapo_rl.learner.token_budget_micro_batches
    monkeypatch.setattr(
        dapo_rl.learner, "token_budget_micro_batches", lambda *a, **k: splits.append(original(*a, **k)) or splits[-1]
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


def test_eval_command_reads_a_training_checkpoint(trained_algo, tmp_path, capsys):
    """`dapo-rl eval --model CHECKPOINT` evaluates the checkpoint's policy (exported on the fly)."""
    import json

    from dapo_rl.cli import main

    checkpoint = tmp_path / "checkpoint"
    algo, _ = trained_algo
    algo.save_to_path(str(checkpoint))
    assert main(["eval", "--model", str(checkpoint), "--env", "dapo/Arithmetic-v0", "--samples", "2",
                 "--problems", "3", "--max-new-tokens", "4", "--env-config", "split=test"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") :])
    assert result["num_problems"] == 3 and result["samples"] == 2


# -- 7. sharded learners (FSDP2) -------------------------------------------------------------------------


def gathered_weights(algo) -> dict[str, np.ndarray]:
    state = algo._gathered_learner_state()["rl_module"][DEFAULT_MODULE_ID]
    return {key: value.numpy().copy() for key, value in state.items()}


def test_sharded_learners_match_one_learner_and_restore_from_sharded_checkpoint(ray_session, tmp_path):
    """FSDP2 over 2 gloo learners, with micro-batches: the update of one learner; checkpoints shard."""
    from ray.rllib.algorithms.algorithm import Algorithm
    from transformers import AutoModelForCausalLM

    from dapo_rl.checkpoints import export_checkpoint

    settings = dict(overlong_filter=False, lr=1e-3)
    algo_local = make_config(**settings).build_algo()
    shared = tmp_path / "shared_shards"  # where learners on several nodes would write their shards
    sharded_config = make_config(**settings, data_parallel="fsdp2", micro_batch_tokens=40,
                                 sharded_checkpoint_dir=str(shared)).learners(num_learners=2)
    algo_sharded = sharded_config.build_algo()
    restored = None
    try:
        modules = [r.get() for r in algo_sharded.learner_group.foreach_learner(
            lambda learner: (type(learner.module[DEFAULT_MODULE_ID]).__name__,
                             type(next(learner.module[DEFAULT_MODULE_ID].parameters())).__name__))]
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
                float(expected["learners"][DEFAULT_MODULE_ID][key]), rel=1e-6, abs=1e-7), key
        assert max_abs_diff(gathered_weights(restored), expected_weights) <= 1e-6
    finally:
        for algo in (algo_local, algo_sharded, restored):
            if algo is not None:
                algo.stop()


def test_validate_rejects_unknown_data_parallel():
    config = make_config(data_parallel="zero3")
    with pytest.raises(ValueError, match=r"data_parallel must be one of \['ddp', 'fsdp2'\], got 'zero3'"):
        config.validate()


# -- 8. what one step computes, on scripted responses ---------------------------------------------------
#
# The local env runner's backend is replaced by a script that answers each prompt with known texts
# (right or wrong, finished or truncated, of chosen lengths); the rest of the step -- verifier,
# shaping, dynamic sampling, advantages, updates, metrics -- is the real one. Every expectation is
# recomputed here from the script with the paper's formulas, not with the library's functions.

ARITHMETIC_PROMPT = re.compile(r"What is (\d+) \+ (\d+)\?")
#: Lengths for the scripts: E = 16 - 12 = 4 tokens, so every scripted response (10 to 16 tokens)
#: lies in the overlong cache window and each length has its own penalty (E - len) / 12.
SCRIPTED = dict(max_response_length=16, overlong_cache_len=12)
MIXED, ALL_RIGHT, ALL_WRONG_GROUP = "mixed", "all right", "all wrong"


def scripted_group(kind: str, answer: int) -> list[tuple[str, bool, bool]]:
    """(text, finished, correct) of the 4 responses a group of ``kind`` gets."""
    right, wrong = f"Answer: {answer}", f"Answer: {answer + 1}"
    if kind == MIXED:
        return [(right, True, True), (wrong, True, False), (" " + right, True, True), ("x" * 16, False, False)]
    if kind == ALL_RIGHT:
        return [(" " * k + right, True, True) for k in range(4)]
    return [(" " * k + wrong, True, False) for k in range(4)]


class ScriptedGeneration:
    """Replaces the local env runner's generation: prompt i of each call gets ``kinds[i % len]``."""

    def __init__(self, algo, kinds: list[str]) -> None:
        self.tokenizer = algo._tokenizer
        self.kinds = kinds
        self.calls: list[list[dict]] = []  # per generate call, per prompt: prompt, answer, kind, rows
        algo.env_runner.backend.generate = self.generate

    def generate(self, prompt_token_ids, sampling, *, seed):
        token_ids, finished, call = [], [], []
        eos = self.tokenizer.eos_token_id
        for index, ids in enumerate(prompt_token_ids):
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            answer = sum(int(x) for x in ARITHMETIC_PROMPT.search(prompt).groups())
            kind = self.kinds[index % len(self.kinds)]
            rows = []
            for text, done, correct in scripted_group(kind, answer):
                response = self.tokenizer.encode(text, add_special_tokens=False) + ([eos] if done else [])
                assert len(response) == sampling.max_new_tokens or (done and len(response) < sampling.max_new_tokens)
                token_ids.append(response)
                finished.append(done)
                rows.append(dict(text=text, length=len(response), truncated=not done, correct=correct))
            assert len(rows) == sampling.n
            call.append(dict(prompt=prompt, answer=answer, kind=kind, rows=rows))
        self.calls.append(call)
        return GeneratedResponses(token_ids=token_ids, finished=finished)


def overlong_penalty(length: int, max_len: int = 16, cache: int = 12) -> float:
    """Paper Eq. 13."""
    expected = max_len - cache
    if length <= expected:
        return 0.0
    return (expected - length) / cache if length <= max_len else -1.0


def shaped_reward(row: dict) -> float:
    return (1.0 if row["correct"] else -1.0) + overlong_penalty(row["length"])


def hand_group_advantages(rewards: list[float]) -> list[float]:
    """(R - mean) / (std + 1e-6) within one group, unbiased std; 0 for a constant group."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.max() == values.min():
        return [0.0] * len(values)
    return list((values - values.mean()) / (values.std(ddof=1) + 1e-6))


#: One round of 7 prompts, 4 of them mixed: exactly prompts_per_step informative groups.
ROUND_KINDS = [MIXED, ALL_RIGHT, MIXED, ALL_WRONG_GROUP, ALL_RIGHT, MIXED, MIXED]


@pytest.fixture(scope="module")
def scripted_step(ray_session):
    """One train() on scripted responses with dynamic sampling: 7 prompts generated, the 4 mixed
    groups trained; the rollouts collect_groups returned, and the result."""
    rounds_seen = []
    real_collect = dapo_module.collect_groups

    def spy(*args, **kwargs):
        collected, stats, rounds = real_collect(*args, **kwargs)
        rounds_seen.append(rounds)
        return collected, stats, rounds

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dapo_module, "collect_groups", spy)
        algo = make_config(**SCRIPTED, dynamic_sampling=True, generation_batch_prompts=len(ROUND_KINDS),
                           max_sampling_rounds=2, on_sampling_limit="error", log_samples=6).build_algo()
        try:
            script = ScriptedGeneration(algo, ROUND_KINDS)
            result = algo.train()
        finally:
            algo.stop()
    (rounds,) = rounds_seen
    return dict(result=result, script=script, rounds=rounds)


def test_step_metrics_follow_from_the_scripted_responses(scripted_step):
    result, (call,) = scripted_step["result"], scripted_step["script"].calls
    dapo = result["dapo"]
    generated = [row for group in call for row in group["rows"]]
    trained = [row for group in call if group["kind"] == MIXED for row in group["rows"]]
    rewards = [shaped_reward(row) for row in trained]
    advantages = [a for group in call if group["kind"] == MIXED
                  for a in hand_group_advantages([shaped_reward(row) for row in group["rows"]])]
    lengths = [row["length"] for row in generated]
    expected = {
        "reward_mean": np.mean(rewards), "reward_max": max(rewards), "reward_min": min(rewards),
        "train_accuracy": np.mean([row["correct"] for row in trained]),  # 1/2
        "generated_accuracy": np.mean([row["correct"] for row in generated]),  # 16/28
        "advantage_mean": np.mean(advantages), "advantage_max": max(advantages), "advantage_min": min(advantages),
        "response_length_mean": np.mean(lengths), "response_length_max": max(lengths),
        "response_length_min": min(lengths),
        "response_clip_ratio": np.mean([row["truncated"] for row in generated]),
        "sampling_rounds": 1, "prompts_generated": 7, "prompts_trained": 4,
        "kept_group_ratio": 4 / 7, "all_correct_group_ratio": 2 / 7, "all_wrong_group_ratio": 1 / 7,
        "sampling_limit_reached": 0.0,
        "optimizer_steps": 2,  # 4 prompts / 2 per mini-batch
    }
    for key, value in expected.items():
        assert dapo[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    assert dapo["generated_tokens_per_second"] == pytest.approx(sum(lengths) / dapo["generate_seconds"], rel=1e-6)
    # Re-scoring the responses the step logged with the environment's verifier gives its accuracy.
    (rollout,) = scripted_step["rounds"]
    assert rollout["response_text"] == [row["text"] for row in generated]
    env = gym.make(ENV, **ENV_CONFIG).unwrapped
    references = [str(group["answer"]) for group in call for _ in group["rows"]]
    rescored = env.score(rollout["response_text"], references)
    assert [r.acc for r in rescored] == [row["correct"] for row in generated]
    assert dapo["generated_accuracy"] == pytest.approx(np.mean([r.acc for r in rescored]))
    # Overlong filtering: the loss ran on the finished trained responses' tokens only.
    learner = result["learners"][DEFAULT_MODULE_ID]
    assert learner["num_tokens"] == sum(row["length"] for row in trained if not row["truncated"])
    assert result["env_runners"]["num_env_steps_sampled_lifetime"] == len(generated)


def test_log_samples_are_first_responses_of_the_round_rescored(scripted_step, ray_session):
    """result["samples"]: the first response to each of the first log_samples prompts of the step's
    first generation round (trained on or not), with the verifier's verdict and the shaped reward."""
    samples = scripted_step["result"]["samples"]
    (call,) = scripted_step["script"].calls
    assert len(samples) == min(6, len(call))  # log_samples=6, 7 prompts in the round
    env = gym.make(ENV, **ENV_CONFIG).unwrapped
    tokenizer = scripted_step["script"].tokenizer
    for sample, group in zip(samples, call[:6], strict=True):
        assert set(sample) == {"prompt", "response", "pred", "score", "reason", "reward", "acc", "truncated"}
        assert sample["prompt"] == group["prompt"]
        assert sample["response"] == group["rows"][0]["text"]
        # The reference comes from the prompt itself; the verifier re-scores the logged response.
        reference = sum(int(x) for x in ARITHMETIC_PROMPT.search(sample["prompt"]).groups())
        (verdict,) = env.score([sample["response"]], [str(reference)])
        assert (sample["acc"], sample["pred"], sample["score"], sample["reason"]) == (
            verdict.acc, verdict.pred, verdict.score, verdict.reason)
        length = len(tokenizer.encode(sample["response"], add_special_tokens=False)) + (0 if sample["truncated"] else 1)
        assert sample["reward"] == pytest.approx(verdict.score + overlong_penalty(length))
        assert sample["truncated"] == group["rows"][0]["truncated"]
    assert [s["acc"] for s in samples] == [True, True, True, False, True, True]  # both verdicts occur
    # At most the round's prompts (4 here); 0 switches samples off.
    for log_samples, expected in ((2, 2), (9, TINY["prompts_per_step"]), (0, 0)):
        with built_algo(make_config(log_samples=log_samples)) as algo:
            logged = algo.train()["samples"]
        assert len(logged) == expected, log_samples


def test_advantages_come_from_the_shaped_rewards(ray_session, monkeypatch):
    """Groups all right or all wrong, responses of different lengths in the overlong window: the
    verifier's scores are constant per group (advantage 0), the shaped rewards are not."""
    batches, minibatches = [], []
    real_build = dapo_module.build_train_batch
    monkeypatch.setattr(dapo_module, "build_train_batch",
                        lambda *a, **k: batches.append(real_build(*a, **k)) or batches[-1])
    with built_algo(make_config(**SCRIPTED, dynamic_sampling=False, overlong_filter=False)) as algo:
        script = ScriptedGeneration(algo, [ALL_RIGHT, ALL_WRONG_GROUP])
        real_update = algo._update
        algo._update = lambda minibatch: minibatches.append(minibatch["advantages"].clone()) or real_update(minibatch)
        result = algo.train()
    (call,), (batch,) = script.calls, batches
    expected = [a for group in call for a in hand_group_advantages([shaped_reward(row) for row in group["rows"]])]
    for group in range(4):  # the verifier's scores alone would give every response advantage 0
        assert len(set(batch["score"][batch["group_index"] == group].tolist())) == 1
    assert all(abs(a) > 0.3 for a in expected)
    torch.testing.assert_close(batch["advantages"], torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    # ... and these are the advantages the learner trained on, and the step reports.
    torch.testing.assert_close(torch.sort(torch.cat(minibatches)).values, torch.sort(torch.tensor(expected, dtype=torch.float32)).values)
    assert result["dapo"]["advantage_max"] == pytest.approx(max(expected), rel=1e-5)


def test_restore_continues_identically_on_steps_with_training_signal(ray_session, tmp_path):
    """Save after one step, restore into a new algorithm, step again: the same update as the
    uninterrupted run's second step. Every group is mixed, so advantages, loss and gradients are not
    zero, and the mini-batches' composition (the shuffle generator) changes the weights."""
    settings = dict(**SCRIPTED, overlong_filter=False)
    with built_algo(make_config(**settings)) as algo:
        ScriptedGeneration(algo, [MIXED])
        algo.train()
        checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
        expected = algo.train()
        expected_weights = learner_weights(algo)
    expected_learner = expected["learners"][DEFAULT_MODULE_ID]
    assert expected_learner["gradients_default_optimizer_global_norm"] > 0 and expected_learner["policy_loss"] != 0

    with built_algo(make_config(**settings)) as restored:
        restored.restore_from_path(checkpoint)
        ScriptedGeneration(restored, [MIXED])
        got = restored.train()
        got_weights = learner_weights(restored)
    got_learner = got["learners"][DEFAULT_MODULE_ID]
    for key in ("policy_loss", "gradients_default_optimizer_global_norm", "entropy"):
        assert float(got_learner[key]) == pytest.approx(float(expected_learner[key]), rel=1e-6, abs=1e-9), key
    assert max_abs_diff(expected_weights, got_weights) <= 1e-6


# -- 9. learner settings through RLlib: dual clip, lr warm-up, epochs, token-mean-legacy ----------------


def hand_loss(algo, batch: dict[str, torch.Tensor], rows=slice(None), *, dual_clip=None, agg="token-mean"):
    """(loss, metrics, gradient norm) of ``policy_loss`` on ``rows`` of a mini-batch under the local
    learner's current weights (one pass over those rows, their own normaliser)."""
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
    parameters = [p for p in module.parameters() if p.requires_grad]
    piece = {key: value[rows] for key, value in batch.items()}
    logprobs = module.forward_train(piece)["logprobs"]
    config = algo.config
    loss, metrics = policy_loss(
        logprobs, piece["old_logprobs"], piece["advantages"], piece["token_mask"],
        clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=dual_clip, agg=agg,
    )
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    norm = math.sqrt(sum(float(g.square().sum()) for g in gradients if g is not None))
    return float(loss.detach()), metrics, norm


def test_dual_clip_bounds_the_loss_of_negative_advantage_tokens(ray_session):
    with built_algo(make_config(overlong_filter=False, dual_clip=3.0)) as algo:
        learner = algo.train()["learners"][DEFAULT_MODULE_ID]
        assert learner["dual_clip_frac"] == 0.0  # on-policy ratios stay far below the bound 3

        batch = _unequal_minibatch(algo)
        # Rows 4-7 have negative advantages: every other token of theirs gets ratio e^1.5 = 4.5 > 3.
        current = algo._old_logprobs(batch)
        shift = torch.zeros_like(current)
        shift[4:, ::2] = 1.5
        batch["old_logprobs"] = torch.where(shift > 0, current - shift, batch["old_logprobs"]) * batch["response_mask"]
        with_dual, metrics, norm = hand_loss(algo, batch, dual_clip=3.0)
        without, _, norm_without = hand_loss(algo, batch, dual_clip=None)
        assert metrics["dual_clip_frac"] > 0.2 and without - with_dual > 0.1  # the bound is active here
        assert abs(norm - norm_without) > 1e-3 * norm
        algo._update(batch)
        logged = algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]
    assert float(logged["policy_loss"]) == pytest.approx(with_dual, rel=1e-5, abs=1e-6)
    assert float(logged["dual_clip_frac"]) == pytest.approx(metrics["dual_clip_frac"], rel=1e-6)
    assert float(logged["gradients_default_optimizer_global_norm"]) == pytest.approx(norm, rel=1e-4)


def record_step_lrs(algo) -> list[float]:
    """The learning rate of every optimizer step the local learner takes from now on."""
    optimizer = algo.learner_group._learner._only_optimizer()
    rates: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(float(opt.param_groups[0]["lr"])))
    return rates


def test_lr_warmup_per_optimizer_step_survives_save_and_restore(ray_session, tmp_path):
    lr, warmup = 1e-4, 4
    settings = dict(overlong_filter=False, lr=lr, lr_warmup_steps=warmup)  # 2 updates per iteration

    def rate(k: int) -> float:
        return lr * min(1.0, (k + 1) / warmup)

    with built_algo(make_config(**settings)) as algo:
        rates = record_step_lrs(algo)
        results = [algo.train()]
        checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
        results.append(algo.train())
        weights_after_2 = learner_weights(algo)
        results.append(algo.train())
    assert rates == pytest.approx([rate(k) for k in range(6)], rel=1e-6)
    # RLlib logs, after each update, the rate the schedule sets for the next one; an iteration
    # reports the mean over its 2 updates.
    logged = [float(r["learners"][DEFAULT_MODULE_ID]["default_optimizer_learning_rate"]) for r in results]
    assert logged == pytest.approx([(rate(2 * i + 1) + rate(2 * i + 2)) / 2 for i in range(3)], rel=1e-6)

    with built_algo(make_config(**settings)) as restored:
        restored.restore_from_path(checkpoint)
        restored_rates = record_step_lrs(restored)
        result = restored.train()
        restored_weights = learner_weights(restored)
    assert restored_rates == pytest.approx(rates[2:4], rel=1e-6)  # [3/4, 1] x lr, as uninterrupted
    expected, got = results[1]["learners"][DEFAULT_MODULE_ID], result["learners"][DEFAULT_MODULE_ID]
    for key in ("default_optimizer_learning_rate", "policy_loss", "gradients_default_optimizer_global_norm"):
        assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-6, abs=1e-9), key
    assert result["dapo"]["optimizer_steps"] == 4
    assert max_abs_diff(restored_weights, weights_after_2) <= 1e-6


def test_two_epochs_take_twice_the_optimizer_steps_on_the_same_batch(ray_session):
    runs = []
    for epochs in (1, 2):
        with built_algo(make_config(overlong_filter=False, num_epochs=epochs)) as algo:
            before = learner_weights(algo)
            rates = record_step_lrs(algo)
            result = algo.train()
            optimizer = algo.learner_group._learner._only_optimizer()
            adam_steps = {int(state["step"]) for state in optimizer.state.values()}
            runs.append(dict(result=result, steps=len(rates), adam_steps=adam_steps, weights=learner_weights(algo)))
    one, two = runs
    assert (one["steps"], two["steps"]) == (2, 4)  # optimizer.step() calls on the learner
    assert (one["adam_steps"], two["adam_steps"]) == ({2}, {4})
    assert (one["result"]["dapo"]["optimizer_steps"], two["result"]["dapo"]["optimizer_steps"]) == (2, 4)
    for key in ("reward_mean", "response_length_mean", "advantage_max"):  # the same generated batch
        assert one["result"]["dapo"][key] == two["result"]["dapo"][key], key
    assert max_abs_diff(before, one["weights"]) > 1e-5
    assert max_abs_diff(one["weights"], two["weights"]) > 1e-5  # the second epoch moved them further


def test_token_mean_legacy_weights_each_micro_batch_token_mean_by_its_rows(ray_session, monkeypatch):
    """verl's old aggregation: sum over micro-batches of (micro-batch token mean x micro rows / rows);
    token-mean on the same micro-batches stays the one-pass token mean."""
    import dapo_rl.learner

    splits = []
    original = dapo_rl.learner.token_budget_micro_batches
    monkeypatch.setattr(dapo_rl.learner, "token_budget_micro_batches",
                        lambda *a, **k: splits.append(original(*a, **k)) or splits[-1])
    budget = 40  # padded tokens: _unequal_minibatch's 8 rows split into 3 / 4 / 1 rows
    logged, one_pass, legacy = {}, {}, {}
    for agg in ("token-mean-legacy", "token-mean"):
        with built_algo(make_config(overlong_filter=False, loss_agg=agg, micro_batch_tokens=budget)) as algo:
            batch = _unequal_minibatch(algo)
            micro_batches = original(batch, budget)
            tokens = [int(batch["token_mask"][rows].sum()) for rows in micro_batches]
            assert len(micro_batches) == 3 and len(set(tokens)) == 3, tokens
            one_pass[agg] = hand_loss(algo, batch)[0]
            legacy[agg] = sum(hand_loss(algo, batch, rows)[0] * len(rows) / len(batch["token_mask"])
                              for rows in micro_batches)
            splits.clear()
            algo._update(batch)
            assert [rows.tolist() for rows in splits[0]] == [rows.tolist() for rows in micro_batches]
            logged[agg] = float(algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]["policy_loss"])
    # Both algorithms started from the same weights and got the same mini-batch.
    assert one_pass["token-mean"] == pytest.approx(one_pass["token-mean-legacy"], rel=1e-6)
    assert abs(legacy["token-mean"] - one_pass["token-mean"]) > 0.05  # the micro-batches' token counts differ
    assert logged["token-mean-legacy"] == pytest.approx(legacy["token-mean-legacy"], rel=1e-5, abs=1e-6)
    assert logged["token-mean"] == pytest.approx(one_pass["token-mean"], rel=1e-5, abs=1e-6)


# -- 10. validation: the model, its context, the generation round -----------------------------------


def test_validate_without_a_model_names_model_config():
    config = DAPOConfig().environment(ENV, env_config=ENV_CONFIG).training(**TINY)
    with pytest.raises(ValueError) as info:
        config.validate()
    assert "model_config" in str(info.value)


def test_validate_names_lengths_beyond_the_tiny_context():
    config = make_config(max_prompt_length=500, max_response_length=100, overlong_cache_len=4)
    with pytest.raises(ValueError) as info:
        config.validate()
    message = str(info.value)
    for text in ("max_prompt_length (500)", "max_response_length (100)", "512"):
        assert text in message, message
    make_config(max_prompt_length=500, max_response_length=12, overlong_cache_len=4).validate()  # 512 fits


def test_generation_rounds_default_to_three_times_the_prompts_per_step(ray_session):
    assert DAPOConfig().generation_round_prompts == 3 * 512  # the paper's 1,536
    config = make_config(dynamic_sampling=True, generation_batch_prompts=None, max_sampling_rounds=1,
                         on_sampling_limit="train")
    assert config.generation_round_prompts == 3 * TINY["prompts_per_step"]
    with built_algo(config) as algo:
        calls = []
        backend = algo.env_runner.backend
        real_generate = backend.generate
        backend.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or real_generate(prompts, *a, **k)
        dapo = algo.train()["dapo"]
    assert calls == [12]  # one round (the limit) of 3 x 4 prompts
    assert dapo["prompts_generated"] == 12 and dapo["sampling_rounds"] == 1
