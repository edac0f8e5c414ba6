"""Faults injected into a real DAPO run (tiny preset, local learner): what the run does about them.

Non-finite numbers: NaN or inf advantages reach the real loss and backward pass; the update is
skipped with the weights and AdamW's state untouched, counted, and too many in a row stop the run
with a message naming the iteration.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

import dapo_rl.rllib.dapo as dapo_module
from dapo_rl import DAPOConfig
from dapo_rl.rllib.dapo import NonFiniteUpdatesError
from tests import helpers
from tests.helpers import ENV, TINY, UPDATES_PER_STEP, built_algo, learner_weights, max_abs_diff

#: The tiny settings at a higher lr; the random-init model's responses all run to the limit, so with
#: overlong filtering off every update has loss tokens (an update without any is skipped, not stepped).
RELIABILITY = dict(lr=1e-3, overlong_filter=False)


def make_config(**training) -> DAPOConfig:
    return helpers.make_config(**{**RELIABILITY, **training})


def optimizer_state_size(algo) -> int:
    optimizer = next(iter(algo.learner_group._learner._named_optimizers.values()))
    return len(optimizer.state)


@pytest.fixture
def poison_advantages(monkeypatch):
    """``poison(value)`` makes the driver's next train batches carry ``value`` as every advantage
    (real rollouts, real loss and backward); ``poison(None)`` stops it."""
    poisoned = {"value": None}
    real_build = dapo_module.build_train_batch

    def build(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        if poisoned["value"] is not None:
            batch["advantages"] = batch["advantages"].fill_(poisoned["value"])
        return batch

    monkeypatch.setattr(dapo_module, "build_train_batch", build)
    return lambda value: poisoned.__setitem__("value", value)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_update_is_skipped_with_weights_and_optimizer_untouched(ray_session, poison_advantages, bad_value):
    with built_algo(make_config()) as algo:
        before = learner_weights(algo)
        poison_advantages(bad_value)
        result = algo.train()
        assert max_abs_diff(before, learner_weights(algo)) == 0.0
        assert optimizer_state_size(algo) == 0  # AdamW never stepped: no moments were written
        assert result["dapo"]["nonfinite_updates_skipped"] == UPDATES_PER_STEP
        assert result["dapo"]["optimizer_steps"] == 0
        assert result["learners"][DEFAULT_MODULE_ID]["nonfinite_update_skipped"] == UPDATES_PER_STEP

        # The next, clean step trains as usual and the run's count stays.
        poison_advantages(None)
        result = algo.train()
        assert result["dapo"]["optimizer_steps"] == UPDATES_PER_STEP
        assert result["dapo"]["nonfinite_updates_skipped"] == UPDATES_PER_STEP
        assert result["learners"][DEFAULT_MODULE_ID]["nonfinite_update_skipped"] == 0
        assert optimizer_state_size(algo) > 0


def test_a_nan_in_one_gradient_alone_skips_the_update(ray_session):
    """The loss is finite; one parameter's gradient is NaN (a hook on it, as a bad kernel or an
    overflow in backward would leave it): the gradient check alone must catch it."""
    with built_algo(make_config()) as algo:
        module = algo.learner_group._learner.module[DEFAULT_MODULE_ID]
        name, parameter = next((n, p) for n, p in module.named_parameters() if n.endswith("norm.weight"))
        handle = parameter.register_hook(lambda gradient: torch.full_like(gradient, math.nan))
        before = learner_weights(algo)
        result = algo.train()
        learner = result["learners"][DEFAULT_MODULE_ID]
        assert math.isfinite(learner["policy_loss"]), "the loss must stay finite for this test to mean anything"
        assert max_abs_diff(before, learner_weights(algo)) == 0.0, name
        assert optimizer_state_size(algo) == 0
        assert learner["nonfinite_update_skipped"] == UPDATES_PER_STEP
        handle.remove()
        assert algo.train()["dapo"]["optimizer_steps"] == UPDATES_PER_STEP


def test_consecutive_non_finite_updates_stop_the_run_naming_the_iteration(ray_session, poison_advantages):
    with built_algo(make_config(max_consecutive_nonfinite_updates=3)) as algo:
        algo.train()  # clean
        poison_advantages(math.nan)
        algo.train()  # 2 skipped in a row: below the limit
        with pytest.raises(NonFiniteUpdatesError) as raised:
            algo.train()  # the third in a row
    message = str(raised.value)
    assert message.startswith("iteration 3:")
    assert "max_consecutive_nonfinite_updates=3" in message
    assert f"optimizer step {UPDATES_PER_STEP}" in message


def test_max_consecutive_nonfinite_updates_is_validated():
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_updates must be an integer >= 1, got 0"):
        make_config(max_consecutive_nonfinite_updates=0).validate()


def test_sharded_learners_agree_to_skip_when_one_shard_is_poisoned(ray_session, monkeypatch):
    """Two FSDP2 learner processes (DTensor gradients); NaN advantages in the first group only, so in
    one learner's rows. The driver raises if the learners' decisions differ."""
    real_build = dapo_module.build_train_batch

    def build(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        batch["advantages"][batch["group_index"] == 0] = math.nan
        return batch

    monkeypatch.setattr(dapo_module, "build_train_batch", build)
    with built_algo(make_config(data_parallel="fsdp2").learners(num_learners=2)) as algo:
        result = algo.train()
        # One of the two updates held group 0: that one was skipped on both learners, the other not.
        assert result["dapo"]["nonfinite_updates_skipped"] == 1
        assert result["dapo"]["optimizer_steps"] == UPDATES_PER_STEP - 1


# -- a user's verifier that fails, in the training loop ---------------------------------------------

#: A verifier with bugs, chosen per response by a hash of its text: it raises, returns a word, returns
#: NaN, hangs, or kills its own worker process; otherwise it compares the last number. Built from
#: source so that cloudpickle sends it to the verifier workers by value (importing this test module
#: there would import Ray and torch into every replacement worker).
ABUSIVE_VERIFIER = """
import os, re, signal, time, zlib

