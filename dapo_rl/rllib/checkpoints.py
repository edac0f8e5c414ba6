"""DAPO training checkpoints: which are complete, and their policies as Hugging Face model folders.

Completeness: ``DAPO.save_to_path`` ends by writing a manifest (``dapo_checkpoint.json``) listing
every file of the checkpoint with its size (and, for shards kept outside it, theirs). Tune then
copies the folder into the trial folder in no particular file order, so a process killed during
the copy, or while Tune prunes an old checkpoint, leaves a folder whose manifest is missing,
unreadable, or lists a file that is absent or shorter: :func:`checkpoint_problem` says which, and
:func:`newest_complete_checkpoint` (what ``dapo-rl train --resume`` restores) passes it over.

Export: a checkpoint of unsharded learners is restored as an Algorithm, which exports its learners'
weights. A checkpoint of sharded (FSDP2) learners holds no single copy of the weights: it is
consolidated in this process from its shards (no cluster needed), into the module described by
the checkpoint's ``policy_module.json`` (written by ``DAPO.save_to_path``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from dapo_rl.models.distributed import load_sharded_weights_unsharded, sharded_state_folder
from dapo_rl.rllib.module import TEXT_SPACE, CausalLMModule
from dapo_rl.versions import package_versions

#: Checkpoint file with the RLModule's ``model_config`` (model, dtype, ...): what an offline
#: consolidation needs to rebuild the module the shards belong to.
POLICY_MODULE_FILE = "policy_module.json"


#: The manifest ``DAPO.save_to_path`` writes last into every checkpoint.
CHECKPOINT_MANIFEST = "dapo_checkpoint.json"


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """A complete checkpoint: its folder, the iterations trained when it was saved, and when."""

    path: Path
    iteration: int
    saved_at: float  # seconds since the epoch
    time_total_s: float  # seconds of training (Tune's time_total_s) when it was saved


def _file_sizes(folder: Path, skip: str | None = None) -> dict[str, int]:
    return {
        file.relative_to(folder).as_posix(): file.stat().st_size
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.name != skip
    }


def write_checkpoint_manifest(
    checkpoint: str | os.PathLike[str], *, iteration: int, time_total_s: float, shards: Path | None = None
) -> None:
    """Write the manifest of a checkpoint whose every other file is written (``shards``: the folder
    of its learner shards when they live outside it, in ``sharded_checkpoint_dir``)."""
    folder = Path(checkpoint)
    manifest: dict[str, Any] = {
        "iteration": int(iteration),
        "saved_at": time.time(),
        "time_total_s": float(time_total_s),
        "files": _file_sizes(folder, skip=CHECKPOINT_MANIFEST),
        "versions": package_versions(),  # the code that wrote it (a resume or export may run other code)
    }
    if shards is not None and folder.resolve() not in shards.resolve().parents:
        manifest["shards"] = {"path": str(shards.resolve()), "files": _file_sizes(shards)}
    temporary = folder / (CHECKPOINT_MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(temporary, folder / CHECKPOINT_MANIFEST)


def _missing_or_short(folder: Path, files: dict[str, int]) -> str | None:
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, its manifest says {size}"
    return None


def checkpoint_problem(checkpoint: str | os.PathLike[str]) -> str | None:
    """Why ``checkpoint`` cannot be restored (a missing or unreadable manifest, a missing or
    short file), or None when it is complete."""
    folder = Path(checkpoint)
    try:
        manifest = json.loads((folder / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
        files = dict(manifest["files"])
        int(manifest["iteration"]), float(manifest["saved_at"])  # present and numbers
    except FileNotFoundError:
        return f"{folder} has no {CHECKPOINT_MANIFEST} (its write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{folder / CHECKPOINT_MANIFEST} is unreadable ({type(error).__name__}: {error})"
    problem = _missing_or_short(folder, files)
    if problem is None and "shards" in manifest:
        problem = _missing_or_short(Path(manifest["shards"]["path"]), manifest["shards"]["files"])
    return problem


def complete_checkpoints(folder: str | os.PathLike[str]) -> list[CheckpointRecord]:
    """Every complete checkpoint anywhere under ``folder``, oldest save first."""
    records = []
    for manifest_file in Path(folder).rglob(CHECKPOINT_MANIFEST):
        checkpoint = manifest_file.parent
        if checkpoint_problem(checkpoint) is not None:
            continue
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        records.append(
            CheckpointRecord(
                checkpoint,
                int(manifest["iteration"]),
                float(manifest["saved_at"]),
                float(manifest.get("time_total_s", 0.0)),
            )
        )
    return sorted(records, key=lambda record: (record.saved_at, record.iteration))


def newest_complete_checkpoint(folder: str | os.PathLike[str]) -> CheckpointRecord | None:
    """The complete checkpoint under ``folder`` saved last (what a resume continues from), or None."""
    records = complete_checkpoints(folder)
    return records[-1] if records else None


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
        raise FileNotFoundError(
            f"{checkpoint} holds learner shards but no {POLICY_MODULE_FILE}: it cannot be consolidated"
        )
    model_config = json.loads(description.read_text(encoding="utf-8"))
    module = RLModuleSpec(
        module_class=CausalLMModule, observation_space=TEXT_SPACE, action_space=TEXT_SPACE, model_config=model_config
    ).build()
    load_sharded_weights_unsharded(module, shards)
    module.save_hf(folder)


__all__ = [
    "CHECKPOINT_MANIFEST",
    "POLICY_MODULE_FILE",
    "CheckpointRecord",
    "checkpoint_problem",
    "complete_checkpoints",
    "export_checkpoint",
    "is_rllib_checkpoint",
    "newest_complete_checkpoint",
    "write_checkpoint_manifest",
    "write_policy_module_config",
]
