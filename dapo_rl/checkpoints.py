"""DAPO training checkpoints as Hugging Face model folders.

A checkpoint of unsharded learners is restored as an Algorithm, which exports its learners'
weights. A checkpoint of sharded (FSDP2) learners holds no single copy of the weights: it is
consolidated in this process from its shards (no cluster needed), into the module described by
the checkpoint's ``policy_module.json`` (written by ``DAPO.save_to_path``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from dapo_rl.distributed import load_sharded_weights_unsharded, sharded_state_folder
from dapo_rl.models import save_policy
from dapo_rl.module import TEXT_SPACE, CausalLMModule

#: Checkpoint file with the RLModule's ``model_config`` (model, dtype, ...): what an offline
#: consolidation needs to rebuild the module the shards belong to.
POLICY_MODULE_FILE = "policy_module.json"


def is_rllib_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(os.path.join(path, "rllib_checkpoint.json"))


def write_policy_module_config(checkpoint: str | os.PathLike[str], model_config: dict[str, Any]) -> None:
    Path(checkpoint, POLICY_MODULE_FILE).write_text(json.dumps(model_config, indent=2), encoding="utf-8")


def export_checkpoint(checkpoint: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
    """Write the policy of a DAPO checkpoint as a Hugging Face model folder."""
    shards = sharded_state_folder(checkpoint)
    if shards is None:
        algo = Algorithm.from_checkpoint(os.fspath(checkpoint))
        try:
            algo.export_policy(folder)
        finally:
            algo.stop()
        return
    description = Path(checkpoint, POLICY_MODULE_FILE)
    if not description.is_file():
        raise FileNotFoundError(f"{checkpoint} holds learner shards but no {POLICY_MODULE_FILE}: it cannot be consolidated")
    model_config = json.loads(description.read_text(encoding="utf-8"))
    module = RLModuleSpec(
        module_class=CausalLMModule, observation_space=TEXT_SPACE, action_space=TEXT_SPACE, model_config=model_config
    ).build()
    load_sharded_weights_unsharded(module, shards)
    save_policy(module.causal_lm, module.tokenizer, folder)


__all__ = ["POLICY_MODULE_FILE", "export_checkpoint", "is_rllib_checkpoint", "write_policy_module_config"]
