"""Input discovery and checks (planning/inputs.py): files, directories and globs; readable Parquet,
columns, schemas, ids.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import prompts_table, write_parquet

from hpcinfer.errors import DataError
from hpcinfer.planning.inputs import Inputs, discover, scan
from hpcinfer.planning.sharding import make_shards


# ---- discover -----------------------------------------------------------------------------------
def test_discover_single_file(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", prompts_table(2))
    assert discover(p) == [p]


def test_discover_directory_sorted_parquet_only(tmp_path):
    for name in ("c.parquet", "a.parquet", "b.parquet"):
        write_parquet(tmp_path / name, prompts_table(1))
    (tmp_path / "notes.txt").write_text("not data")
    assert discover(str(tmp_path)) == [str(tmp_path / n) for n in ("a.parquet", "b.parquet", "c.parquet")]


def test_discover_glob_sorted_files_only(tmp_path):
    for name in ("part-2.parquet", "part-10.parquet", "part-1.parquet", "other.parquet"):
        write_parquet(tmp_path / name, prompts_table(1))
    (tmp_path / "part-dir.parquet").mkdir()
    got = discover(str(tmp_path / "part-*.parquet"))
    assert got == sorted(str(tmp_path / n) for n in ("part-1.parquet", "part-10.parquet", "part-2.parquet"))


def test_discover_glob_without_match(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        discover(str(tmp_path / "*.parquet"))


def test_discover_directory_without_parquet(tmp_path):
    (tmp_path / "x.txt").write_text("a,b\n")  # not a known input format (.csv would be one)
    with pytest.raises(DataError, match="without"):
        discover(str(tmp_path))


def test_discover_missing_path(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(DataError) as e:
        discover(missing)
    assert missing in str(e.value) and "does not exist" in str(e.value)


# ---- scan ---------------------------------------------------------------------------------------
def test_scan_good_files(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", prompts_table(5))
    b = write_parquet(tmp_path / "b.parquet", prompts_table(3, start=5))
    inputs = scan([a, b], "prompt", "id")
    assert isinstance(inputs, Inputs)
    assert [(f.path, f.rows) for f in inputs.files] == [(a, 5), (b, 3)]
    assert inputs.rows == 8
    assert inputs.schema.names == ["id", "prompt"]
    assert inputs.schema.metadata is None  # pandas/arrow metadata dropped


def test_scan_not_parquet(tmp_path):
    p = tmp_path / "prompts.parquet"
    p.write_text("prompt\nhello\n")
    with pytest.raises(DataError) as e:
        scan([str(p)], "prompt")
    assert str(p) in str(e.value) and "not a Parquet file" in str(e.value)


def test_scan_missing_prompt_column(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", pa.table({"text": ["hi"]}))
    with pytest.raises(DataError) as e:
        scan([p], "prompt")
    msg = str(e.value)
    assert "data.prompt_column='prompt'" in msg and p in msg and "text" in msg


def test_scan_int_prompt_column(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", pa.table({"prompt": pa.array([1, 2], pa.int64())}))
    with pytest.raises(DataError) as e:
        scan([p], "prompt")
    assert "int64" in str(e.value) and "expected string" in str(e.value)


def test_scan_large_string_prompt_is_ok(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", pa.table({"prompt": pa.array(["x"], pa.large_string())}))
    assert scan([p], "prompt").rows == 1


def test_scan_missing_id_column(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", prompts_table(2))
    with pytest.raises(DataError, match="data.id_column='uid'"):
        scan([p], "prompt", "uid")


def test_scan_duplicate_ids_across_files(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", prompts_table(5))
    b = write_parquet(tmp_path / "b.parquet", prompts_table(3, start=3))  # ids 3, 4 repeat
    scan([a, b], "prompt")  # without id_column ids are not checked
    with pytest.raises(DataError) as e:
        scan([a, b], "prompt", "id")
    msg = str(e.value)
    assert "not unique" in msg and "2 value(s)" in msg and "3" in msg and "4" in msg


def test_scan_null_ids(tmp_path):
    p = write_parquet(
        tmp_path / "a.parquet", pa.table({"id": pa.array([1, None, 3, None]), "prompt": ["a", "b", "c", "d"]})
    )
    with pytest.raises(DataError, match="2 null value"):
        scan([p], "prompt", "id")


def test_scan_all_files_empty(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", prompts_table(0))
    b = write_parquet(tmp_path / "b.parquet", prompts_table(0))
    with pytest.raises(DataError, match="no rows"):
        scan([a, b], "prompt")


def test_scan_files_disagree_on_columns(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", prompts_table(2))
    b = write_parquet(tmp_path / "b.parquet", pa.table({"prompt": ["x"], "extra": [1]}))
    with pytest.raises(DataError) as e:
        scan([a, b], "prompt")
    assert "disagree on columns" in str(e.value) and a in str(e.value) and b in str(e.value)


def test_scan_incompatible_column_types(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", pa.table({"prompt": ["x"], "k": pa.array([1], pa.int64())}))
    b = write_parquet(tmp_path / "b.parquet", pa.table({"prompt": ["y"], "k": pa.array([[1]], pa.list_(pa.int64()))}))
    with pytest.raises(DataError, match="incompatible column types"):
        scan([a, b], "prompt")


@pytest.mark.parametrize("column", ["error", "generated_text", "output_tokens"])
def test_scan_input_column_clashing_with_output(tmp_path, column):
    p = write_parquet(tmp_path / "a.parquet", pa.table({"prompt": ["x"], column: ["y"]}))
    with pytest.raises(DataError) as e:
        scan([p], "prompt")
    assert repr(column) in str(e.value) and "rename" in str(e.value)


def test_scan_allows_empty_files_among_others(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", prompts_table(0))
    b = write_parquet(tmp_path / "b.parquet", prompts_table(4))
    c = write_parquet(tmp_path / "c.parquet", prompts_table(0))
    d = write_parquet(tmp_path / "d.parquet", pa.table({}))  # no columns at all
    inputs = scan([a, b, c, d], "prompt", "id")
    assert [f.rows for f in inputs.files] == [0, 4, 0, 0]
    assert inputs.rows == 4
    shards = make_shards(inputs.files, 2, 10)
    assert {s.path for s in shards} == {b}
