"""Problem sets: the bundled ones by name, or your own parquet / jsonl file, as one pyarrow Table.

``load(name_or_path)`` returns a :class:`pyarrow.Table` with four string columns:

==============  ====================================================================================
``id``          The problem's id: the file's ``id`` / ``unique_id`` column, else ``extra_info.index``,
                else the row number.
``prompt``      The problem text, without any prompt template (environments add theirs).
``answer``      The reference answer, as the verifier receives it.
``data_source`` The ``data_source`` column, else the bundled name or the file's stem.
==============  ====================================================================================

Bundled names (files in ``dapo_envs/data``, origins and licences in ``SOURCES.md`` beside them):
``dapo_math_17k`` (17,917 rows), ``aime24`` (30), ``aime25`` (30), ``math500`` (500), ``gsm8k`` (1,319).

Accepted file schemas (``.parquet``, ``.jsonl`` / ``.json`` with one object per line):

- verl: ``prompt`` is a chat list of ``{"role", "content"}`` messages (the last ``user`` turn is the
  problem; when it is wrapped in the exact DAPO prompt, the wrapper is removed) and the reference is
  ``reward_model.ground_truth``;
- plain: the problem in ``prompt`` (a string), ``problem`` or ``question``, the reference in ``answer``
  (or ``ground_truth``). Integer answers are converted to strings.

Nothing is dropped or guessed: a missing column, an empty or null problem or answer, a value of the wrong
type, or a file that cannot be read raises :class:`DatasetError`, whose message names the file, the row
(0-based) and the column.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = ["load", "BUNDLED", "DatasetError", "bundled_path", "DAPO_PROMPT_PREFIX", "DAPO_PROMPT_SUFFIX"]

#: Bundled name -> (file in dapo_envs/data, number of rows).
BUNDLED: dict[str, tuple[str, int]] = {
    "dapo_math_17k": ("dapo_math_17k_dedup.parquet", 17_917),
    "aime24": ("aime24_dapo_prompt.parquet", 30),
    "aime25": ("aime25_dapo_prompt.parquet", 30),
    "math500": ("math500.jsonl", 500),
    "gsm8k": ("gsm8k_test.jsonl", 1_319),
}

# The DAPO prompt (DAPO-Math-17k and AIME), split around the problem.
DAPO_PROMPT_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_PROMPT_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

_PROBLEM_COLUMNS = ("prompt", "problem", "question")
_ANSWER_COLUMNS = ("answer", "ground_truth")
_ID_COLUMNS = ("id", "unique_id")
_COLUMNS = ("id", "prompt", "answer", "data_source")


class DatasetError(ValueError):
    """A problem set that cannot be used as it is; the message names the file, row and column."""


def bundled_path(name: str) -> Path:
    """The path of a bundled data set's file."""
    if name not in BUNDLED:
        raise KeyError(f"no bundled data set named {name!r}; bundled: {', '.join(BUNDLED)}")
    return Path(str(resources.files("dapo_envs") / "data" / BUNDLED[name][0]))


