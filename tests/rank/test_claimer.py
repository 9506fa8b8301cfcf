"""ClaimedWork's background claimer (rank/work.py): the engine loop takes a ready shard or None at
once and never waits on the filesystem; the claimer keeps the next shard ready, looks again
when a shard is released, reports the end of the run, and stops with the attempt."""

from __future__ import annotations

import time

from hpcinfer.rank.work import ClaimedWork
from hpcinfer.rundir.claims import attempt_tag
from hpcinfer.rundir.files import atomic_write_json
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.paths import RunDir


def new_run_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    return rd


def shards(n):
    return [Shard(i, 0, "x", 0, 10, 0, 1000) for i in range(n)]


def wait_for(f, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = f()
        if got:
            return got
        time.sleep(0.005)
    raise AssertionError("timed out")


def test_the_loop_takes_ready_shards_without_waiting_and_the_claimer_stops(tmp_path, monkeypatch):
    rd = new_run_dir(tmp_path)
    work = ClaimedWork(rd, 0, 1, "A", shards(3), lease_s=1.0)
    try:
        first = wait_for(work.next)
        assert first.shard == 0 and work.held == [0]
        slow = []
        real_look = work.claims.look

        def slow_look(full=True):  # a filesystem at its worst: the loop must not notice
            slow.append(1)
            time.sleep(0.3)
            return real_look(full)

        monkeypatch.setattr(work.claims, "look", slow_look)
        t0 = time.perf_counter()
        assert work.next() is None  # the next one is being claimed: None at once
        assert time.perf_counter() - t0 < 0.05
        second = wait_for(work.next)
        assert second.shard == 1 and slow and sorted(work.held) == [0, 1]
        assert not work.exhausted()
    finally:
        work.close()
    assert not work.claimer._thread.is_alive()
    assert (rd.beats_dir / f"0.{attempt_tag('A')}.end").exists()  # its claims are dead at once


def test_a_release_makes_the_claimer_look_again_and_the_end_is_seen(tmp_path):
    rd = new_run_dir(tmp_path)
    work = ClaimedWork(rd, 0, 1, "A", shards(2), lease_s=120.0)  # sweeps every 15 s: only news wakes it
    try:
        got = [wait_for(work.next).shard]
        got.append(wait_for(work.next).shard)
        assert got == [0, 1] and work.next() is None
        for s in got:
            atomic_write_json(rd.done_marker(s), {"shard": s})
            work.release(s)
        assert wait_for(work.exhausted, timeout=5)
    finally:
        work.close()


def test_two_ranks_with_claimers_share_the_shards_once(tmp_path):
    rd = new_run_dir(tmp_path)
    works = [ClaimedWork(rd, r, 2, f"T{r}", shards(12), lease_s=120.0) for r in (0, 1)]
    taken = {0: [], 1: []}
    try:
        deadline = time.monotonic() + 20
        while not all(w.exhausted() for w in works) and time.monotonic() < deadline:
            for r, w in enumerate(works):
                s = w.next()
                if s is not None:
                    taken[r].append(s.shard)
                    atomic_write_json(rd.done_marker(s.shard), {"shard": s.shard})
                    w.release(s.shard)
            time.sleep(0.002)
    finally:
        for w in works:
            w.close()
    assert sorted(taken[0] + taken[1]) == list(range(12)) and taken[0] and taken[1]


def test_a_failing_claimer_fails_the_loop(tmp_path, monkeypatch):
    rd = new_run_dir(tmp_path)
    work = ClaimedWork(rd, 0, 1, "A", shards(2), lease_s=1.0)
    try:
        wait_for(work.next)

        def broken(full=True):
            raise OSError("the filesystem went away")

        monkeypatch.setattr(work.claims, "look", broken)
        work.claimer.changed()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                work.next()
            except OSError as e:
                assert "went away" in str(e)
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the claimer's error never reached the loop")
    finally:
        work.close()
