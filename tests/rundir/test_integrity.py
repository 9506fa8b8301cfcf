"""Trusting what is on disk (rundir/integrity.py): torn, missing or unreadable shard outputs, done
markers, parts, claims and rank records are found, set aside with a Repair record, and never read
as complete."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.rundir import output
from hpcinfer.rundir.claims import Claims, parse_claim_name
from hpcinfer.rundir.integrity import output_problem, read_rank_checked, verify_done
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.output import RowResult
from hpcinfer.rundir.parts import ShardCheckpoint
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DoneRecord, RankRecord


@pytest.fixture
def rd(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    return rd


SHARDS = [Shard(i, 0, "/in.parquet", 5 * i, 5 * i + 5, 5 * i, 5) for i in range(3)]


def inputs(s):
    return pa.table({"prompt": [f"p{s.global_start + i}" for i in range(s.rows)]})


def results(s):
    return [RowResult(f"gen {s.global_start + i}", "length", 1, 1, None) for i in range(s.rows)]


def write_done(rd, s, table=None):
    pq.write_table(
        table if table is not None else output.shard_table(inputs(s), results(s), s.global_start),
        rd.shard_output(s.shard),
    )
    rd.mark_done(DoneRecord(s.shard, s.rank, "h", s.rows, 0, s.rows, s.rows, 0.1))


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


# ---- a done shard -------------------------------------------------------------------------------
def test_output_problem_names_what_is_wrong(rd):
    s = SHARDS[1]
    write_done(rd, s)
    assert output_problem(rd.shard_output(1), s) is None
    assert output_problem(rd.shard_output(2), SHARDS[2]) == "missing"
    assert output_problem(rd.shard_output(1), SHARDS[0]) == "row positions 5..9, its shard has 0..4"
    longer = Shard(1, 0, "/in.parquet", 5, 11, 5, 6)
    assert output_problem(rd.shard_output(1), longer) == "5 rows, its shard has 6"
    truncate(rd.shard_output(1))
    assert output_problem(rd.shard_output(1), s).startswith("unreadable: ")
    assert "magic bytes" in output_problem(rd.shard_output(1), s)


def test_a_torn_output_is_set_aside_with_its_marker_and_recorded(rd):
    for s in SHARDS:
        write_done(rd, s)
    truncate(rd.shard_output(1))
    torn_bytes = rd.shard_output(1).read_bytes()
    verified = verify_done(rd, SHARDS, "test")
    assert verified.done == {0, 2}
    assert not rd.is_done(1) and not rd.shard_output(1).exists()
    [repair] = verified.repairs
    assert (repair.what, repair.path, repair.by) == ("shard output", "shards/000001.parquet", "test")
    assert repair.why.startswith("unreadable: ") and "generated again" in repair.action
    moved = sorted(p.name for p in rd.discarded_dir.iterdir())
    assert [n.split(".", 1)[1] for n in moved] == ["done_000001.json", "shards_000001.parquet"]
    assert (rd.discarded_dir / moved[1]).read_bytes() == torn_bytes  # moved, not rewritten
    assert [r.path for r in rd.read_repairs()] == ["shards/000001.parquet"]
    assert verify_done(rd, SHARDS, "test").repairs == []  # found once


@pytest.mark.parametrize("content", [b"", b'{"shard": 1, "ra', b"\xff\xfe", b"[]", b'{"shard": 2}'])
def test_an_unreadable_done_marker_is_set_aside(rd, content):
    for s in SHARDS:
        write_done(rd, s)
    rd.done_marker(1).write_bytes(content)
    verified = verify_done(rd, SHARDS, "test")
    assert verified.done == {0, 2}
    assert [(r.what, r.path) for r in verified.repairs] == [("done marker", "done/000001.json")]
    assert not rd.shard_output(1).exists()  # its output goes with it: nothing says it is shard 1's


def test_a_marker_naming_another_shard_is_not_trusted(rd):
    write_done(rd, SHARDS[0])
    rd.done_marker(0).write_text(json.dumps(DoneRecord(1, 0, "h", 5, 0, 5, 5, 0.1).to_json()))
    [repair] = verify_done(rd, SHARDS, "test").repairs
    assert "names shard 1" in repair.why


def test_verified_done_shards_reads_the_manifest(rd, tmp_path):
    from hpcinfer.rundir.manifest import write_manifest

    write_manifest(str(rd.manifest), SHARDS, pa.schema([("prompt", pa.string())]))
    for s in SHARDS:
        write_done(rd, s)
    rd.shard_output(2).unlink()
    assert rd.done_shards() == {0, 1, 2}
    assert rd.verified_done_shards() == {0, 1}
    assert rd.done_shards() == {0, 1}  # what the launcher's unfinished_ranks reads next


# ---- parts, claims, rank records ----------------------------------------------------------------
def test_a_torn_part_is_set_aside_and_its_rows_are_todo(rd):
    s = SHARDS[1]
    ck = ShardCheckpoint(rd, s, inputs(s), every_rows=2, every_seconds=3600)
    for p, r in enumerate(results(s)[:4]):
        ck.add(p, r)
    parts = ck.part_files()
    assert len(parts) == 2 and ck.todo() == [4]
    truncate(parts[0], keep=50)
    again = ShardCheckpoint(rd, s, inputs(s), every_rows=2, every_seconds=3600, by="rank 0 (t)")
    assert again.todo() == [0, 1, 4]
    assert [p.name for p in again.part_files()] == ["000001.parquet"]
    assert again.seq == 2  # a set-aside part's number is never reused
    [repair] = rd.read_repairs()
    assert (repair.what, repair.path, repair.by) == ("part", "shards/000001.parts/000000.parquet", "rank 0 (t)")
    for p in (0, 1, 4):
        again.add(p, results(s)[p])
    again.flush()
    assert again.complete().column("generated_text").to_pylist() == [f"gen {i}" for i in range(5, 10)]


def test_a_part_with_foreign_rows_is_set_aside(rd):
    s = SHARDS[1]
    rd.shard_parts(1).mkdir()
    pq.write_table(output.output_table(inputs(s), [0], results(s)[:1], 100), rd.shard_parts(1) / "000000.parquet")
    ck = ShardCheckpoint(rd, s, inputs(s), every_rows=2, every_seconds=3600)
    assert ck.todo() == list(range(5))
    assert "outside its shard" in rd.read_repairs()[0].why


def test_an_unreadable_claim_is_dead_and_taken_over_once(rd):
    rd.claims_dir.mkdir()
    rd.claim(0, 0).write_text('{"rank": 1, "tok')  # a claim torn by a crash (claims are not fsynced)
    claims = Claims(rd, 0, "tok-0", [0, 1], lease_s=3600)
    assert claims.next() == 1  # shard 0's claim has no holders/ name: claiming it lost the race ...
    assert claims.next() == 0  # ... so it is read, and taken over at once, no lease to wait for
    assert sorted(parse_claim_name(p.name) for p in rd.claims_dir.iterdir()) == [(0, 0), (0, 1), (1, 0)]
    other = Claims(rd, 1, "tok-1", [0, 1, 2], lease_s=3600)
    assert other.next() == 2
    [repair] = rd.read_repairs()  # recorded once, whoever reads it
    assert (repair.what, repair.path) == ("claim", "claims/000000.0")
    assert "taken over" in repair.action


def test_an_unreadable_rank_record_is_set_aside(rd):
    rd.write_rank(RankRecord(0, attempts=3))
    assert read_rank_checked(rd, 0, "rank 0").attempts == 3
    rd.rank_file(0).write_text('{"rank": 0, "attem')
    assert read_rank_checked(rd, 0, "rank 0") is None
    assert not rd.rank_file(0).exists()
    [repair] = rd.read_repairs()
    assert repair.what == "rank record" and "counters start again" in repair.action