def load(name_or_path: str | os.PathLike[str] | pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    """Load a problem set as a Table with string columns ``id``, ``prompt``, ``answer``, ``data_source``.

    Args:
        name_or_path: A bundled name (``dapo_math_17k``, ``aime24``, ``aime25``, ``math500``, ``gsm8k``),
            the path of a ``.parquet`` or ``.jsonl`` file, a pyarrow Table, or a list of row dicts, in the
            verl or the plain problem/answer schema (see the module docstring).

    Raises:
        DatasetError: the file is missing or unreadable, or a row lacks a usable problem or answer.
    """
    if isinstance(name_or_path, pa.Table):
        return _normalize(name_or_path, source="<pyarrow.Table>", default_data_source="custom")
    if isinstance(name_or_path, Sequence) and not isinstance(name_or_path, (str, bytes)):
        return _load_rows(name_or_path)  # type: ignore[arg-type]  # rows are checked there, one by one
    if isinstance(name_or_path, str) and name_or_path in BUNDLED:
        path = bundled_path(name_or_path)
        table = _load_file_cached(str(path), *_file_stamp(path), default_data_source=name_or_path)
        expected = BUNDLED[name_or_path][1]
        if table.num_rows != expected:
            raise DatasetError(
                f"{path}: bundled data set '{name_or_path}' has {table.num_rows} rows, expected {expected}"
            )
        return table
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load() takes a bundled name, a path, a pyarrow.Table or a list of dicts, got {type(name_or_path).__name__}"
        )
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        hint = "" if path.suffix else f" (bundled names: {', '.join(BUNDLED)})"
        raise DatasetError(f"{path}: no such file{hint}")
    return _load_file_cached(str(path.resolve()), *_file_stamp(path), default_data_source=path.stem)


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _load_rows(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    wanted = set(_PROBLEM_COLUMNS + _ANSWER_COLUMNS + _ID_COLUMNS) | {"data_source", "reward_model", "extra_info"}
    kept = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DatasetError(f"<rows>: row {index} is a {type(row).__name__}, not a dict")
        # Only the columns load() reads, with integer answers and ids as strings, so that rows mixing
        # 2 and "4" (fine for Python) still make one Arrow type per column.
        kept.append(
            {
                key: str(value) if key in _ANSWER_COLUMNS + _ID_COLUMNS and _is_int(value) else value
                for key, value in row.items()
                if key in wanted
            }
        )
    try:
        table = pa.Table.from_pylist(kept)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DatasetError(f"<rows>: the rows do not share one type per column: {error}") from None
    return _normalize(table, source="<rows>", default_data_source="custom")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# A file is parsed once per process (keyed by path, mtime and size); Tables are immutable, so sharing is safe.
@functools.lru_cache(maxsize=16)
def _load_file_cached(path: str, mtime_ns: int, size: int, *, default_data_source: str) -> pa.Table:
    return _normalize(_read_file(Path(path)), source=path, default_data_source=default_data_source)


def _read_file(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise DatasetError(f"{path}: not a readable parquet file: {error}") from None
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    raise DatasetError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .parquet or .jsonl")


def _read_jsonl(path: Path) -> pa.Table:
    import pyarrow.json as pj

    try:
        table = pj.read_json(path)
        table.validate(full=True)  # pyarrow does not check that strings are UTF-8 while parsing
        return table
    except (pa.ArrowException, OSError) as error:
        # pyarrow's message counts rows per block; find the offending line ourselves for a precise error.
        _diagnose_jsonl(path)
        raise DatasetError(f"{path}: not a readable JSON-lines file: {error}") from None


def _diagnose_jsonl(path: Path) -> None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read: {error}") from None
    first_types: dict[str, str] = {}
    row = -1
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: row {row} (line {line_number}) is not valid JSON: {error.msg}") from None
        if not isinstance(value, dict):
            raise DatasetError(
                f"{path}: row {row} (line {line_number}) is a JSON {type(value).__name__}, not an object"
            )
        for column, item in value.items():
            kind = type(item).__name__ if item is not None else None
            if kind is None:
                continue
            if first_types.setdefault(column, kind) != kind:
                raise DatasetError(
                    f"{path}: row {row} (line {line_number}), column '{column}': a {kind} where earlier rows "
                    f"have a {first_types[column]}"
                )


def _normalize(table: pa.Table, *, source: str, default_data_source: str) -> pa.Table:
    """Map a verl-schema or plain-schema table onto the four canonical string columns."""
    names = table.column_names
    if table.num_rows == 0:
        raise DatasetError(f"{source}: the data set has no rows")
    problems = _problem_texts(table, source)
    answers = _answers(table, source)
    ids = _ids(table, source)
    if "data_source" in names:
        data_sources = _string_cells(table, "data_source", source, allow_empty=False)
    else:
        data_sources = [default_data_source] * table.num_rows
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "prompt": pa.array(problems, pa.string()),
            "answer": pa.array(answers, pa.string()),
            "data_source": pa.array(data_sources, pa.string()),
        }
    )


