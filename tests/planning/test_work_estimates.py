"""Work estimates and the dynamic schedule's shards: token-sized shards (cut_by_tokens), the expected
ranks of the plan, per-row estimates and per-row output caps.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.errors import DataError
from hpcinfer.planning.inputs import InputFile, scan
from hpcinfer.planning.sharding import cut_by_tokens, expected_ranks, row_tokens


# ---- cutting by tokens -----------------------------------------------------------------------
def files_of(sizes):
    return [InputFile(f"/data/part-{i}.parquet", n) for i, n in enumerate(sizes)]


def test_cut_by_tokens_gives_long_rows_their_own_small_shards():
    files = files_of([10, 10])
    tokens = [[100] * 10, [10] * 10]  # the first file's rows are 10x longer
    shards = cut_by_tokens(files, tokens, ranks=2, shards_per_rank=2, max_rows=100)
    # target = 1100 / 4 = 275 tokens: 3 long rows per shard, then the short file's rows together
    assert [(s.path[-10:], s.file_start, s.file_end, s.tokens) for s in shards] == [
        ("-0.parquet", 0, 3, 300),
        ("-0.parquet", 3, 6, 300),
        ("-0.parquet", 6, 9, 300),
        ("-0.parquet", 9, 10, 100),
        ("-1.parquet", 0, 10, 100),
    ]
    assert [s.global_start for s in shards] == [0, 3, 6, 9, 10]


@pytest.mark.parametrize("seed", range(20))
def test_cut_by_tokens_covers_every_row_once_in_order(seed):
    rng = np.random.default_rng(seed)
    sizes = list(rng.integers(0, 30, size=rng.integers(1, 5)))
    tokens = [list(rng.integers(1, 500, size=n)) for n in sizes]
    ranks, per, max_rows = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 12))
    shards = cut_by_tokens(files_of(sizes), tokens, ranks, per, max_rows)
    covered, offset = [], 0
    for i, n in enumerate(sizes):
        mine = [s for s in shards if s.path.endswith(f"-{i}.parquet")]
        assert [r for s in mine for r in range(s.file_start, s.file_end)] == list(range(n))
        assert all(s.global_start == offset + s.file_start for s in mine)
        assert all(s.tokens == sum(tokens[i][s.file_start : s.file_end]) for s in mine)
        offset += n
        covered += mine
    assert [s.shard for s in shards] == list(range(len(shards)))
    assert all(1 <= s.rows <= max_rows for s in shards)
    target = -(-sum(map(sum, tokens)) // (ranks * per)) if shards else 0
    # a shard only passes the target by its last row
    assert all(s.rows == 1 or sum(tokens[int(s.path[-9])][s.file_start : s.file_end - 1]) < target for s in shards)


def test_expected_ranks_is_greedy_longest_first():
    assert expected_ranks([10, 1, 1, 7, 3], 2) == [0, 0, 1, 1, 1]  # 10 | 7, 3 | then the 1s alternate
    assert expected_ranks([4, 4, 4, 4], 4) == [0, 1, 2, 3]
    assert expected_ranks([], 3) == []


def test_row_tokens_weighs_prompt_bytes_and_the_per_row_cap(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a" * 40, None, "ü" * 20], "cap": pa.array([None, 7, 100], pa.int32())}), path)
    files = [InputFile(str(path), 3)]
    # 40 bytes = 11 prompt tokens ~ 2 output tokens of work; + 1; + the cap
    assert row_tokens(files, "prompt", None, 50)[0].tolist() == [2 + 1 + 50, 0 + 1 + 50, 2 + 1 + 50]
    assert row_tokens(files, "prompt", "cap", 50)[0].tolist() == [2 + 1 + 50, 0 + 1 + 7, 2 + 1 + 100]


@pytest.mark.parametrize(
    "values, message",
    [
        (pa.array(["1", "2"]), "has type string; expected integers"),
        (pa.array([3, 0], pa.int64()), "must be >= 1, but row 1 of"),
        (pa.array([-5, None], pa.int16()), "must be >= 1, but row 0 of"),
    ],
)
def test_max_tokens_column_bad_values(tmp_path, values, message):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "cap": values}), path)
    with pytest.raises(DataError, match=message):
        scan([str(path)], "prompt", None, "cap")


def test_max_tokens_column_missing(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), path)
    with pytest.raises(DataError, match="data.max_tokens_column='cap' is not a column"):
        scan([str(path)], "prompt", None, "cap")
