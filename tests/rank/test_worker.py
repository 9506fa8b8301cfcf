"""A rank's work and its end, without vLLM: the Work protocol and its two schedules (rank/work.py),
and what a launcher records once a rank process has ended (worker.record_exit, should_restart).
The shard loop itself runs with a fake engine in tests/test_claims.py."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.rank.work import ClaimedWork, StaticWork, Work
from hpcinfer.rank.worker import record_exit, should_restart
from hpcinfer.rundir import output
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.output import RowResult
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DONE, FAILED, RUNNING, STOPPED, DoneRecord, RankRecord


@pytest.fixture
def rd(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    return rd


# ---- work.py ------------------------------------------------------------------------------------
def test_both_schedules_are_work(rd):
    shards = [Shard(i, 0, "/f", i, i + 1, i, 1) for i in range(3)]
    assert isinstance(StaticWork(rd, shards), Work)
    claimed = ClaimedWork(rd, 0, 1, "tok", shards, lease_s=60)
    try:
        assert isinstance(claimed, Work)
    finally:
        claimed.close()


def mark_done(rd, s):
    """Shard `s` done, with an output of its rows (one per position)."""
    rows = pa.table({"prompt": [f"p{i}" for i in range(s.rows)]})
    results = [RowResult("g", "length", 1, 1, None)] * s.rows
    pq.write_table(output.shard_table(rows, results, s.global_start), rd.shard_output(s.shard))
    rd.mark_done(DoneRecord(s.shard, s.rank, "h", s.rows, 0, s.rows, s.rows, 0.1))


def test_static_work_skips_done_shards(rd):
    shards = [Shard(i, 0, "/f", i, i + 1, i, 1) for i in range(3)]
    mark_done(rd, shards[1])
    work = StaticWork(rd, shards)
    assert work.describe() == "2 of 3 shard(s) to do"
    assert [work.next().shard, work.next().shard, work.next()] == [0, 2, None] and work.exhausted()


# ---- a rank process's end -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "code,state,expect",
    [
        (-9, RUNNING, "killed by signal 9"),
        (3, None, "exited with code 3"),
        (0, RUNNING, None),
        (1, FAILED, None),
        (-15, STOPPED, None),
    ],
)
def test_record_exit_marks_silent_deaths_failed(rd, code, state, expect):
    if state:
        rd.write_rank(RankRecord(0, token="t", state=state, rows_done=3, error="own" if state != RUNNING else None))
    record_exit(rd, 0, code)
    after = rd.read_rank(0)
    if expect:
        assert after.state == FAILED and expect in after.error and after.finished_at
        assert after.rows_done == (3 if state else 0) and after.token == ("t" if state else None)
    else:
        assert after is None or after.state == state


@pytest.mark.parametrize(
    "code,state,left,restart",
    [(1, FAILED, 1, True), (1, FAILED, 0, False), (-9, RUNNING, 2, True), (1, STOPPED, 3, False), (0, DONE, 1, False)],
)
def test_should_restart_only_failures_within_budget(rd, code, state, left, restart):
    rd.write_rank(RankRecord(0, state=state))
    assert should_restart(rd, 0, code, left) is restart


def test_start_gate_says_ready_then_waits_for_the_gate_and_unset_waits_for_nothing(tmp_path):
    """HPCINFER_START_GATE (bench/overhead.py's concurrent pairs): the rank writes its ready file
    with the time, and generates only once the gate exists."""
    import threading
    import time

    from hpcinfer.rank.worker import wait_at_gate

    t0 = time.time()
    wait_at_gate(None, 0)
    wait_at_gate("", 0)
    assert time.time() - t0 < 0.05 and list(tmp_path.iterdir()) == []
    gate = tmp_path / "gate"
    threading.Timer(0.3, gate.touch).start()
    wait_at_gate(str(gate), 3)
    assert time.time() - t0 >= 0.3
    ready = float((tmp_path / "gate.rank3.ready").read_text())
    assert t0 <= ready < t0 + 0.2
