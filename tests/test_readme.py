"""Every Python code block of README.md runs, exactly as written, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}-line{_line_of(BLOCKS[i])}")
def test_readme_block_runs_as_written(index, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, f"README block {index} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"


def _line_of(block: str) -> int:
    return README.read_text(encoding="utf-8")[: README.read_text(encoding="utf-8").index(block)].count("\n") + 1
