"""Input data: partitioning, sharding, discovery, schema checks, the manifest, reading shards."""
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.errors import DataError
from hpcinfer.planning.inputs import InputFile, Inputs, discover, scan
from hpcinfer.planning.sharding import active_ranks, make_shards, partition
from hpcinfer.rundir.manifest import Shard, read_manifest, read_shard, write_manifest


# ---- helpers ------------------------------------------------------------------------------------
def write_parquet(path, table, **kw):
    pq.write_table(table, str(path), **kw)
    return str(path)


def prompts_table(n, start=0):
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                     "prompt": pa.array([f"prompt {i}" for i in range(start, start + n)], pa.string())})


def files_of(sizes):
    return [InputFile(f"/data/part-{i:03d}.parquet", n) for i, n in enumerate(sizes)]


def check_shards(files, ranks, max_rows, shards):
    """Every invariant make_shards promises."""
    total = sum(f.rows for f in files)
    offsets, off = {}, 0
    for f in files:
        offsets[f.path] = (off, f.rows)
        off += f.rows
    # numbered in global order, contiguous, covering every row exactly once
    assert [s.shard for s in shards] == list(range(len(shards)))
    pos = 0
    for s in shards:
        assert s.global_start == pos
        assert 1 <= s.rows <= max_rows
        f_off, f_rows = offsets[s.path]
        # inside one file: never crosses a file boundary
        assert 0 <= s.file_start < s.file_end <= f_rows
        assert s.global_start == f_off + s.file_start
        pos += s.rows
    assert pos == total
    # ranks are non-decreasing in global order and each rank owns exactly its partition range
    assert [s.rank for s in shards] == sorted(s.rank for s in shards)
    for r, (lo, hi) in enumerate(partition(total, ranks)):
        mine = [s for s in shards if s.rank == r]
        if hi == lo:
            assert mine == []
            continue
        assert mine[0].global_start == lo
        assert mine[-1].global_start + mine[-1].rows == hi
        assert sum(s.rows for s in mine) == hi - lo


# ---- partition ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, ranks", [(10, 3), (10, 1), (10, 10), (7, 4), (1000, 7), (5, 2), (64, 8)])
def test_partition_near_equal_contiguous_covering(n, ranks):
    parts = partition(n, ranks)
    assert len(parts) == ranks
    sizes = [hi - lo for lo, hi in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(parts[i][1] == parts[i + 1][0] for i in range(ranks - 1))
    extra = n % ranks
    assert sizes == [n // ranks + 1] * extra + [n // ranks] * (ranks - extra)  # remainder first


def test_partition_examples():
    assert partition(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert partition(1, 1) == [(0, 1)]
    assert partition(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert partition(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]  # empty tail ranges
    assert partition(0, 3) == [(0, 0), (0, 0), (0, 0)]


def test_partition_rejects_no_ranks():
    with pytest.raises(ValueError):
        partition(10, 0)


@pytest.mark.parametrize("rows, dp, want", [(100, 4, 4), (3, 8, 3), (1, 8, 1), (0, 4, 1), (5, 5, 5), (5, 1, 1)])
def test_active_ranks(rows, dp, want):
    assert active_ranks(rows, dp) == want


# ---- make_shards --------------------------------------------------------------------------------
def test_make_shards_one_row():
    shards = make_shards(files_of([1]), ranks=4, max_rows=10)
    assert shards == [Shard(0, 0, "/data/part-000.parquet", 0, 1, 0)]


def test_make_shards_fewer_rows_than_ranks():
    shards = make_shards(files_of([3]), ranks=5, max_rows=10)
    assert [(s.rank, s.file_start, s.file_end) for s in shards] == [(0, 0, 1), (1, 1, 2), (2, 2, 3)]
    check_shards(files_of([3]), 5, 10, shards)


@pytest.mark.parametrize("sizes", [[0, 5, 0, 7], [0, 0, 4], [6, 0, 0], [3, 0, 3], [0], [0, 0]])
def test_make_shards_skips_empty_files(sizes):
    files = files_of(sizes)
    shards = make_shards(files, ranks=2, max_rows=3)
    empty = {f.path for f in files if f.rows == 0}
    assert not any(s.path in empty for s in shards)
    check_shards(files, 2, 3, shards)


def test_make_shards_cut_at_file_boundaries_and_max_rows():
    files = files_of([5, 4])
    shards = make_shards(files, ranks=1, max_rows=3)
    assert [(s.path[-12:], s.file_start, s.file_end, s.global_start) for s in shards] == [
        ("-000.parquet", 0, 3, 0), ("-000.parquet", 3, 5, 3),
        ("-001.parquet", 0, 3, 5), ("-001.parquet", 3, 4, 8)]


def test_make_shards_rank_range_spans_files():
    files = files_of([3, 3])
    shards = make_shards(files, ranks=2, max_rows=100)
    # 6 rows over 2 ranks: rank 0 = rows 0-2 (file 0), rank 1 = rows 3-5 (file 1)
    assert [(s.rank, s.path[-12:], s.file_start, s.file_end) for s in shards] == [
        (0, "-000.parquet", 0, 3), (1, "-001.parquet", 0, 3)]
    shards = make_shards(files_of([5, 1]), ranks=2, max_rows=100)
    # rank 0 = rows 0-2, rank 1 = rows 3-5: rank 1 spans the end of file 0 and file 1
    assert [(s.rank, s.path[-12:], s.file_start, s.file_end) for s in shards] == [
        (0, "-000.parquet", 0, 3), (1, "-000.parquet", 3, 5), (1, "-001.parquet", 0, 1)]


def test_make_shards_no_rows():
    assert make_shards(files_of([0, 0]), ranks=3, max_rows=5) == []


def test_make_shards_rejects_bad_max_rows():
    with pytest.raises(ValueError):
        make_shards(files_of([3]), ranks=1, max_rows=0)


def test_make_shards_property():
    """Random file-size lists (with empty files, tiny files, more ranks than rows)."""
    for seed in range(1000):
        rng = random.Random(seed)
        n_files = rng.randint(1, 8)
        sizes = [rng.choice([0, 0, 1, 2, rng.randint(0, 60)]) for _ in range(n_files)]
        ranks = rng.randint(1, 12)
        max_rows = rng.randint(1, 25)
        files = files_of(sizes)
        try:
            check_shards(files, ranks, max_rows, make_shards(files, ranks, max_rows))
        except AssertionError as e:
            raise AssertionError(f"seed={seed} sizes={sizes} ranks={ranks} max_rows={max_rows}") from e


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
    (tmp_path / "x.csv").write_text("a,b\n")
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
    p = write_parquet(tmp_path / "a.parquet", pa.table({"id": pa.array([1, None, 3, None]),
                                                       "prompt": ["a", "b", "c", "d"]}))
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


def nested_table(n=13, start=0):
    rows = range(start, start + n)
    return pa.table({
        "id": pa.array(rows, pa.int64()),
        "prompt": pa.array([f"Grüße {i} — 日本語 🚀" if i % 3 else None for i in rows], pa.string()),
        "tags": pa.array([[f"t{j}" for j in range(i % 4)] for i in rows], pa.list_(pa.string())),
        "meta": pa.array([{"a": i, "b": [float(i)] * (i % 2), "s": "ü" * (i % 3)} for i in rows],
                         pa.struct([("a", pa.int64()), ("b", pa.list_(pa.float64())), ("s", pa.string())])),
    })


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


@pytest.mark.parametrize("start, end", [(0, 50), (0, 1), (49, 50), (10, 23), (7, 14), (6, 8), (13, 14),
                                        (14, 15), (0, 7), (21, 49)])
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
