"""DAPO training with generation_backend="vllm" on a real engine: vLLM's CPU build in a remote env
runner (``num_gpus_per_env_runner=0``), weights from the learner after every step.

Marked ``vllm``; skipped without vLLM except under ``DAPO_REQUIRE_VLLM=1`` (CI's ``.ci/vllm``).
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from dapo_rl import DAPOConfig
from dapo_rl.models.loading import load_policy
from tests.helpers import vllm_test_marks

pytestmark = vllm_test_marks(timeout_s=900)

PROMPTS = ["1+1=", "22+33=", "What is 7 + 5?\n", "9*9=", "100-1=", "Q: 3+4\nA:"]
MAX_NEW = 10


def _config(**training):
    return (
        DAPOConfig()
        .environment("dapo/Arithmetic-v0", env_config={"operators": "+"})
        .rl_module(model_config={"model": "tiny-qwen2"})
        # The random preset rarely samples EOS: long responses with a wide soft-overlong band give
        # each group rewards that differ by length, so every step has advantages to train on.
        .training(
            generation_backend="vllm",
            group_size=8,
            prompts_per_step=4,
            minibatch_prompts=2,
            generation_batch_prompts=4,
            max_prompt_length=64,
            max_response_length=48,
            overlong_cache_len=40,
            lr=1e-2,
            lr_warmup_steps=0,
            num_epochs=1,
            dynamic_sampling=False,
            **training,
        )
        .env_runners(num_env_runners=1)
        .debugging(seed=0)
    )


def engine_greedy_in(algo):
    """Greedy continuations of PROMPTS from the env runner's own engine, and its weights version."""

    def engine_greedy(runner, prompts=tuple(PROMPTS), max_new=MAX_NEW):  # runs inside the env runner
        import vllm

        tokenizer = runner.generation.tokenizer
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
        requests = [{"prompt_token_ids": tokenizer.encode(text)} for text in prompts]
        outputs = runner.backend.llm.generate(requests, params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs], runner._weights_seq_no

    # Defined in here so that Ray pickles it by value (the env runner cannot import this test module).
    [(greedy, seq_no)] = algo.env_runner_group.foreach_env_runner(engine_greedy, local_env_runner=False)
    return greedy, seq_no


def _hf_greedy(weights):
    model, tokenizer = load_policy("tiny-qwen2", seed=0)
    model.load_state_dict(
        {name.removeprefix("causal_lm."): torch.as_tensor(np.asarray(value)) for name, value in weights.items()}
    )
    out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([tokenizer.encode(text)])
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(generated[0, ids.shape[1] :].tolist())
    return out


def _learner_weights(algo):
    return {k: np.array(v, copy=True) for k, v in algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()}


