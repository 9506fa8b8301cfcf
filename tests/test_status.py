"""What status, progress and report read from a run directory's typed records (no vLLM, no Slurm)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import bare_plan

from hpcinfer.cli import compose
from hpcinfer.config import to_yaml
from hpcinfer.launch.progress import snapshot
from hpcinfer.report import row_of
from hpcinfer.rundir.files import atomic_write_json
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DONE, FAILED, RUNNING, STARTING, STOPPED, FinalizeOutcome, RankPlan, RankRecord
from hpcinfer.status import QUEUED, collect, rank_state, render, run_state


@pytest.fixture
def rd(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    plan = dataclasses.replace(
        bare_plan(3, per_rank=1),
        rows=30,
        model={"name": "tiny"},
        rank_plans=[RankPlan(r, [str(r)], [r], 10) for r in range(3)],
    )
    atomic_write_json(rd.plan, plan.to_json())
    rd.config.write_text(to_yaml(compose(["dp=3"])))
    return rd


@pytest.mark.parametrize(
    "own,job,expected",
    [
        (None, "PENDING", QUEUED),
        (None, "RUNNING", STARTING),
        (None, "FAILED", FAILED),
        (None, None, QUEUED),
        (RUNNING, "RUNNING", RUNNING),
        (RUNNING, None, RUNNING),
        (RUNNING, "NODE_FAIL", FAILED),
        (DONE, "FAILED", DONE),
        (STOPPED, "CANCELLED", STOPPED),
        (STARTING, "CANCELLED", FAILED),
    ],
)
def test_rank_state_from_the_record_and_the_job(own, job, expected):
    assert rank_state(None if own is None else RankRecord(0, state=own), job) == expected


def test_run_state():
    assert run_state([DONE, DONE], 0, True) == "finished"
    assert run_state([DONE, FAILED], None, False) == "failed"
    assert run_state([DONE, STOPPED], None, False) == "failed"
    assert run_state([DONE, DONE], 1, False) == "failed"
    assert run_state([DONE, RUNNING], None, False) == "running"
    assert run_state([QUEUED, QUEUED], None, False) == "queued"


def test_collect_reads_the_records(rd):
    rd.write_rank(
        RankRecord(
            0,
            token="a",
            host="h0",
            state=DONE,
            rows_done=10,
            output_tokens=100,
            generation_started_at=1000.0,
            generation_ended_at=1010.0,
        )
    )
    rd.write_rank(
        RankRecord(
            1,
            token="b",
            host="h1",
            state=FAILED,
            rows_done=4,
            output_tokens=40,
            generation_started_at=1000.0,
            error="ValueError: boom",
        )
    )
    rd.write_finalize_outcome(FinalizeOutcome("8", 1, "incomplete, nothing published", 1020.0))
    assert rd.read_finalize_outcome() == FinalizeOutcome("8", 1, "incomplete, nothing published", 1020.0)
    info = collect(rd, now=1020.0)
    assert [(r["rank"], r["state"], r["host"], r["rows_done"], r["rows"]) for r in info["ranks"]] == [
        (0, DONE, "h0", 10, 10),
        (1, FAILED, "h1", 4, 10),
        (2, QUEUED, None, 0, 10),
    ]
    assert info["ranks"][0]["tokens_per_second"] == pytest.approx(10.0)
    assert info["ranks"][1]["tokens_per_second"] == pytest.approx(2.0)  # still open: up to now
    assert info["state"] == "failed" and info["rows"] == 30 and info["rows_done"] == 14
    assert info["finalize"] == {
        "job_id": "8",
        "exit_code": 1,
        "message": "incomplete, nothing published",
        "finished_at": 1020.0,
    }
    assert info["model"] == "tiny" and info["layout"] == "dp=3 tp=1 pp=1"
    text = render(info)
    assert "--- rank 1 failed: ValueError: boom" in text and "14/30 done" in text


def test_progress_snapshot_sums_the_records(rd):
    assert snapshot(rd, 30).rows_done == 0
    rd.write_rank(RankRecord(0, state=RUNNING, rows_done=3, output_tokens=30, generation_started_at=5.0))
    rd.write_rank(RankRecord(2, state=DONE, rows_done=10, output_tokens=70, generation_started_at=4.0, finished_at=9.0))
    snap = snapshot(rd, 30)
    assert (snap.rows_done, snap.output_tokens, snap.generation_started_at) == (13, 100, 4.0)
    assert snap.states == {0: RUNNING, 2: DONE}
    assert snap.ended_at == {2: 9.0}  # the launcher looks again soon once its ranks' attempts ended


def test_report_row_from_the_plan(rd):
    row = row_of(rd)
    assert (row["layout"], row["devices"], row["device_kind"], row["state"], row["rows"]) == (
        "tp=1 pp=1 dp=3",
        3,
        "cuda",
        "unfinished",
        30,
    )
    atomic_write_json(rd.summary, {"output_tokens_per_second": 600.0, "wall_seconds": 2.0})
    assert row_of(rd)["per_device"] == 200.0


def test_render_shows_failed_rank_log_tail(tmp_path):
    log = tmp_path / "rank-1.log"
    log.write_text("starting\nTraceback ...\nValueError: boom\n")
    info = {
        "run_dir": "/r",
        "state": "failed",
        "model": "tiny",
        "layout": "dp=2 tp=1 pp=1",
        "rows": 10,
        "rows_done": 5,
        "tokens_per_second": 0.0,
        "eta_seconds": None,
        "jobs": {"workers": {"7": "FAILED"}, "finalize": {"8": "COMPLETED"}, "reasons": {}},
        "finalize": {"exit_code": 1, "message": "incomplete, nothing published: shard 1 missing"},
        "ranks": [
            {
                "rank": 0,
                "state": "done",
                "host": "n1",
                "rows_done": 5,
                "rows": 5,
                "tokens_per_second": 9.0,
                "job": "7",
                "error": None,
                "log": "x",
            },
            {
                "rank": 1,
                "state": "failed",
                "host": "n2",
                "rows_done": 0,
                "rows": 5,
                "tokens_per_second": 0.0,
                "job": "7",
                "error": "ValueError: boom",
                "log": str(log),
            },
        ],
    }
    text = render(info)
    assert "workers 7 FAILED; finalize 8 COMPLETED" in text
    assert "--- rank 1 failed: ValueError: boom" in text and text.rstrip().endswith("ValueError: boom")
    assert "finalize  exit 1: incomplete" in text and "5/10 done (50%)" in text


def test_status_says_what_was_repaired(rd):
    from hpcinfer.rundir.integrity import record
    from hpcinfer.rundir.records import Repair

    record(
        rd, Repair("shard output", "shards/000002.parquet", "unreadable: torn", "moved to discarded/x", "submit", 1.0)
    )
    info = collect(rd)
    assert info["repaired"] == [
        "shard output shards/000002.parquet: unreadable: torn; moved to discarded/x (found by submit)"
    ]
    assert "repaired  shard output shards/000002.parquet: unreadable: torn; moved to discarded/x" in render(info)
