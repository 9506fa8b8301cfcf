"""The manifest and reading a shard's rows (rundir/manifest.py), nested columns and Unicode included."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import prompts_table, write_parquet

from hpcinfer.errors import DataError
from hpcinfer.planning.inputs import scan
from hpcinfer.planning.sharding import make_shards
from hpcinfer.rundir.manifest import Shard, read_manifest, read_shard, write_manifest


def nested_table(n=13, start=0):
    rows = range(start, start + n)
    return pa.table(
        {
            "id": pa.array(rows, pa.int64()),
            "prompt": pa.array([f"Grüße {i} — 日本語 🚀" if i % 3 else None for i in rows], pa.string()),
            "tags": pa.array([[f"t{j}" for j in range(i % 4)] for i in rows], pa.list_(pa.string())),
            "meta": pa.array(
                [{"a": i, "b": [float(i)] * (i % 2), "s": "ü" * (i % 3)} for i in rows],
                pa.struct([("a", pa.int64()), ("b", pa.list_(pa.float64())), ("s", pa.string())]),
            ),
        }
    )


def test_nested_columns_and_unicode_survive(tmp_path):
    t1, t2 = nested_table(13), nested_table(9, start=13)
    a = write_parquet(tmp_path / "a.parquet", t1, row_group_size=4)
    b = write_parquet(tmp_path / "b.parquet", t2, row_group_size=4)
    inputs = scan([a, b], "prompt", "id")
    assert inputs.schema.field("tags").type == pa.list_(pa.string())
    assert pa.types.is_struct(inputs.schema.field("meta").type)
    shards = make_shards(inputs.files, 3, 5)
    got = pa.concat_tables([read_shard(s, inputs.schema) for s in shards])
    want = pa.concat_tables([t1, t2])
    assert got.schema.equals(want.schema)
    assert got.to_pylist() == want.to_pylist()


# ---- manifest -----------------------------------------------------------------------------------
def test_manifest_round_trip(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", nested_table(20))
    inputs = scan([p], "prompt")
    shards = make_shards(inputs.files, 3, 4)
    m = tmp_path / "manifest.parquet"
    write_manifest(str(m), shards, inputs.schema)
    got_shards, got_schema = read_manifest(str(m))
    assert got_shards == shards
    assert all(isinstance(s, Shard) for s in got_shards)
    assert got_schema.equals(inputs.schema)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.parquet", "manifest.parquet"]  # no temp files


# ---- read_shard ---------------------------------------------------------------------------------
@pytest.fixture
def fifty_rows(tmp_path):
    table = prompts_table(50)
    path = write_parquet(tmp_path / "a.parquet", table, row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == 8
    return path, table


@pytest.mark.parametrize(
    "start, end", [(0, 50), (0, 1), (49, 50), (10, 23), (7, 14), (6, 8), (13, 14), (14, 15), (0, 7), (21, 49)]
)
def test_read_shard_exact_rows(fifty_rows, start, end):
    path, table = fifty_rows
    schema = scan([path], "prompt").schema
    got = read_shard(Shard(0, 0, path, start, end, start), schema)
    assert got.num_rows == end - start
    assert got.column("id").to_pylist() == list(range(start, end))
    assert got.column("prompt").to_pylist() == [f"prompt {i}" for i in range(start, end)]
    assert got.schema.equals(schema)


def test_read_shard_all_shards_reassemble_file(fifty_rows):
    path, table = fifty_rows
    inputs = scan([path], "prompt")
    shards = make_shards(inputs.files, 3, 5)
    got = pa.concat_tables([read_shard(s, inputs.schema) for s in shards])
    assert got.equals(table.replace_schema_metadata(None))


def test_read_shard_casts_to_run_schema(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", pa.table({"prompt": ["x", "y"], "n": pa.array([1, 2], pa.int32())}))
    b = write_parquet(tmp_path / "b.parquet", pa.table({"prompt": ["z"], "n": pa.array([3], pa.int64())}))
    inputs = scan([a, b], "prompt")
    assert inputs.schema.field("n").type == pa.int64()
    shards = make_shards(inputs.files, 1, 10)
    t = read_shard(shards[0], inputs.schema)
    assert t.schema.equals(inputs.schema)
    assert t.column("n").type == pa.int64()
    assert t.column("n").to_pylist() == [1, 2]


def test_read_shard_file_shrank(fifty_rows, tmp_path):
    path, table = fifty_rows
    schema = scan([path], "prompt").schema
    write_parquet(path, table.slice(0, 20))
    with pytest.raises(DataError, match="fewer than"):
        read_shard(Shard(0, 0, path, 15, 30, 15), schema)
