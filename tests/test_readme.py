"""The user's guide runs as written: every Python block of README.md and docs/*.md in a fresh
interpreter, and every ``dapo-rl`` command line of their shell blocks parsed by the real argument
parser, with its job (``--config`` file and ``--set`` values) loaded and its environment id known.

A block preceded by ``<!-- needs: gpu -->`` (or ``vllm``, ``cluster``) is skipped where that is
missing, and said so in the skip reason: nothing is left out silently.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- needs: (?P<needs>[\w, ]+) -->\s*\n)?```(?P<lang>python|bash)\n(?P<body>.*?)```", re.DOTALL)


def _blocks(lang: str) -> list[tuple[str, int, str, set[str]]]:
    """(document name, line, body, needs) of every ``lang`` block."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            if match["lang"] == lang:
                needs = {need.strip() for need in (match["needs"] or "").split(",") if need.strip()}
                line = text[: match.start("body")].count("\n") + 1
                found.append((str(document.relative_to(ROOT)), line, match["body"], needs))
    return found


def _missing(needs: set[str]) -> list[str]:
    available = {
        "gpu": lambda: __import__("torch").cuda.is_available(),
        "vllm": lambda: importlib.util.find_spec("vllm") is not None,
        "cluster": lambda: bool(os.environ.get("RAY_ADDRESS")),
    }
    unknown = needs - set(available)
    assert not unknown, f"unknown <!-- needs: --> marker(s) {sorted(unknown)}; known: {sorted(available)}"
    return sorted(need for need in needs if not available[need]())


PYTHON_BLOCKS = _blocks("python")
SHELL_BLOCKS = _blocks("bash")


def test_the_guide_has_blocks_in_readme_and_docs():
    documents = {document for document, *_ in PYTHON_BLOCKS}
    assert "README.md" in documents and len(documents) >= 3, documents
    assert len(PYTHON_BLOCKS) >= 5 and len(SHELL_BLOCKS) >= 4


@pytest.mark.parametrize("document,line,body,needs", PYTHON_BLOCKS, ids=[f"{d}:{n}" for d, n, *_ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(document, line, body, needs, tmp_path):
    missing = _missing(needs)
    if missing:
        pytest.skip(f"{document}:{line} needs {', '.join(missing)}")
    script = tmp_path / "block.py"
    script.write_text(body, encoding="utf-8")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, (
        f"{document}:{line} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    )


def _command_lines() -> list[tuple[str, int, list[str]]]:
    """(document, line, argv after ``dapo-rl``) of every ``dapo-rl`` command in the shell blocks,
    comments stripped; ``&&`` chains are split so README's set-up line counts too."""
    commands = []
    for document, first_line, body, _needs in SHELL_BLOCKS:
        for offset, raw in enumerate(body.splitlines()):
            for part in raw.split("&&"):
                words = shlex.split(part, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                    words.pop(0)
                if words[:1] == ["dapo-rl"]:
                    commands.append((document, first_line + offset, words[1:]))
    return commands


COMMANDS = _command_lines()


def test_the_guide_shows_train_and_eval_commands():
    kinds = {argv[0] for _, _, argv in COMMANDS if argv}
    assert {"train", "eval"} <= kinds, kinds


@pytest.mark.parametrize("document,line,argv", COMMANDS, ids=[f"{d}:{n}" for d, n, _ in COMMANDS])
def test_dapo_rl_command_line_is_valid(document, line, argv, monkeypatch):
    """The command parses, its job file and ``--set`` values load, its environment id exists.
    (Running them all would take hours: the main job and the learning runs are measured in
    benchmarks/results/ instead.)"""
    import gymnasium as gym

    import dapo_envs  # noqa: F401  (registers the dapo/* ids)
    from dapo_rl.cli import parser
    from dapo_rl.jobs import load_job

    monkeypatch.chdir(ROOT)  # job files are given relative to the repository root
    args = parser().parse_args(argv)
    if args.command == "train" and not args.resume:
        job = load_job(args.config, args.set)
        assert job["env"] in gym.registry, f"{document}:{line}: unknown environment {job['env']!r}"
        from dapo_rl.jobs.eval_problems import choose_eval_problems

        # Not refused for want of held-out problems (it raises ValueError, naming the environment).
        choose_eval_problems(
            job["env"],
            job["env_config"],
            eval_env=job["eval_env"],
            on_training_problems=job["eval_on_training_problems"],
        )
    elif args.command == "eval":
        assert args.env in gym.registry, f"{document}:{line}: unknown environment {args.env!r}"


LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def test_every_relative_link_of_the_guide_reaches_a_file():
    broken = []
    for document in DOCUMENTS:
        for match in LINK.finditer(document.read_text(encoding="utf-8")):
            if not (document.parent / match["target"]).exists():
                broken.append(f"{document.relative_to(ROOT)} -> {match['target']}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
