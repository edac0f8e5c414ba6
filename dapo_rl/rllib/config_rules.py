"""DAPOConfig's rules that tie settings together, each a function ``(config, require_installed) ->
problems``. Settings alone are checked by their declaration (``dapo_rl.settings.SETTINGS``);
``DAPOConfig.validate`` runs these after, skipping a rule while a setting it reads is itself invalid.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from dapo_rl.models.distributed import learners_are_sharded
from dapo_rl.models.presets import list_presets
from dapo_rl.rllib.env_runner import unknown_env_config_keys, vllm_engine_device
from dapo_rl.rllib.module import model_context_length
from dapo_rl.rollout.vllm_backend import CPU_DISTRIBUTION, INSTALL_HINT, vllm_available, vllm_cpu_build
from dapo_rl.settings import MODEL_CONFIG_KEYS, MODULE_KEYS_FROM_SETTINGS, lora_problems

NO_MODEL_MESSAGE = (
    "no model is set: DAPOConfig().rl_module(model_config={'model': M}) with M a local Hugging Face model "
    f"folder, a .gguf file or a preset ({', '.join(list_presets())}); DAPOConfig's defaults are the paper's "
    "32B settings, so a small preset also needs fitting lengths (max_response_length, ...)"
)


def minibatches_split_the_step(config: Any, _: bool) -> list[str]:
    if config.prompts_per_step % config.minibatch_prompts:
        return [
            f"minibatch_prompts ({config.minibatch_prompts}) must divide prompts_per_step ({config.prompts_per_step})"
        ]
    return []


def minibatch_rows_split_over_learners(config: Any, _: bool) -> list[str]:
    rows = config.minibatch_prompts * config.group_size
    if rows % config.learner_shards:
        return [
            f"a mini-batch's rows (minibatch_prompts {config.minibatch_prompts} x group_size {config.group_size} = "
            f"{rows}) must divide evenly over num_learners ({config.learner_shards})"
        ]
    return []


def response_budget_exceeds_the_overlong_cache(config: Any, _: bool) -> list[str]:
    if config.max_response_length <= config.overlong_cache_len:
        return [
            f"max_response_length ({config.max_response_length}) must be greater than overlong_cache_len "
            f"({config.overlong_cache_len})"
        ]
    return []


def fsdp2_clips_by_global_norm(config: Any, _: bool) -> list[str]:
    if config.data_parallel == "fsdp2" and config.grad_clip is not None and config.grad_clip_by != "global_norm":
        return [f"data_parallel='fsdp2' clips gradients by global norm only, got grad_clip_by={config.grad_clip_by!r}"]
    return []


def kl_reference_not_sharded(config: Any, _: bool) -> list[str]:
    """The KL penalty's reference copy is verified on replicated (DDP) learners only."""
    if config.kl_coef > 0 and learners_are_sharded(config.data_parallel, config.num_learners):
        return [
            f"kl_coef={config.kl_coef} with data_parallel='fsdp2' and num_learners={config.num_learners}: the KL "
            "penalty's reference model is not sharded yet (each learner would hold a whole copy); use "
            "data_parallel='ddp', or kl_coef=0"
        ]
    return []


def lora_verified(config: Any, require_installed: bool) -> list[str]:
    """model_config['lora']: its keys and values, peft installed, and only the combinations verified."""
    lora = (config.model_config or {}).get("lora")
    if lora is None:
        return []
    problems = lora_problems(lora)
    if require_installed and importlib.util.find_spec("peft") is None:
        problems.append("model_config['lora'] needs peft: pip install 'dapo-rl[lora]'")
    if config.generation_backend == "vllm" and vllm_engine_device(config) == "cuda":
        # CPU engines take the merged weights by value, as the HF backend does (tests/test_vllm_training.py);
        # the NCCL broadcast to GPU engines sends the learner's parameters by name, adapters unmerged.
        problems.append(
            "model_config['lora'] with generation_backend='vllm' on GPU engines (num_gpus_per_env_runner > 0) is "
            "not built: the NCCL weight broadcast would send unmerged adapter parameters; use vLLM's CPU engines "
            "(num_gpus_per_env_runner=0) or generation_backend='hf'"
        )
    if learners_are_sharded(config.data_parallel, config.num_learners):
        problems.append(
            "model_config['lora'] with data_parallel='fsdp2' and num_learners > 1 is not verified yet; use "
            "data_parallel='ddp' (the adapters are small: replicating them costs little)"
        )
    return problems


def model_config_keys_known(config: Any, _: bool) -> list[str]:
    """An unknown model_config key (a typo, a feature not built) is refused, never ignored."""
    given = set(config.model_config or {})
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


def environment_named(config: Any, _: bool) -> list[str]:
    if not (isinstance(config.env, str) and config.env):
        return [f"env must be a registered Gymnasium id such as 'dapo/Arithmetic-v0', got {config.env!r}"]
    problem = unknown_env_config_keys(config.env, dict(config.env_config or {}), config.env_registration)
    return [problem] if problem else []


