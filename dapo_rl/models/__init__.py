"""Models, Ray-free: loading a policy (a Hugging Face folder, a GGUF file or a preset), the tiny
test preset, the policy's log-prob forward, the shared-prompt fast path and FSDP2/DDP sharding.

    loading       load_policy, load_tokenizer, save_policy, the tiny character-level preset
    presets       GGUF presets (SmolLM2-135M-Instruct) and their converted-folder cache
    policy        response log-probs and entropies of a causal LM, one prompt shared by G responses
    kv_cache      which architectures may share a prompt's KV cache
    distributed   sharding a causal LM over learners, the global-norm gradient clip
"""

from dapo_rl.models.loading import TinyModelSpec, build_tiny_model, load_policy, load_tokenizer, save_policy
from dapo_rl.models.presets import TINY_PRESET, GGUFPreset, list_presets, register_preset

__all__ = [
    "load_policy",
    "load_tokenizer",
    "save_policy",
    "TINY_PRESET",
    "TinyModelSpec",
    "build_tiny_model",
    "GGUFPreset",
    "list_presets",
    "register_preset",
]
