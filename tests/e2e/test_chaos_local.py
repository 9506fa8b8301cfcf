"""The chaos suite (local backend, real vLLM): each fault of the README's failures table, done for
real to a dp=2 run of one workload, then what the user does about it (nothing, or `resume`); the
published results must equal the session's undisturbed run, row for row. One parametrized test,
one table: a fault is a row of FAULTS."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pyarrow.parquet as pq
import pytest
from conftest import CHAOS_CHUNK, CHAOS_ROWS, REPO, busy_rank, busy_ranks, chaos_args, fill_disk

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


def attempts(summary) -> dict:
    return {r["rank"]: r["attempts"] for r in summary["ranks"]}


@dataclass(frozen=True)
class Fault:
    """A fault and its expected course. `during(run_dir, proc)` acts on the running submit and
    returns what `check` needs to know; submit must exit with `exit_code` (1: nothing published);
    then `recover(run_dir, hpcinfer)` is what the user does (a CompletedProcess that must succeed),
    and `check(run_dir, summary, stderr, during's value)` the fault's own assertions."""

    args: tuple
    during: Callable = lambda run_dir, proc: None
    exit_code: int = 0
    recover: Optional[Callable] = None
    check: Callable = lambda run_dir, summary, err, seen: None
    small_disk: bool = False  # the run directory on a 4 MiB tmpfs (small_fs)


def resume(run_dir, hpcinfer):
    return hpcinfer("resume", str(run_dir))


# --- kill -9 of a busy rank, static schedule, no retries: its shards wait for `resume` ---------------
def check_static_kill(run_dir, summary, err, seen):
    assert "incomplete" in err
    assert 0 <= summary["rows_recomputed"] <= CHUNK  # at most one part's rows
    assert attempts(summary) == {0: 1, 1: 2}
    assert not list((run_dir / "shards").glob("*.parts"))  # parts are gone once their shard is done


# --- kill -9 of a busy rank, dynamic schedule, no retries: the live rank takes its claims over ------
def check_takeover(run_dir, summary, err, seen):
    assert "rank 1 failed" in err
    assert 0 <= summary["rows_recomputed"] <= CHUNK
    assert attempts(summary) == {0: 1, 1: 1}
    taken_over = [p.name for p in (run_dir / "claims").iterdir() if not p.name.endswith(".0")]
    assert taken_over, "no claim of the killed rank was taken over"
    assert sum(r["rows"] for r in summary["ranks"] if r["rank"] == 0) > ROWS // 2
    assert not list((run_dir / "shards").glob("*.parts"))


# --- random kills of one or both ranks, with retries: restarted in place ----------------------------
def random_kills(run_dir, proc):
    seed = int(time.time())
    rng = random.Random(seed)
    victims = rng.sample([0, 1], rng.choice([1, 2]))
    # watched together, each killed once it has its rows: a rank whose engine started ahead of the
    # other's is not done before its turn comes
    for s in busy_ranks(run_dir, {rank: rng.randrange(CHUNK, 120) for rank in victims}, proc):
        os.kill(s["pid"], signal.SIGKILL)
    return seed, victims


def check_random_kills(run_dir, summary, err, seen):
    seed, victims = seen
    assert "restarting it" in err, f"seed {seed}"
    assert summary["rows_recomputed"] <= CHUNK * len(victims), f"seed {seed}"
    assert attempts(summary) == {r: 2 if r in victims else 1 for r in (0, 1)}, f"seed {seed}"
    # every start, restarts too, a fork of the one process that imported vLLM (launch/forkserver.py)
    server = (run_dir / "logs" / "forkserver.log").read_text()
    assert server.count(" imported ") == 1 and server.count("forked hpcinfer.rank.worker") == 2 + len(victims)


# --- a finished run's shard output torn (lost mid-copy, a bad sync), results and summary removed ----
def tear_shard_then_resume(run_dir, hpcinfer):
    torn = run_dir / "shards" / "000001.parquet"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    (run_dir / "results.parquet").unlink()
    (run_dir / "summary.json").unlink()
    return resume(run_dir, hpcinfer)


