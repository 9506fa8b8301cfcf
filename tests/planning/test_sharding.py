"""Cutting the rows into shards (planning/sharding.py): partition, active ranks, make_shards."""

from __future__ import annotations

import random

import pytest

from hpcinfer.planning.inputs import InputFile
from hpcinfer.planning.sharding import active_ranks, make_shards, partition
from hpcinfer.rundir.manifest import Shard


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
        ("-000.parquet", 0, 3, 0),
        ("-000.parquet", 3, 5, 3),
        ("-001.parquet", 0, 3, 5),
        ("-001.parquet", 3, 4, 8),
    ]


def test_make_shards_rank_range_spans_files():
    files = files_of([3, 3])
    shards = make_shards(files, ranks=2, max_rows=100)
    # 6 rows over 2 ranks: rank 0 = rows 0-2 (file 0), rank 1 = rows 3-5 (file 1)
    assert [(s.rank, s.path[-12:], s.file_start, s.file_end) for s in shards] == [
        (0, "-000.parquet", 0, 3),
        (1, "-001.parquet", 0, 3),
    ]
    shards = make_shards(files_of([5, 1]), ranks=2, max_rows=100)
    # rank 0 = rows 0-2, rank 1 = rows 3-5: rank 1 spans the end of file 0 and file 1
    assert [(s.rank, s.path[-12:], s.file_start, s.file_end) for s in shards] == [
        (0, "-000.parquet", 0, 3),
        (1, "-000.parquet", 3, 5),
        (1, "-001.parquet", 0, 1),
    ]


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
