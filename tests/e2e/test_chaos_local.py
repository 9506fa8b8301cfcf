"""Exactly once, whatever fails (local backend, real vLLM): kill -9 of busy ranks mid-shard, then
resume; a killed rank restarted in place; a torn shard output set aside and generated again on
resume; results identical to an undisturbed run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import CHAOS_CHUNK, CHAOS_ROWS, REPO, busy_rank, chaos_args

pytestmark = pytest.mark.vllm

ROWS, CHUNK = CHAOS_ROWS, CHAOS_CHUNK


def start(cli_env, *argv):
    return subprocess.Popen(
        [sys.executable, "-m", "hpcinfer.submit", *argv],
        cwd=REPO,
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when_busy(run_dir, rank, min_rows, proc):
    """SIGKILL rank `rank`'s worker once it has finished `min_rows` rows of its shard (mid-shard)."""
    s = busy_rank(run_dir, rank, min_rows, proc)
    os.kill(s["pid"], signal.SIGKILL)
    return s["rows_done"]


def test_kill9_mid_shard_then_resume_is_exactly_once(chaos_inputs, tmp_path, cli_env, hpcinfer, chaos_reference):
    """Static schedule: nobody else may take the killed rank's shards; `resume` finishes them."""
    run_dir = tmp_path / "run"
    proc = start(cli_env, *chaos_args(chaos_inputs, run_dir, "dp=2", "rank_retries=0", "schedule.mode=static"))
    kill_when_busy(run_dir, 1, 3 * CHUNK, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "incomplete" in err, err
    assert not (run_dir / "results.parquet").exists()
    parts = list((run_dir / "shards").glob("*.parts/*.parquet"))
    assert parts, "the killed rank left no durable parts"
    r = hpcinfer("resume", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["rows_recomputed"] <= CHUNK
    assert {r["rank"]: r["attempts"] for r in summary["ranks"]} == {0: 1, 1: 2}
    assert not list((run_dir / "shards").glob("*.parts"))  # parts are gone once their shard is done


def test_kill9_without_retries_the_other_rank_takes_the_shards_over(chaos_inputs, tmp_path, cli_env, chaos_reference):
    """Dynamic schedule: the killed rank's claims go to the live rank, with their durable parts,
    and the run completes without a resume."""
    run_dir = tmp_path / "run"
    proc = start(cli_env, *chaos_args(chaos_inputs, run_dir, "dp=2", "rank_retries=0"))
    kill_when_busy(run_dir, 1, 3 * CHUNK, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "rank 1 failed" in err
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["rows_recomputed"] <= CHUNK
    assert {r["rank"]: r["attempts"] for r in summary["ranks"]} == {0: 1, 1: 1}
    taken_over = [p.name for p in (run_dir / "claims").iterdir() if not p.name.endswith(".0")]
    assert taken_over, "no claim of the killed rank was taken over"
    assert sum(r["rows"] for r in summary["ranks"] if r["rank"] == 0) > ROWS // 2
    assert not list((run_dir / "shards").glob("*.parts"))


def test_random_kills_restart_in_place_and_results_are_identical(chaos_inputs, tmp_path, cli_env, chaos_reference):
    seed = int(time.time())
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    proc = start(cli_env, *chaos_args(chaos_inputs, run_dir, "dp=2", "rank_retries=2"))
    victims = rng.sample([0, 1], rng.choice([1, 2]))
    for rank in victims:
        kill_when_busy(run_dir, rank, rng.randrange(CHUNK, 120), proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"seed {seed}: {err}"
    assert "restarting it" in err
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference), f"seed {seed}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rows_recomputed"] <= CHUNK * len(victims), f"seed {seed}"
    assert all(r["attempts"] == (2 if r["rank"] in victims else 1) for r in summary["ranks"]), summary["ranks"]


def test_the_torn_shard_resume_gives_results_identical_to_an_undisturbed_run(
    chaos_inputs, tmp_path, hpcinfer, chaos_reference
):
    """A finished run whose shard output was truncated (a node lost mid-copy, a bad sync), with
    results.parquet and summary.json removed: `resume` sets the torn shard aside, generates only
    its rows again and publishes results identical to the undisturbed run's; status says so."""
    run_dir = tmp_path / "run"
    r = hpcinfer("submit", *chaos_args(chaos_inputs, run_dir, "dp=2", "schedule.mode=static"))
    assert r.returncode == 0, r.stderr
    torn = run_dir / "shards" / "000001.parquet"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    (run_dir / "results.parquet").unlink()
    (run_dir / "summary.json").unlink()
    r = hpcinfer("resume", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "repaired: shard output shards/000001.parquet: unreadable" in r.stderr
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    [repair] = summary["repaired"]
    assert (repair["what"], repair["path"], repair["by"]) == ("shard output", "shards/000001.parquet", "submit")
    assert summary["rows_recomputed"] == ROWS // 2  # the torn shard's rows, no more
    assert {r["rank"]: r["attempts"] for r in summary["ranks"]} == {0: 1, 1: 2}  # only its rank ran again
    status = hpcinfer("status", str(run_dir))
    assert status.returncode == 0 and "repaired  shard output shards/000001.parquet" in status.stdout