def _problem_texts(table: pa.Table, source: str) -> list[str]:
    names = table.column_names
    column = next((c for c in _PROBLEM_COLUMNS if c in names), None)
    if column is None:
        raise DatasetError(
            f"{source}: no problem column: expected one of {', '.join(map(repr, _PROBLEM_COLUMNS))}; "
            f"columns are {names}"
        )
    arrow_type = table.schema.field(column).type
    if column == "prompt" and (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
        return [_problem_from_chat(chat, source, row) for row, chat in enumerate(table.column(column).to_pylist())]
    return _string_cells(table, column, source, allow_empty=False)


def _problem_from_chat(chat: Any, source: str, row: int) -> str:
    where = f"{source}: row {row}, column 'prompt'"
    if not chat:
        raise DatasetError(f"{where}: empty chat list")
    for message in reversed(chat):
        if not isinstance(message, Mapping) or "content" not in message:
            raise DatasetError(f"{where}: chat messages must be {{'role', 'content'}} objects, got {message!r:.80}")
        if message.get("role", "user") == "user":
            content = message["content"]
            if not isinstance(content, str) or not content.strip():
                raise DatasetError(f"{where}: the user message's content is empty or not a string")
            if content.startswith(DAPO_PROMPT_PREFIX) and content.endswith(DAPO_PROMPT_SUFFIX):
                content = content[len(DAPO_PROMPT_PREFIX) : len(content) - len(DAPO_PROMPT_SUFFIX)]
            return content
    raise DatasetError(f"{where}: no message with role 'user'")


def _answers(table: pa.Table, source: str) -> list[str]:
    names = table.column_names
    if "reward_model" in names:
        arrow_type = table.schema.field("reward_model").type
        if not pa.types.is_struct(arrow_type) or arrow_type.get_field_index("ground_truth") < 0:
            raise DatasetError(f"{source}: column 'reward_model' must be a struct with a 'ground_truth' field")
        values = table.column("reward_model").combine_chunks().field("ground_truth").to_pylist()
        return [_answer_cell(v, source, row, "reward_model.ground_truth") for row, v in enumerate(values)]
    column = next((c for c in _ANSWER_COLUMNS if c in names), None)
    if column is None:
        raise DatasetError(
            f"{source}: no answer column: expected 'reward_model.ground_truth' or one of "
            f"{', '.join(map(repr, _ANSWER_COLUMNS))}; columns are {names}"
        )
    return [_answer_cell(v, source, row, column) for row, v in enumerate(table.column(column).to_pylist())]


def _answer_cell(value: Any, source: str, row: int, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = "null" if value is None else type(value).__name__
        raise DatasetError(
            f"{source}: row {row}, column '{column}': the answer must be a string or integer, got {kind}"
        )
    text = str(value)
    if not text.strip():
        raise DatasetError(f"{source}: row {row}, column '{column}': the answer is empty")
    return text


def _string_cells(table: pa.Table, column: str, source: str, *, allow_empty: bool) -> list[str]:
    values: list[str] = table.column(column).to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise DatasetError(f"{source}: row {row}, column '{column}': expected a string, got {kind}")
        if not allow_empty and not value.strip():
            raise DatasetError(f"{source}: row {row}, column '{column}': empty text")
    return values


def _ids(table: pa.Table, source: str) -> list[str]:
    names = table.column_names
    for column in _ID_COLUMNS:
        if column in names:
            values = table.column(column).to_pylist()
            for row, value in enumerate(values):
                if value is None or isinstance(value, (bool, float)) or not isinstance(value, (str, int)):
                    kind = "null" if value is None else type(value).__name__
                    raise DatasetError(
                        f"{source}: row {row}, column '{column}': the id must be a string or integer, got {kind}"
                    )
            return [str(v) for v in values]
    if "extra_info" in names:
        arrow_type = table.schema.field("extra_info").type
        if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("index") >= 0:
            values = table.column("extra_info").combine_chunks().field("index").to_pylist()
            if all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in values):
                return [str(v) for v in values]
    return [str(row) for row in range(table.num_rows)]
