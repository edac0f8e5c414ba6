"""What runs on a GPU machine without Ray, vLLM or Gymnasium (the lent device has only torch and
transformers) must import and run there: the core, the model and log-prob code, the GPU benchmarks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Makes ray, vllm and gymnasium unimportable, and invisible to importlib.util.find_spec.
BLOCKER = textwrap.dedent("""
    import importlib.util, sys
    BLOCKED = ("ray", "vllm", "gymnasium")
    def blocked(name):
        return name.split(".")[0] in BLOCKED
    class Block:
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
    sys.meta_path.insert(0, Block())
    _find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: None if blocked(name) else _find_spec(name, package)
""")

#: The Ray-free layers: these packages and modules, and every module inside the packages.
RAY_FREE_PACKAGES = ["dapo_rl.core", "dapo_rl.models", "dapo_rl.rollout"]
RAY_FREE_TOP_LEVEL = ["dapo_rl", "dapo_rl.settings", "dapo_rl.versions", "dapo_rl.training", "dapo_rl.metrics"]
#: Ray-free, but not Gymnasium-free, so outside what the lent GPU machine can import.
NEEDS_GYMNASIUM = {"dapo_rl.rollout.runner"}  # drives dapo_envs' environments turn by turn


def ray_free_modules() -> list[str]:
    """Every module of the Ray-free layers, found from the files (a new module is checked without a list)."""
    names = list(RAY_FREE_TOP_LEVEL)
    for package in RAY_FREE_PACKAGES:
        folder = ROOT.joinpath(*package.split("."))
        names += [package] + [
            f"{package}.{path.stem}" for path in sorted(folder.glob("*.py")) if path.stem != "__init__"
        ]
    return [name for name in names if name not in NEEDS_GYMNASIUM]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks_ray():
    completed = _run("import ray")
    assert completed.returncode != 0 and "blocked" in completed.stderr


def test_gpu_side_modules_import_without_ray():
    completed = _run(
        "import importlib, dapo_rl\n"
        f"for name in {ray_free_modules()!r}: importlib.import_module(name)\n"
        "assert not hasattr(dapo_rl, 'DAPOConfig')\n"
        "print('ok')\n"
    )
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-3000:]


def test_learner_step_benchmark_runs_without_ray():
    completed = _run(
        "import runpy\n"
        "sys.argv = ['benchmarks/learner_step.py', '--quick']\n"
        "runpy.run_path('benchmarks/learner_step.py', run_name='__main__')\n"
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| dapo |" in completed.stdout
