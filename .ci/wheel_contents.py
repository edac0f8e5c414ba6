"""Check a built wheel and sdist against the source tree: every package, module and data file there.

Usage: python .ci/wheel_contents.py DIST_FOLDER (run from the repository root). Exits 1 naming each
file the wheel or the sdist lacks, and each top-level name the wheel has that no package of the tree
accounts for (a test folder swept in by accident, say). Standard library only.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

ROOT = Path.cwd()


def tracked_files() -> list[str]:
    """The tree's files as git knows them (untracked scratch and caches are not the package's)."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return sorted(name for name in listing.stdout.decode().split("\0") if name and (ROOT / name).is_file())


#: Tracked files under the package folders that are deliberately not installed: reproduce/'s result
#: tables and curves are the repository's record of runs, not code or data the package reads.
NOT_INSTALLED = ("reproduce/results/*",)


def expected_wheel_files(files: list[str]) -> dict[str, str]:
    """Installed path -> source path, for every tracked file under a top-level package's folder.

    Taken from the tree, not from pyproject's package lists: a new sub-package or data file that
    pyproject forgets to declare is then missing from the wheel, and this check says so.
    """
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    folders = {package_dir.get(name, name): name for name in setuptools["packages"] if "." not in name}
    # A sub-package kept in its own top-level folder (reproduce/ installs as dapo_rl.reproduce).
    folders.update({folder: name for name, folder in package_dir.items() if "." in name})
    expected = {}
    for name in files:
        path = PurePosixPath(name)
        if path.parts[0] in folders and not any(
            path.match(pattern) or fnmatch(name, pattern) for pattern in NOT_INSTALLED
        ):
            expected[str(PurePosixPath(*folders[path.parts[0]].split("."), *path.parts[1:]))] = name
    return expected


def main() -> int:
    dist = Path(sys.argv[1])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}", file=sys.stderr)
        return 1
    files = tracked_files()
    expected = expected_wheel_files(files)
    problems = []

    with zipfile.ZipFile(wheels[0]) as wheel:
        in_wheel = {name for name in wheel.namelist() if ".dist-info/" not in name}
        entry_points = next((n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")), None)
        if entry_points is None or "dapo-rl = dapo_rl.cli:main" not in wheel.read(entry_points).decode():
            problems.append(f"{wheels[0].name}: no console script dapo-rl = dapo_rl.cli:main")
    problems += [
        f"{wheels[0].name} lacks {target} (from {source})"
        for target, source in sorted(expected.items())
        if target not in in_wheel
    ]
    problems += [
        f"{wheels[0].name} has {name}, which no package of the tree accounts for"
        for name in sorted(in_wheel - set(expected))
    ]

    with tarfile.open(sdists[0]) as sdist:
        top = sdists[0].name.removesuffix(".tar.gz")
        in_sdist = {name.removeprefix(top + "/") for name in sdist.getnames()}
    needed = {"pyproject.toml", "README.md", *expected.values()}
    problems += [f"{sdists[0].name} lacks {name}" for name in sorted(needed - in_sdist)]

    for problem in problems:
        print(f"wheel contents: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"wheel contents: {wheels[0].name} holds all {len(expected)} files of the tree's packages; "
            f"{sdists[0].name} holds their sources"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