def vllm_placement(config: Any, require_installed: bool) -> list[str]:
    if config.generation_backend != "vllm":
        return []
    if require_installed and not vllm_available():
        return [INSTALL_HINT]
    problems = []
    if int(config.num_env_runners or 0) < 1 and not config.in_evaluation:
        problems.append(
            "generation_backend='vllm' runs its engines in remote env runners: set "
            f"env_runners(num_env_runners=N >= 1), got num_env_runners={config.num_env_runners}"
        )
    gpus, tensor_parallel = config.num_gpus_per_env_runner, config.vllm_tensor_parallel_size
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
        if config.vllm_sleep:
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


def async_needs_remote_runners(config: Any, _: bool) -> list[str]:
    # RLlib validates a copy for evaluation whose num_env_runners is evaluation_num_env_runners.
    if config.is_async and int(config.num_env_runners or 0) < 1 and not config.in_evaluation:
        return [
            f"max_staleness={config.max_staleness} generates in remote env runners while the learners update: "
            f"set env_runners(num_env_runners=N >= 1), got num_env_runners={config.num_env_runners}"
        ]
    return []


def vllm_behaviour_logprobs_are_unfiltered(config: Any, _: bool) -> list[str]:
    """vLLM reports log-probs after top-k/top-p renormalisation ("processed_logprobs"), the HF backend
    and the learner before it: with a filter on, vLLM's behaviour log-probs would exceed the learner's
    on every token (pi_prox / pi_behav = the kept probability mass < 1 with no update between them)."""
    if config.generation_backend != "vllm" or not config.needs_generator_logprobs:
        return []
    if config.top_p < 1 or config.top_k > 0:
        why = "max_staleness >= 1" if config.is_async else "recompute_old_logprobs=False"
        return [
            f"generation_backend='vllm' with top_p={config.top_p!r}, top_k={config.top_k!r} and {why}: vLLM's "
            "log-probs are of the top-k/top-p renormalised distribution, the learner's of softmax(logits / T) "
            "over the whole vocabulary, so their ratio is off on every token; set top_p=1.0 and top_k=-1, or use "
            "generation_backend='hf' (whose log-probs are before the filters, as the learner's)"
        ]
    return []


def correction_not_switched_off(config: Any, _: bool) -> list[str]:
    """importance_weight_cap=None is the older way to say "no correction": it switches every
    correction off, so a correction named beside it would silently not act."""
    if config.importance_weight_cap is None and config.off_policy_correction not in ("tis_token", "none"):
        return [
            f"off_policy_correction={config.off_policy_correction!r} with importance_weight_cap=None: a cap of None "
            "switches every correction off; give importance_weight_cap a number (it is only read by tis_token and "
            "tis_sequence), or set off_policy_correction='none'"
        ]
    return []


def model_fits_its_context(config: Any, _: bool = True) -> list[str]:
    model = (config.model_config or {}).get("model")
    if not model:
        return [NO_MODEL_MESSAGE]
    context = model_context_length(str(model), (config.model_config or {}).get("tiny_spec"))
    if context is not None and config.max_prompt_length + config.max_response_length > context:
        return [
            f"max_prompt_length ({config.max_prompt_length}) + max_response_length ({config.max_response_length}) = "
            f"{config.max_prompt_length + config.max_response_length} tokens exceed the context of model {model!r} "
            f"({context} positions)"
        ]
    return []


#: DAPOConfig's cross-setting rules, each with the settings it reads: a rule is skipped while one of
#: them is itself invalid (its own problem is reported instead).
CROSS_SETTING_RULES: tuple[tuple[Any, frozenset[str]], ...] = (
    (minibatches_split_the_step, frozenset({"prompts_per_step", "minibatch_prompts"})),
    (minibatch_rows_split_over_learners, frozenset({"minibatch_prompts", "group_size"})),
    (response_budget_exceeds_the_overlong_cache, frozenset({"max_response_length", "overlong_cache_len"})),
    (fsdp2_clips_by_global_norm, frozenset({"data_parallel", "grad_clip", "grad_clip_by"})),
    (kl_reference_not_sharded, frozenset({"kl_coef", "data_parallel"})),
    (model_fits_its_context, frozenset({"max_prompt_length", "max_response_length"})),
    (model_config_keys_known, frozenset()),
    (lora_verified, frozenset({"generation_backend", "data_parallel"})),
    (environment_named, frozenset()),
    (vllm_placement, frozenset({"generation_backend", "vllm_tensor_parallel_size"})),
    (async_needs_remote_runners, frozenset({"max_staleness"})),
    (correction_not_switched_off, frozenset({"importance_weight_cap", "off_policy_correction"})),
    (
        vllm_behaviour_logprobs_are_unfiltered,
        frozenset({"generation_backend", "max_staleness", "recompute_old_logprobs", "top_p", "top_k"}),
    ),
)