def abusive(response, reference):
    kind = zlib.crc32(response.encode()) % 16
    if kind == 0:
        raise RuntimeError("bug in the user's verifier")
    if kind == 1:
        return "correct"
    if kind == 2:
        return float("nan")
    if kind == 3:
        time.sleep(60)
    if kind == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    numbers = re.findall(r"-?\\d+", response)
    return bool(numbers) and numbers[-1] == reference
"""
FAILURE_KINDS = {
    0: "raised RuntimeError: bug in the user's verifier",
    1: "returned str, not a VerifierResult",
    2: "returned a non-finite score (nan)",
    3: "timeout: verifier",
    4: "worker process died",
}


def abusive_verifier():
    namespace = {"__name__": "abusive_verifier_source"}
    exec(ABUSIVE_VERIFIER, namespace)  # noqa: S102 - the test's own source, above
    return namespace["abusive"]


def test_a_failing_user_verifier_costs_only_its_responses_and_is_counted(ray_session):
    import zlib

    algo = (
        DAPOConfig()
        .rl_module(model_config={"model": "tiny-qwen2"})
        .environment(ENV, env_config={"operators": "+", "verifier": abusive_verifier(), "verifier_timeout": 0.5})
        .training(**{**TINY, **RELIABILITY, "prompts_per_step": 8, "generation_batch_prompts": 8, "log_samples": 8})
        .debugging(seed=0)
        .build_algo()
    )
    try:
        results = [algo.train() for _ in range(2)]
        runner = algo.env_runner.generation
        problems = algo._run_state.prompt_sampler.env.sample_problems(4, np.random.default_rng(0))
        rollout = runner.sample(problems, algo.env_runner.sampling_settings(), seed=0)
    finally:
        algo.stop()
    # The run went on: both iterations trained and their rewards stayed finite.
    failures = [result["dapo"]["verifier_failures"] for result in results]
    assert all(failure > 0 for failure in failures), failures
    assert results[-1]["dapo"]["verifier_failures_lifetime"] == sum(failures)
    for result in results:
        assert math.isfinite(result["dapo"]["reward_mean"]) and math.isfinite(result["dapo"]["reward_min"])
        assert math.isfinite(result["learners"][DEFAULT_MODULE_ID]["policy_loss"])
    # Each response the verifier failed on is scored wrong, flagged, and says why.
    kinds = [zlib.crc32(text.encode()) % 16 for text in rollout["response_text"]]
    for kind, failed, score, reason in zip(
        kinds, rollout["verifier_failed"], rollout["score"], rollout["reason"], strict=True
    ):
        assert failed == (kind in FAILURE_KINDS)
        if failed:
            assert score == -1.0 and FAILURE_KINDS[kind] in reason
    assert set(kinds) & set(FAILURE_KINDS), "no response met a failure; widen the sample"


# -- a remote env runner killed in the middle of sampling -------------------------------------------

#: A verifier that runs inside the env runner (isolate=False) and SIGKILLs that process the first time
#: it is called anywhere (a marker file says whether it has); otherwise an ordinary last-number check.
KILL_ONCE_VERIFIER = """
import os, signal

