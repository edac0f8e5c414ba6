"""Which checkpoints are complete: the manifest check, SIGKILLs in the middle of Tune's checkpoint
writes and deletes, and the pruning of sharded checkpoints after a resume."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.train._internal.storage import _delete_fs_path, _pyarrow_fs_copy_files

from dapo_rl import DAPOConfig
from dapo_rl.models.distributed import finish_sharded_checkpoint, sharded_state_folder, sharded_state_target
from dapo_rl.rllib.checkpoints import (
    CHECKPOINT_MANIFEST,
    checkpoint_problem,
    complete_checkpoints,
    newest_complete_checkpoint,
    write_checkpoint_manifest,
)
from tests import helpers
from tests.helpers import built_algo


def make_config() -> DAPOConfig:
    return helpers.make_config(lr=1e-3, overlong_filter=False)


@pytest.fixture(scope="module")
def trained_checkpoint(ray_session, tmp_path_factory):
    """A real DAPO checkpoint after one iteration, and the learner weights it holds."""
    with built_algo(make_config()) as algo:
        algo.train()
        folder = algo.save_to_path(str(tmp_path_factory.mktemp("source") / "checkpoint"))
        weights = {key: np.array(value) for key, value in algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()}
    return Path(folder), weights


def fake_checkpoint(folder: Path, files: dict[str, bytes], iteration: int = 1) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    write_checkpoint_manifest(folder, iteration=iteration, time_total_s=1.0)
    return folder


def test_the_manifest_names_what_makes_a_checkpoint_incomplete(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "c", {"state.pkl": b"x" * 100, "learner/module.pkl": b"y" * 10})
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "learner" / "module.pkl").write_bytes(b"y" * 4)  # a copy cut short
    assert (
        checkpoint_problem(checkpoint) == f"{checkpoint / 'learner' / 'module.pkl'} has 4 bytes, its manifest says 10"
    )
    (checkpoint / "learner" / "module.pkl").unlink()  # a copy that had not reached it
    assert checkpoint_problem(checkpoint) == f"{checkpoint / 'learner' / 'module.pkl'} is missing"
    (checkpoint / CHECKPOINT_MANIFEST).write_text('{"iteration": 1, "files": {"sta')  # a manifest cut short
    assert "is unreadable (JSONDecodeError" in checkpoint_problem(checkpoint)
    (checkpoint / CHECKPOINT_MANIFEST).unlink()
    assert checkpoint_problem(checkpoint) == f"{checkpoint} has no {CHECKPOINT_MANIFEST} (its write did not finish)"


def test_shards_outside_the_checkpoint_are_part_of_it(tmp_path):
    shards = tmp_path / "shared" / "0001-iteration000001"
    shards.mkdir(parents=True)
    (shards / "__0_0.distcp").write_bytes(b"z" * 50)
    (shards / ".metadata").write_bytes(b"m" * 5)
    checkpoint = tmp_path / "c"
    checkpoint.mkdir()
    (checkpoint / "state.pkl").write_bytes(b"x")
    write_checkpoint_manifest(checkpoint, iteration=3, time_total_s=0.0, shards=shards)
    assert checkpoint_problem(checkpoint) is None
    (shards / ".metadata").unlink()  # pruned, or never finished
    assert checkpoint_problem(checkpoint) == f"{shards / '.metadata'} is missing"
    assert complete_checkpoints(tmp_path) == []


def test_newest_complete_checkpoint_is_the_last_saved_complete_one(tmp_path):
    older = fake_checkpoint(tmp_path / "trial_a" / "checkpoint_000001", {"s": b"1"}, iteration=2)
    newer = fake_checkpoint(tmp_path / "trial_b" / "checkpoint_000000", {"s": b"2"}, iteration=3)
    broken = fake_checkpoint(tmp_path / "trial_a" / "checkpoint_000002", {"s": b"3"}, iteration=3)
    assert newest_complete_checkpoint(tmp_path).path == broken
    (broken / "s").unlink()
    record = newest_complete_checkpoint(tmp_path)
    assert (record.path, record.iteration) == (newer, 3)
    assert [r.path for r in complete_checkpoints(tmp_path)] == [older, newer]
    assert newest_complete_checkpoint(tmp_path / "trial_c") is None


#: What Tune does for each checkpoint, run in a child process: copy the trainable's checkpoint folder
#: into the trial folder (Tune's own copy function), then delete the oldest beyond 2 (Tune's own
#: delete function), over and over.
WRITER = """
import sys
from pathlib import Path
import pyarrow.fs
from ray.train._internal.storage import _delete_fs_path, _pyarrow_fs_copy_files
source, root, index = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
fs = pyarrow.fs.LocalFileSystem()
print("ready", flush=True)
while True:
    target = root / f"checkpoint_{index:06d}"
    fs.create_dir(str(target))
    _pyarrow_fs_copy_files(source, str(target), source_filesystem=fs, destination_filesystem=fs)
    if (root / f"checkpoint_{index - 2:06d}").exists():
        _delete_fs_path(fs, str(root / f"checkpoint_{index - 2:06d}"))
    index += 1
