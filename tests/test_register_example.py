"""The README's "Adding your own environment" example runs as written, in a fresh interpreter."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- register-example:start -->", "<!-- register-example:end -->"


def _example_source() -> str:
    for document in (ROOT / "README.md", ROOT / "docs" / "environments.md"):
        text = document.read_text(encoding="utf-8") if document.is_file() else ""
        if START in text and END in text:
            block = text[text.index(START) + len(START) : text.index(END)]
            match = re.search(r"```python\n(.*?)```", block, re.S)
            assert match, f"{document}: no ```python block between the register-example markers"
            return match.group(1)
    raise AssertionError(f"no {START} ... {END} block in README.md or docs/environments.md")


def test_readme_registration_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_example_source(), encoding="utf-8")
    # A fresh interpreter, as a user would run it: the example registers global names and ids, and its
    # verifier (defined in __main__) must reach the worker processes.
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.startswith("What is the capital of France?\n")
