"""Generation on vLLM: one ``vllm.LLM`` engine per env runner, behind the same interface as HF ``generate``.

vLLM is optional (the ``vllm`` extra, NVIDIA GPUs only). This module imports without it; creating
:class:`VLLMGenerationBackend` without it raises ImportError with the install hint, and
``DAPOConfig.validate()`` refuses ``generation_backend="vllm"`` before anything starts.

Written against vLLM's documented offline API (``LLM``, ``SamplingParams``, ``LLM.collective_rpc``
with a ``worker_extension_cls``, ``LLM.sleep``/``wake_up``), as of vLLM 0.10-0.11. NOT run: vLLM
cannot be installed on the machines this project is developed on (see README, "Scale-out").
What is tested without vLLM: the translation of sampling settings, the conversion of vLLM's
outputs, and the weight-transfer protocol over a torch.distributed broadcast.

Placement: DAPO runs the engine inside an env runner actor that Ray gave
``num_gpus_per_env_runner = vllm_tensor_parallel_size`` GPUs (so the engines' GPUs are bundles of
the trial's placement group). vLLM's "mp" executor spawns its tensor-parallel workers on the GPUs
Ray made visible to the actor; with one GPU it runs in the actor ("uni").
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dapo_rl.rollout.base import GeneratedResponses, SamplingSettings
from dapo_rl.rollout.weight_sync import WeightMetadata, engine_name

INSTALL_HINT = (
    "the vLLM backend (generation_backend='vllm', dapo-rl eval --backend vllm) needs vLLM, which is not "
    "installed: install the vllm extra (pip install 'dapo-rl[vllm]') on a machine with NVIDIA GPUs, or use "
    "the hf backend"
)

#: The worker extension vLLM mixes into each of its workers (imported by name in those processes).
WORKER_EXTENSION = "dapo_rl.rollout.vllm_worker.WeightSyncWorkerExtension"


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it: that initialises CUDA state)."""
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class VLLMEngineSettings:
    """Keyword arguments of ``vllm.LLM`` that DAPO sets (see :meth:`engine_kwargs`)."""

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

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.dtype,
            "seed": self.seed,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enable_sleep_mode": self.enable_sleep_mode,
            "enforce_eager": self.enforce_eager,
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
        self.llm.collective_rpc("init_weight_sync_group", args=(master_address, master_port, rank_offset, world_size))

    def receive_weights(self, metadata: list[WeightMetadata]) -> None:
        """Receive the tensors learner rank 0 broadcasts (blocks until all have arrived)."""
        self._wake(["weights"])
        self.llm.collective_rpc("receive_weights", args=(metadata,))
        self._after_weight_update()

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load weights passed by value (RPC serialisation; fine for small models, slow for large)."""
        self._wake(["weights"])
        named = [(engine_name(name), tensor) for name, tensor in state_dict.items()]
        self.llm.collective_rpc("load_named_weights", args=(named,))
        self._after_weight_update()

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
    "prompt_seed",
    "responses_from_outputs",
    "sampling_params_kwargs",
    "vllm_available",
]