"""


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / name, b / name, shallow=False) for name in names
    )


def test_sigkill_during_checkpoint_writes_and_deletes_leaves_a_complete_one(ray_session, trained_checkpoint, tmp_path):
    source, weights = trained_checkpoint
    root = tmp_path / "trial"
    root.mkdir()
    fs = pyarrow.fs.LocalFileSystem()
    # The first checkpoint is written whole; then one cycle (a copy and a delete) is timed.
    _pyarrow_fs_copy_files(
        str(source), str(root / "checkpoint_000000"), source_filesystem=fs, destination_filesystem=fs
    )
    started = time.perf_counter()
    _pyarrow_fs_copy_files(str(source), str(tmp_path / "timing"), source_filesystem=fs, destination_filesystem=fs)
    _delete_fs_path(fs, str(tmp_path / "timing"))
    cycle = time.perf_counter() - started
    kills, cut_short, incomplete_before = 8, 0, set()
    for kill in range(kills):
        next_index = 1 + max(int(p.name.split("_")[1]) for p in root.iterdir())
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(source), str(root), str(next_index)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(cycle * (1 + kill / kills))  # kills spread over a cycle, one cycle in
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        folders = sorted(root.iterdir())
        problems = {folder.name: checkpoint_problem(folder) for folder in folders}
        incomplete = {name for name, problem in problems.items() if problem is not None}
        cut_short += bool(incomplete - incomplete_before)  # this kill cut a write or a delete short
        incomplete_before = incomplete
        newest = newest_complete_checkpoint(root)
        assert newest is not None, f"kill {kill} left no complete checkpoint: {problems}"
        assert same_files(newest.path, source)
        for folder in folders:  # complete means exactly the source's files
            if problems[folder.name] is None:
                assert same_files(folder, source), folder
    print(f"{cut_short} of {kills} kills left a checkpoint folder incomplete (cycle {cycle * 1e3:.1f} ms)")
    # Most kills land in the middle of a copy or a delete (the cycle is nearly all file work).
    assert cut_short >= 1, "no kill landed in the middle of a checkpoint write or delete"

    # The checkpoint a resume would take restores the trained weights exactly.
    with built_algo(make_config()) as restored:
        restored.restore_from_path(str(newest_complete_checkpoint(root).path))
        got = restored.learner_group.get_weights()[DEFAULT_MODULE_ID]
        assert max(float(np.max(np.abs(np.asarray(got[key]) - weights[key]))) for key in weights) == 0.0


def test_sharded_pruning_after_a_resume_keeps_what_a_resume_needs(tmp_path):
    """A run is killed after writing iteration 11's shards, before Tune persisted its checkpoint, and
    resumes from iteration 10, then is killed the same way again, and resumes from 10 again. Its new
    saves must never delete iteration 10's shards before a newer checkpoint is complete; orphans go."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "unrelated_folder").mkdir()  # the shared folder may hold other things: never touched

    def save(iteration: int, protect: Path | None) -> Path:
        checkpoint = tmp_path / f"checkpoint_{iteration}_{time.time_ns()}"
        checkpoint.mkdir()
        shards = sharded_state_target(checkpoint, str(shared), iteration)
        shards.mkdir()
        (shards / ".metadata").write_bytes(b"m")
        finish_sharded_checkpoint(checkpoint, shards, str(shared), keep=2, protect=protect)
        assert sharded_state_folder(checkpoint) == shards
        return shards

    save(9, None)
    shards_10 = save(10, None)
    orphan = save(11, shards_10)  # killed before Tune persisted checkpoint 11
    second_orphan = save(11, shards_10)  # resumed from 10, killed the same way
    assert shards_10.is_dir() and orphan.is_dir() and second_orphan.is_dir()
    resumed_11 = save(11, shards_10)  # resumed from 10 again
    assert shards_10.is_dir(), "the shards of the checkpoint a resume needs were pruned"
    assert not orphan.exists()  # the oldest orphan went first
    resumed_12 = save(12, resumed_11)  # checkpoint 11 is persisted now: 10 is no longer needed
    assert sorted(p.name for p in shared.iterdir()) == sorted([resumed_11.name, resumed_12.name, "unrelated_folder"])


def test_a_checkpoint_saved_by_dapo_carries_a_manifest_of_its_files(trained_checkpoint):
    source, _ = trained_checkpoint
    manifest = json.loads((source / CHECKPOINT_MANIFEST).read_text())
    assert manifest["iteration"] == 1
    assert "learner_group/learner/rl_module/default_policy/module_state.pkl" in manifest["files"]
    assert checkpoint_problem(source) is None
    assert os.path.getsize(source / "algorithm_state.pkl") == manifest["files"]["algorithm_state.pkl"]
