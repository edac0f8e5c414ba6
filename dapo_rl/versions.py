"""Which code made a result: this package's version and those of the libraries that shape a run.

``dapo_rl.__version__`` comes from the installed package's metadata (pyproject's ``version`` is its
one home). :func:`package_versions` is recorded in every run's ``summary.json`` and every checkpoint's
manifest, so a number in a table can be traced to the code that produced it. Versions are read from
package metadata, not by importing: vLLM takes seconds to import, and a checkpoint written on a
machine without it must not need it.
"""

from __future__ import annotations

import importlib.metadata
import platform

__all__ = ["DISTRIBUTION", "RECORDED_PACKAGES", "package_versions", "version"]

#: The distribution name this package is installed under (``pip install dapo-rl``).
DISTRIBUTION = "dapo-rl"

#: Libraries whose versions a run's results depend on (vLLM is optional: None when absent).
RECORDED_PACKAGES = ("torch", "ray", "transformers", "vllm")

#: ``__version__`` of a source tree that was never installed (no metadata to read): PEP 440's local
#: label says where it came from rather than claiming a release.
UNINSTALLED_VERSION = "0+unknown"


def version() -> str:
    """The installed dapo-rl version (``pip show dapo-rl``), or ``0+unknown`` from a bare source tree."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UNINSTALLED_VERSION


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """``{"dapo_rl", "python", "torch", "ray", "transformers", "vllm"}`` -> version (None: not installed)."""
    return {
        "dapo_rl": version(),
        "python": platform.python_version(),
        **{name: _installed(name) for name in RECORDED_PACKAGES},
    }