def check_torn(run_dir, summary, err, seen):
    assert "repaired: shard output shards/000001.parquet: unreadable" in err
    [repair] = summary["repaired"]
    assert (repair["what"], repair["path"], repair["by"]) == ("shard output", "shards/000001.parquet", "submit")
    assert summary["rows_recomputed"] == ROWS // 2  # the torn shard's rows, no more
    assert attempts(summary) == {0: 1, 1: 2}  # only its rank ran again
    status = subprocess.run(
        [sys.executable, "-m", "hpcinfer.status", str(run_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert status.returncode == 0 and "repaired  shard output shards/000001.parquet" in status.stdout


# --- the disk fills up while the ranks write their parts: they stop clearly; space freed, resume ----
def fill_when_busy(run_dir, proc):
    busy_rank(run_dir, 0, 2 * CHUNK, proc)
    return fill_disk(run_dir.parent)


def free_space_then_resume(run_dir, hpcinfer):
    (run_dir.parent / "filler").unlink()
    return resume(run_dir, hpcinfer)


def check_disk_full(run_dir, summary, err, seen):
    assert "no space left on device" in err, err
    assert "Traceback" not in err
    assert summary["rows_recomputed"] <= 2 * CHUNK  # at most one part's rows per rank


# 32 rows in flight per rank: its rows finish a few parts at a time, not a whole shard in one engine
# step (all 240 rows of a shard end together at the default batch), so a fault "mid-shard" (a kill,
# the disk filling) lands while the shard's parts are being written, not after it is done
STAGGERED = "engine.max_num_seqs=32"
# A fault that must leave parts behind runs static: the dynamic plan cuts this workload into 30-row
# shards, fewer than the 32 rows in flight, so a shard's rows end in one step and its parts are gone
# with it (merged into its output) before any fault can land between them

FAULTS = {
    "kill9-static-then-resume": Fault(
        ("rank_retries=0", "schedule.mode=static", STAGGERED),
        during=lambda run_dir, proc: kill_when_busy(run_dir, 1, 3 * CHUNK, proc),
        exit_code=1,
        recover=resume,
        check=check_static_kill,
    ),
    # 8 in flight: a rank whose engine started late still finds shards left (at 32, the other
    # rank could take them all first, and the kill found no claim to take over)
    "kill9-dynamic-takeover": Fault(
        ("rank_retries=0", "engine.max_num_seqs=8"),
        during=lambda run_dir, proc: kill_when_busy(run_dir, 1, 3 * CHUNK, proc),
        check=check_takeover,
    ),
    # static: each rank has its 240 rows for sure, so each victim reaches the row it is killed at
    # (dynamic, a rank whose engine starts late may find the other has taken everything)
    "random-kills-restart-in-place": Fault(
        ("rank_retries=2", "schedule.mode=static"), during=random_kills, check=check_random_kills
    ),
    "torn-shard-output-then-resume": Fault(("schedule.mode=static",), recover=tear_shard_then_resume, check=check_torn),
    "disk-full-then-resume": Fault(
        ("rank_retries=0", "schedule.mode=static", STAGGERED),
        during=fill_when_busy,
        exit_code=1,
        recover=free_space_then_resume,
        check=check_disk_full,
        small_disk=True,
    ),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_after_the_fault_every_row_is_published_once_in_order(
    name, request, tmp_path, cli_env, hpcinfer, chaos_inputs, chaos_reference
):
    fault = FAULTS[name]
    base: Path = request.getfixturevalue("small_fs") if fault.small_disk else tmp_path
    run_dir = base / "run"
    proc = start(cli_env, *chaos_args(chaos_inputs, run_dir, "dp=2", *fault.args))
    seen = fault.during(run_dir, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == fault.exit_code, err
    if fault.exit_code:
        assert not (run_dir / "results.parquet").exists()  # nothing short is ever published
        assert list((run_dir / "shards").glob("*.parts/*.parquet")), "the stopped ranks left no durable parts"
    if fault.recover:
        r = fault.recover(run_dir, hpcinfer)
        assert r.returncode == 0, r.stderr
        err += r.stderr
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference)
    fault.check(run_dir, json.loads((run_dir / "summary.json").read_text()), err, seen)
