"""Smoke test of an installed dapo-rl wheel, run from outside the source tree (.ci/wheel runs it).

Checks what a user of the wheel meets first: the packages import from site-packages (not from a
checkout), ``dapo-rl --version`` / ``--help`` work through the console script, every registered
``dapo/*`` environment builds, resets and scores a correct answer from its bundled data, the extras
the wheel was installed with import, and one ``dapo-rl eval`` on the tiny preset runs to its JSON.
Exits non-zero, naming the check, on the first failure.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"]).resolve()


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"wheel smoke test failed: {what}")


def run(*args: str) -> str:
    started = time.perf_counter()
    completed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    check(completed.returncode == 0, f"{' '.join(args)} exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    print(f"ok  {' '.join(args)}  ({time.perf_counter() - started:.1f} s)")
    return completed.stdout


def main() -> None:
    import gymnasium as gym

    import dapo_envs
    import dapo_rl

    for module in (dapo_rl, dapo_envs):
        location = Path(module.__file__ or "").resolve()
        check(SITE_PACKAGES in location.parents, f"{module.__name__} imported from {location}, not the installed wheel")
        check((location.parent / "py.typed").is_file(), f"{module.__name__} has no py.typed")
    version = importlib.metadata.version("dapo-rl")
    check(dapo_rl.__version__ == version, f"dapo_rl.__version__ {dapo_rl.__version__!r} != metadata {version!r}")
    check(hasattr(dapo_rl, "DAPOConfig"), "dapo_rl.DAPOConfig is missing (Ray not installed with the wheel?)")
    print(f"ok  import dapo_rl {version} and dapo_envs from {SITE_PACKAGES}")

    check(run("dapo-rl", "--version").strip() == f"dapo-rl {version}", "dapo-rl --version does not print the version")
    # Each dapo-rl call imports Ray and transformers (~8 s on 2 cores): --help once, eval's options by running it.
    check("train" in run("dapo-rl", "--help"), "dapo-rl --help does not list train")

    ids = sorted(env_id for env_id in gym.registry if env_id.startswith("dapo/"))
    check(set(dapo_envs.ENV_IDS) <= set(ids), f"registered ids {ids} lack some of ENV_IDS {dapo_envs.ENV_IDS}")
    for env_id in ids:
        started = time.perf_counter()
        env = gym.make(env_id)
        prompt, info = env.reset(seed=0)
        reasoning_env = env.unwrapped
        problem = reasoning_env.problem(info["index"])
        check(
            isinstance(prompt, str) and prompt == problem.prompt and problem.answer, f"{env_id}: reset gave {prompt!r}"
        )
        # The verifier scores a correct answer correct (math_verify's runs in a worker process that
        # must import dapo_envs from the wheel too).
        _, reward, terminated, _, step_info = env.step(reasoning_env.solution_text(problem))
        check(terminated and step_info["acc"] and reward > 0, f"{env_id}: a correct answer scored {step_info}")
        env.close()
        print(
            f"ok  {env_id}: {reasoning_env.num_problems} problems, a correct answer scored {reward:+g} "
            f"({time.perf_counter() - started:.1f} s)"
        )

    # Extras installed with the wheel (.ci/wheel installs smollm2 and tracking).
    from dapo_rl.jobs.tracking import LOGGERS, missing_logger_package
    from dapo_rl.models.presets import GGUF_CONVERSION_PACKAGES

    for package in GGUF_CONVERSION_PACKAGES:
        __import__(package)
    for logger in LOGGERS:
        check(missing_logger_package(logger) is None, f"extra tracking: {missing_logger_package(logger)}")
    print(f"ok  extras: {', '.join(GGUF_CONVERSION_PACKAGES)} (smollm2), {', '.join(LOGGERS)} (tracking) import")

    output = run(
        "dapo-rl",
        "eval",
        "--model",
        "tiny-qwen2",
        "--env",
        "dapo/Arithmetic-v0",
        "--problems",
        "4",
        "--samples",
        "2",
        "--max-new-tokens",
        "8",
    )
    result = json.loads(output)
    check(
        result["num_problems"] == 4 and result["samples"] == 2 and 0.0 <= result["avg_at_k"] <= 1.0,
        f"dapo-rl eval printed {result}",
    )
    print(f"wheel smoke test passed in {os.getcwd()}")


if __name__ == "__main__":
    main()