def kill_once(response, reference):
    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return response.strip().endswith(reference)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_once_verifier(marker):
    from dapo_envs import Verifier

    namespace = {"__name__": "kill_once_verifier_source", "MARKER": str(marker)}
    exec(KILL_ONCE_VERIFIER, namespace)  # noqa: S102 - the test's own source, above
    return Verifier(name="kill-once", fn=namespace["kill_once"], isolate=False)


def wait_for_healthy_runners(algo, count: int, timeout_s: float = 120) -> None:
    """Ray restarts a failed runner in the background; each iteration's start brings back those that
    are up. Wait until ``count`` remote runners are healthy (or the time-out)."""
    deadline = time.monotonic() + timeout_s
    while algo.env_runner_group.num_healthy_remote_env_runners() < count and time.monotonic() < deadline:
        time.sleep(1)
        algo.restore_env_runners(algo.env_runner_group)


def remote_runner_weights(algo) -> list[dict[str, np.ndarray]]:
    """The weights each remote env runner's module holds."""
    return algo.env_runner_group.foreach_env_runner(
        lambda runner: {k: np.asarray(v) for k, v in runner.module.get_state().items()}, local_env_runner=False
    )


def test_a_killed_env_runner_is_restarted_and_its_share_sampled_again(ray_session, tmp_path):
    def run(marker):
        algo = (
            make_config()
            .environment(ENV, env_config={"operators": "+", "verifier": kill_once_verifier(marker)})
            .env_runners(num_env_runners=2)
            .build_algo()
        )
        try:
            results = [algo.train() for _ in range(2)]
            wait_for_healthy_runners(algo, 2)  # then train once more with both runners
            results.append(algo.train())
            healthy = algo.env_runner_group.num_healthy_remote_env_runners()
            runner_weights = remote_runner_weights(algo)
            learner = learner_weights(algo)
        finally:
            algo.stop()
        for weights in runner_weights:  # the restarted runner holds the current weights too
            assert weights.keys() == learner.keys() and max_abs_diff(learner, weights) == 0.0
        return results, healthy

    unharmed_marker = tmp_path / "already_killed"
    unharmed_marker.touch()  # this run's verifier never kills
    reference, _ = run(unharmed_marker)
    killed, healthy = run(tmp_path / "kill_marker")
    assert (tmp_path / "kill_marker").exists()  # a runner process really was killed mid-sampling
    assert [r["dapo"]["env_runner_failures"] for r in killed] == [1, 0, 0]
    assert killed[-1]["dapo"]["env_runner_failures_total"] == 1
    assert killed[-1]["dapo"]["env_runners_restored_total"] == 1 and healthy == 2  # back, with the weights
    assert [r["dapo"]["env_runner_failures"] for r in reference] == [0, 0, 0]
    # The dead runner's share was sampled again with its seed: the run trains exactly as if unharmed.
    for expected, got in zip(reference, killed, strict=True):
        for name in ("reward_mean", "generated_accuracy", "response_length_mean", "prompts_trained", "optimizer_steps"):
            assert got["dapo"][name] == expected["dapo"][name], name
        assert (
            got["learners"][DEFAULT_MODULE_ID]["policy_loss"] == expected["learners"][DEFAULT_MODULE_ID]["policy_loss"]
        )