def test_training_with_a_cpu_engine_syncs_the_learners_weights_after_every_step(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    algo = _config().build_algo()
    try:
        initial = _learner_weights(algo)
        results = [algo.train() for _ in range(2)]
        trained = _learner_weights(algo)
        engine, seq_no = engine_greedy_in(algo)
    finally:
        algo.stop()
    assert results[-1]["dapo"]["optimizer_steps"] >= 2, [r["dapo"]["optimizer_steps"] for r in results]
    assert max(float(np.abs(trained[k] - initial[k]).max()) for k in initial) > 0
    assert seq_no >= 2  # one weight update per step
    expected = _hf_greedy(trained)
    assert expected != _hf_greedy(initial)  # the training changed the greedy output: the check below can fail
    assert engine == expected


def test_lora_training_sends_the_merged_weights_to_a_cpu_engine(ray_session, tmp_path, monkeypatch):
    """LoRA (issue 28) with vLLM's CPU engine: the engine holds the plain model and takes the learner's
    weights with the adapters merged in (W + B A alpha/r), so it generates what the merged model does."""
    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    config = _config()
    config.rl_module(model_config={"model": "tiny-qwen2", "lora": {"r": 4, "alpha": 8}})
    algo = config.build_algo()
    try:
        module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
        initial = {k: np.array(v, copy=True) for k, v in module.get_state(inference_only=True).items()}
        results = [algo.train() for _ in range(2)]
        merged = {k: np.array(v, copy=True) for k, v in module.get_state(inference_only=True).items()}
        engine, seq_no = engine_greedy_in(algo)
    finally:
        algo.stop()
    assert results[-1]["dapo"]["optimizer_steps"] >= 2
    assert seq_no >= 2
    expected = _hf_greedy(merged)
    assert expected != _hf_greedy(initial)  # the adapters changed the greedy output: the check below can fail
    assert engine == expected


def test_asynchronous_rollouts_with_a_cpu_engine_generate_while_the_learner_trains(ray_session, tmp_path, monkeypatch):
    """max_staleness=1: the runner's engine generates the next round while the learner updates; each
    round carries the policy version that generated it, and the engine ends on the learner's weights."""
    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    algo = _config(max_staleness=1).build_algo()
    try:
        results = [algo.train() for _ in range(3)]
        trained = _learner_weights(algo)
        engine, _ = engine_greedy_in(algo)
    finally:
        algo.stop()
    dapo = [r["dapo"] for r in results]
    assert [d["policy_version"] for d in dapo] == [1, 2, 3]
    assert max(d["staleness_max"] for d in dapo) == 1  # a round generated before the last update was used
    assert all(d["staleness_max"] <= 1 for d in dapo)
    assert engine == _hf_greedy(trained)


#: A verifier run inside the env runner (isolate=False) that SIGKILLs that process once, the first
#: time it is called after the test has created ARM; otherwise an ordinary last-number check.
KILL_WHEN_ARMED = """
import os, signal

def kill_when_armed(response, reference):
    if os.path.exists(ARM):
        try:
            os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return response.strip().endswith(reference)
"""


def _kill_when_armed_verifier(arm, marker):
    from dapo_envs import Verifier

    namespace = {"__name__": "kill_when_armed_source", "ARM": str(arm), "MARKER": str(marker)}
    exec(KILL_WHEN_ARMED, namespace)  # noqa: S102 - the test's own source, above
    return Verifier(name="kill-when-armed", fn=namespace["kill_when_armed"], isolate=False)


def test_a_killed_env_runner_gets_a_new_engine_with_the_learners_weights(ray_session, tmp_path, monkeypatch):
    """The runner is killed in iteration 2, after an update: Ray restarts it, its new engine starts
    from the model folder, and DAPO sends it the learners' weights before it samples the lost share
    again, with its seed. So the run trains exactly as the same run unharmed."""
    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))

    def run(arm, marker):
        algo = (
            _config()
            .environment(
                "dapo/Arithmetic-v0", env_config={"operators": "+", "verifier": _kill_when_armed_verifier(arm, marker)}
            )
            .build_algo()
        )
        try:
            results = [algo.train()]
            arm.touch()
            results += [algo.train(), algo.train()]
            trained = _learner_weights(algo)
            engine, _ = engine_greedy_in(algo)
        finally:
            algo.stop()
        return [r["dapo"] for r in results], trained, engine

    unharmed_marker = tmp_path / "unharmed_marker"
    unharmed_marker.touch()  # this run's verifier never kills
    reference, _, _ = run(tmp_path / "arm_unharmed", unharmed_marker)
    killed, trained, engine = run(tmp_path / "arm", tmp_path / "kill_marker")
    assert (tmp_path / "kill_marker").exists()  # the runner process really was killed in iteration 2
    assert [d["env_runner_failures"] for d in killed] == [0, 1, 0]
    assert killed[-1]["env_runners_restored_total"] == 1
    for expected, got in zip(reference, killed, strict=True):
        for name in ("reward_mean", "generated_accuracy", "response_length_mean", "optimizer_steps"):
            assert got[name] == expected[name], name
    assert engine == _hf_greedy(trained)
