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
        real_create = work.claims._create

        def slow_create(shard, gen):  # a filesystem at its worst: the loop must not notice
            slow.append(1)  # every claim creates its file, taken in turn or from a look
            time.sleep(0.3)
            return real_create(shard, gen)

        monkeypatch.setattr(work.claims, "_create", slow_create)
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


def test_a_rank_finishing_its_last_shards_does_not_spin_its_claimer(tmp_path):
    """Every shard claimed, this rank still generating its last ones: the claimer has nothing to
    look at until a release. (It used to wake itself on every round here, a look and a done/
    listing each, for the whole tail: half the engine's speed on CPU, a metadata storm at scale.)"""
    rd = new_run_dir(tmp_path)
    work = ClaimedWork(rd, 0, 1, "A", shards(2), lease_s=120.0, background=False)  # rounds by hand
    try:
        got = []
        for _ in range(10):
            work.tick()
            shard = work.next()
            if shard is not None:
                got.append(shard.shard)
        assert got == [0, 1] and work.next() is None  # all claimed; the loop asked once more
        work.tick()  # the round that sees nothing left to claim
        looks = work.claims._fulls, work.claims.last
        for _ in range(20):
            assert not work.claimer._wake.is_set()
            work.tick()
        assert (work.claims._fulls, work.claims.last) == looks  # no look while it holds its last shards
        assert not work.exhausted()
        for s in got:
            atomic_write_json(rd.done_marker(s), {"shard": s})
            work.release(s)
        work.tick()
        work.next()
        work.tick()
        assert work.exhausted()
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


def test_ranks_claim_their_turns_without_looking_then_look_for_the_rest(tmp_path, monkeypatch):
    """Without background threads (`tick`, on a clock of the test's): each rank claims its
    turns (positions rank, rank+2, ...) with no look but its first full look, which only watches;
    once one has no turn left, a claim look finds what the other has not claimed yet."""
    rd = new_run_dir(tmp_path)
    now = [0.0]
    works = [
        ClaimedWork(rd, r, 2, f"T{r}", shards(6), lease_s=120.0, background=False, clock=lambda: now[0]) for r in (0, 1)
    ]
    looks = []
    for w in works:
        real = w.claims.look

        def look(full=True, claiming=True, real=real):
            looks.append((full, claiming))
            return real(full, claiming)

        monkeypatch.setattr(w.claims, "look", look)

    def take(w):
        w.tick()
        s = w.next()
        if s is not None:
            atomic_write_json(rd.done_marker(s.shard), {"shard": s.shard})
            w.release(s.shard, done=True)
        return s and s.shard

    try:
        assert [take(w) for w in works] == [0, 1] and looks == [(True, False), (True, False)]
        assert [take(w) for w in works] == [2, 3] and take(works[0]) == 4 and len(looks) == 2  # turns: no look
        assert take(works[0]) == 5 and looks[-1] == (False, True)  # no turn left: it looks, takes rank 1's
        assert take(works[1]) is None and looks[-1] == (False, True)  # its turn taken: a look finds none
        now[0] += works[0].idle_s  # idle: a full look sees the run's end
        for w in works:
            w.tick()
        assert all(w.exhausted() for w in works) and looks[-2:] == [(True, True), (True, True)]
    finally:
        for w in works:
            w.close()


def test_a_rank_without_a_turn_leaves_the_shards_to_theirs_until_its_first_idle_look(tmp_path):
    """More ranks than shards: rank 2 of 3 has no turn among 2 shards; it claims nothing (and
    looks at nothing) before its first idle look, and then takes what a rank left."""
    rd = new_run_dir(tmp_path)
    now = [0.0]
    late = ClaimedWork(rd, 2, 3, "T2", shards(2), lease_s=120.0, background=False, clock=lambda: now[0])
    first = ClaimedWork(rd, 0, 3, "T0", shards(2), lease_s=120.0, background=False, clock=lambda: now[0])
    try:
        late.tick()
        assert late.next() is None and late.claims.last is None  # no look
        first.tick()
        assert first.next().shard == 0
        now[0] += late.idle_s
        late.tick()  # rank 1 never came: its turn is left to the looks
        assert late.next().shard == 1
    finally:
        late.close()
        first.close()