def test_a_runner_that_cannot_take_the_weights_is_replaced_never_left_stale(ray_session):
    """A runner whose ``set_state`` raises during the weight sync must not go on generating with its old
    weights (RLlib's sync fires and forgets). RLlib's actor ``apply`` ends the process on any exception,
    so Ray restarts it, and the restore hands the new runner the learners' weights; the run must train
    exactly as an unharmed one. Injected for real on one of two runners."""

    def refuse_weights(*args, **kwargs):  # local: cloudpickle ships it by value to the runner
        raise ValueError("these weights are refused (test)")

    def run(inject: bool):
        config = make_config().env_runners(num_env_runners=2).fault_tolerance(delay_between_env_runner_restarts_s=1.0)
        algo = config.build_algo()
        try:
            results = [algo.train()]
            if inject:
                algo.env_runner_group.foreach_env_runner(
                    lambda runner: setattr(runner, "set_state", refuse_weights),
                    remote_worker_ids=[2],
                    local_env_runner=False,
                )
            results += [algo.train(), algo.train()]  # the first one's weight sync meets the refusal
            wait_for_healthy_runners(algo, 2)
            results.append(algo.train())
            healthy = algo.env_runner_group.num_healthy_remote_env_runners()
            runner_weights = remote_runner_weights(algo)
            learner = learner_weights(algo)
        finally:
            algo.stop()
        assert healthy == 2 and len(runner_weights) == 2
        for weights in runner_weights:
            assert weights.keys() == learner.keys() and max_abs_diff(learner, weights) == 0.0
        return results

    reference, refused = run(inject=False), run(inject=True)
    assert refused[-1]["dapo"]["env_runners_restored_total"] >= 1  # the refusing runner was replaced
    for iteration, (expected, got) in enumerate(zip(reference, refused, strict=True), start=1):
        for name in ("reward_mean", "generated_accuracy", "response_length_mean", "prompts_trained"):
            assert got["dapo"][name] == expected["dapo"][name], (iteration, name)
        assert (
            got["learners"][DEFAULT_MODULE_ID]["policy_loss"] == expected["learners"][DEFAULT_MODULE_ID]["policy_loss"]
        ), iteration


def test_a_killed_learner_stops_the_run_naming_it_and_how_to_resume(ray_session):
    import os
    import signal

    from dapo_rl.rllib.dapo import LearnerFailedError

    with built_algo(make_config().learners(num_learners=2)) as algo:
        algo.train()
        pids = [r.get() for r in algo.learner_group.foreach_learner(lambda learner: os.getpid())]
        os.kill(pids[1], signal.SIGKILL)  # between steps: no collective is waiting on it
        with pytest.raises(LearnerFailedError) as raised:
            algo.train()
    message = str(raised.value)
    assert message.startswith("learner 1 of 2 died during iteration 2 (")
    assert "dapo-rl train --resume" in message


def test_a_killed_env_runner_in_the_asynchronous_stream_costs_only_its_share(ray_session, tmp_path):
    """max_staleness=1 with 2 runners: a runner SIGKILLed mid-round loses its share, which is sent again
    (same seed) to the other runner; the run goes on within the staleness bound, and the restarted
    runner rejoins with the learners' weights and their policy version."""
    marker = tmp_path / "kill_marker"
    algo = (
        make_config(max_staleness=1)
        .environment(ENV, env_config={"operators": "+", "verifier": kill_once_verifier(marker)})
        .env_runners(num_env_runners=2)
        .build_algo()
    )
    try:
        results = [algo.train() for _ in range(3)]
        wait_for_healthy_runners(algo, 2)
        results += [algo.train() for _ in range(2)]
        algo._rollouts.stream.next_round()  # let the runners work through what they were sent
        versions = algo.env_runner_group.foreach_env_runner(
            lambda runner: runner._policy_version, local_env_runner=False
        )
        healthy = algo.env_runner_group.num_healthy_remote_env_runners()
        version = algo._run_state.counters.policy_version
    finally:
        algo.stop()
    assert marker.exists()  # a runner process really was killed mid-sampling
    assert results[-1]["dapo"]["stream_failed_calls_total"] >= 1
    assert all(r["dapo"]["staleness_max"] <= 1 for r in results)
    assert all(math.isfinite(r["learners"][DEFAULT_MODULE_ID]["policy_loss"]) for r in results)
    assert healthy == 2 and versions == [version, version]


def test_an_update_without_loss_tokens_leaves_the_weights_and_adamw_alone(ray_session, monkeypatch):
    """Every response masked out (as the overlong filter does to truncated ones): the gradient is zero,
    and AdamW's weight decay (0.1 here) would still move the weights. The mini-batch is skipped."""
    real_build = dapo_module.build_train_batch

    def all_masked(*args, **kwargs):
        batch = real_build(*args, **kwargs)
        batch["token_mask"] = torch.zeros_like(batch["token_mask"])
        return batch

    monkeypatch.setattr(dapo_module, "build_train_batch", all_masked)
    with built_algo(make_config(weight_decay=0.1)) as algo:
        before = learner_weights(algo)
        result = algo.train()
        after = learner_weights(algo)
        state_size = optimizer_state_size(algo)
    assert max_abs_diff(before, after) == 0.0 and state_size == 0
    assert result["dapo"]["optimizer_steps"] == 0
    assert result["dapo"]["empty_updates_skipped"] == UPDATES_PER_STEP
