"""The bundled data sets load with their row counts; malformed files fail with file, row and column."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_envs import datasets
from dapo_envs.datasets import DatasetError, load
from dapo_envs.prompts import PROMPT_TEMPLATES, render

EXPECTED_ROWS = {"dapo_math_17k": 17_917, "aime24": 30, "aime25": 30, "math500": 500, "gsm8k": 1_319}
EXPECTED_SHA256 = {
    "dapo_math_17k": "246ae23df97c9eae8126cb4da780e9a0a31d10110e16eed144bcecbf2132d535",
    "aime24": "a79c1e94b43b17d372babff0bda60683db9e87da3ffe3127727b551098b9b99f",
    "aime25": "367a923c804f6c3da16d5f6be685ab4a17124e0410c117b0564100d9ef84050d",
    "math500": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "gsm8k": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_bundled_sets_load_with_their_row_counts(name):
    table = load(name)
    assert table.num_rows == EXPECTED_ROWS[name]
    assert table.column_names == ["id", "prompt", "answer", "data_source"]
    assert all(table.schema.field(c).type == pa.string() for c in table.column_names)
    for column in ("prompt", "answer"):
        assert all(value.strip() for value in table.column(column).to_pylist())
    path = datasets.bundled_path(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED_SHA256[name]  # byte-for-byte copies
    assert (path.parent / "SOURCES.md").is_file()


def test_bundled_set_details():
    dapo = load("dapo_math_17k")
    assert dapo.column("data_source")[0].as_py() == "DAPO-17k"
    assert dapo.column("id").to_pylist()[:3] == ["0", "1", "2"]
    assert all(answer.lstrip("-").isdigit() for answer in dapo.column("answer").to_pylist())
    assert load("math500").column("id")[0].as_py() == "test/precalculus/807.json"
    assert load("gsm8k").column("answer")[0].as_py().endswith("#### 18")
    assert set(load("aime25").column("data_source").to_pylist()) == {"aime25"}


@pytest.mark.parametrize("name", ["aime24", "aime25"])
def test_aime_prompt_is_the_bare_problem_and_the_dapo_template_restores_the_file(name):
    table = load(name)
    original = pq.read_table(datasets.bundled_path(name)).column("prompt").to_pylist()
    for problem, chat in zip(table.column("prompt").to_pylist(), original):
        assert not problem.startswith("Solve the following")
        assert render(PROMPT_TEMPLATES["dapo"], problem) == chat[0]["content"]


def test_load_is_cached_per_file():
    assert load("aime24") is load("aime24")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_plain_schema_jsonl_and_parquet(tmp_path):
    rows = [{"question": "1+1?", "answer": 2}, {"question": "2+2?", "answer": "4"}]
    # Integer answers become strings (a jsonl column has one type, so these are all integers).
    table = load(
        _write_jsonl(tmp_path / "ints.jsonl", [{"problem": "1+1?", "answer": 2}, {"problem": "3?", "answer": 3}])
    )
    assert table.column("answer").to_pylist() == ["2", "3"]
    assert table.column("data_source").to_pylist() == ["ints", "ints"]
    assert table.column("id").to_pylist() == ["0", "1"]
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "a", "id": 7}]), tmp_path / "plain.parquet")
    assert load(tmp_path / "plain.parquet").to_pylist() == [
        {"id": "7", "prompt": "p", "answer": "a", "data_source": "plain"}
    ]
    assert load(rows).column("prompt").to_pylist() == ["1+1?", "2+2?"]
    assert load(pa.table({"problem": ["p", "q"], "answer": [2, 4]})).column("answer").to_pylist() == ["2", "4"]


def test_verl_schema_parquet(tmp_path):
    rows = [
        {
            "data_source": "mine",
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"}],
            "reward_model": {"ground_truth": "42", "style": "rule"},
            "extra_info": {"index": 5},
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "verl.parquet")
    assert load(str(tmp_path / "verl.parquet")).to_pylist() == [
        {"id": "5", "prompt": "What is 6*7?", "answer": "42", "data_source": "mine"}
    ]


# ----------------------------------------------------------------------------------------------------
# Malformed input: an error naming the file, the row and the column; nothing silently dropped.
# ----------------------------------------------------------------------------------------------------


def _expect_error(source, *fragments):
    with pytest.raises(DatasetError) as error:
        load(source)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_answer_column(tmp_path):
    path = _write_jsonl(tmp_path / "no_answer.jsonl", [{"problem": "p"}])
    _expect_error(path, str(path), "no answer column", "'answer'")


def test_missing_problem_column(tmp_path):
    path = tmp_path / "no_problem.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "p", "answer": "1"}]), path)
    _expect_error(path, str(path), "no problem column", "'problem'", "['text', 'answer']")


def test_missing_answer_in_one_row(tmp_path):
    path = _write_jsonl(tmp_path / "gap.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    _expect_error(path, str(path), "row 1", "column 'answer'", "got null")


def test_empty_answer(tmp_path):
    path = _write_jsonl(
        tmp_path / "empty.jsonl", [{"problem": "p", "answer": "1"}] * 2 + [{"problem": "q", "answer": "  "}]
    )
    _expect_error(path, str(path), "row 2", "column 'answer'", "empty")


def test_empty_problem(tmp_path):
    path = _write_jsonl(tmp_path / "empty_problem.jsonl", [{"problem": "", "answer": "1"}])
    _expect_error(path, str(path), "row 0", "column 'problem'", "empty")


def test_wrong_answer_type(tmp_path):
    path = tmp_path / "float.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": 1.5}]), path)
    _expect_error(path, str(path), "row 0", "column 'answer'", "string or integer, got float")
    path = _write_jsonl(tmp_path / "list.jsonl", [{"problem": "p", "answer": ["1", "2"]}])
    _expect_error(path, str(path), "row 0", "column 'answer'", "got list")


def test_type_changes_between_rows(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": 2}])
    _expect_error(path, str(path), "row 1", "column 'answer'", "a int where earlier rows have a str")


def test_wrong_problem_type(tmp_path):
    path = tmp_path / "problem_int.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": 3, "answer": "3"}]), path)
    _expect_error(path, str(path), "row 0", "column 'problem'", "expected a string, got int")


def test_verl_chat_without_user_turn(tmp_path):
    path = tmp_path / "chat.parquet"
    rows = [{"prompt": [{"role": "system", "content": "hi"}], "reward_model": {"ground_truth": "1"}}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    _expect_error(path, str(path), "row 0", "column 'prompt'", "no message with role 'user'")


def test_verl_null_ground_truth(tmp_path):
    path = tmp_path / "gt.parquet"
    rows = [
        {"prompt": [{"role": "user", "content": "p"}], "reward_model": {"ground_truth": "1"}},
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": None}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    _expect_error(path, str(path), "row 1", "column 'reward_model.ground_truth'", "got null")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": "q", "answer": \n')
    _expect_error(path, str(path), "row 1 (line 2)", "not valid JSON")


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"\x00\x01 not parquet at all")
    _expect_error(garbage, str(garbage), "not a readable parquet file")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    _expect_error(latin1, str(latin1), "not UTF-8")
    _expect_error(tmp_path / "missing.jsonl", "missing.jsonl", "no such file")
    _expect_error("not_a_bundled_name", "no such file", "bundled names: dapo_math_17k")
    csv = tmp_path / "table.csv"
    csv.write_text("problem,answer\np,1\n")
    _expect_error(csv, str(csv), "unsupported file type '.csv'")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    _expect_error(empty, str(empty), "no rows")


def test_rows_that_are_not_dicts():
    _expect_error([{"problem": "p", "answer": "1"}, "oops"], "<rows>", "row 1")
    with pytest.raises(TypeError, match="load\\(\\) takes a bundled name"):
        load(42)
