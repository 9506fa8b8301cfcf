"""The claim protocol in the run directory (rundir/claims.py): what is claimable, exclusive claims
under concurrency, when a claim is dead (superseded, ended, silent for a lease), takeovers, heartbeats.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from hpcinfer.rundir.claims import (
    UNKNOWN,
    Claim,
    ClaimLost,
    Claims,
    Heartbeat,
    attempt_tag,
    claimable,
    parse_claim_name,
)
from hpcinfer.rundir.files import atomic_write
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import FAILED, RankRecord


# ---- the claim protocol ----------------------------------------------------------------------
def never_dead(c):
    return False


def pick(*args, **kw):
    """The first of `claimable`, as (shard, generation to create), or None."""
    found = claimable(*args, **kw)
    return found[0][:2] if found else None


def test_claimable_priorities():
    holders = {1: Claim(1, 0, 0, "A"), 2: Claim(2, 3, 1, "old-me"), 3: Claim(3, 0, 2, "C")}
    dead = {"old-me", "C"}.__contains__
    order = [3, 1, 0, 2, 4]
    # an earlier attempt's own claim first (its parts are here), wherever it is in the order
    assert pick(order, set(), holders, lambda c: dead(c.token), rank=1, token="me") == (2, 4)
    # then the first shard in claim order that is free or held by a dead rank
    assert pick(order, set(), holders, lambda c: c.token == "C", rank=1, token="me") == (3, 1)
    assert pick(order, set(), holders, never_dead, rank=1, token="me") == (0, 0)
    assert pick(order, {0}, holders, never_dead, rank=1, token="me") == (4, 0)
    # live claims, done shards and this attempt's own claims are never picked
    assert pick(order, {0, 4}, holders, never_dead, rank=1, token="me") is None
    assert pick([1], set(), {1: Claim(1, 0, 1, "me")}, lambda c: True, rank=1, token="me") is None


def test_parse_claim_name():
    assert parse_claim_name("000012.3") == (12, 3)
    assert parse_claim_name(".claim.abc") is None
    assert parse_claim_name("000012.tmp") is None


def new_run_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    return rd


def test_two_ranks_never_claim_the_same_shard_and_go_largest_first(tmp_path):
    rd = new_run_dir(tmp_path)
    a, b = Claims(rd, 0, "A", [3, 1, 2, 0], 60), Claims(rd, 1, "B", [3, 1, 2, 0], 60)
    got = [a.next(), b.next(), b.next(), a.next(), a.next(), b.next()]
    assert got == [3, 1, 2, 0, None, None]
    assert sorted(p.name for p in a.dir.iterdir()) == ["000000.0", "000001.0", "000002.0", "000003.0"]
    assert json.loads((a.dir / "000001.0").read_text())["token"] == "B"


def test_a_rank_passes_over_its_own_claim_at_its_turn_and_keeps_its_name(tmp_path):
    """A shard this attempt claimed from a look, then reached by its own turn: passed over. (A
    second claim of it once removed the attempt's own holders/ name: a rank that had listed the
    name lazily then waited forever for a shard another rank had finished.)"""
    rd = new_run_dir(tmp_path)
    a = Claims(rd, 0, "A", [0, 1, 2, 3], 60, turns=2)
    assert a.next() == 0  # from a look; its turn is at 0 too
    assert a.take_turn() == 2
    assert a._create(0, 0) is False  # a claim it holds is never made again
    tag = attempt_tag("A")
    assert sorted(os.listdir(rd.holders_dir / "000000")) == [f"000000.0.0.{tag}", f"000002.0.0.{tag}"]


def test_a_claim_whose_name_vanished_is_read_from_its_file(tmp_path):
    """A holders/ name seen (lazily, unparsed) and then gone, its claim still there (a crash between
    creating and removing a lost race's name, or the bug above): its holder is read from the claim
    file, not taken for an unknown live one forever."""
    rd = new_run_dir(tmp_path)
    a, b = Claims(rd, 0, "A", [0, 1], 60), Claims(rd, 1, "B", [0, 1], 60)
    assert a.next() == 0
    b._list_bucket(0, lazy=True)
    assert b._holders[0].rank == UNKNOWN
    os.unlink(rd.holders_dir / "000000" / f"000000.0.0.{attempt_tag('A')}")
    b._list_bucket(0, lazy=True)
    assert (b._holders[0].rank, b._holders[0].token) == (0, "A")


def _claim_all(run_dir, rank, order, barrier, out):
    c = Claims(RunDir(run_dir), rank, f"T{rank}", order, 60)
    barrier.wait()
    got = []
    while (s := c.next()) is not None:
        got.append(s)
    out.put((rank, got))


def test_concurrent_processes_claim_each_shard_exactly_once(tmp_path):
    rd = new_run_dir(tmp_path)
    ctx = multiprocessing.get_context("fork")
    barrier, out, n = ctx.Barrier(4), ctx.Queue(), 40
    procs = [ctx.Process(target=_claim_all, args=(str(rd.path), r, list(range(n)), barrier, out)) for r in range(4)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    claimed = [s for got in results.values() for s in got]
    assert sorted(claimed) == list(range(n))  # every shard once, none twice
    assert sorted(p.name for p in rd.claims_dir.iterdir()) == [rd.claim(s, 0).name for s in range(n)]


def test_dead_when_superseded_or_ended_with_its_token(tmp_path):
    rd = new_run_dir(tmp_path)
    c = Claims(rd, 1, "me", [0], 60)
    claim = Claim(0, 0, 0, "A")
    atomic_write(rd.rank_owner(0), "A")
    atomic_write(rd.rank_beat(0), "A 0")
    assert not c.dead(claim)
    rd.write_rank(RankRecord(0, token="A", state="running"))
    assert not c.dead(claim)
    for state in ("failed", "stopped", "done"):
        rd.write_rank(RankRecord(0, token="A", state=state))
        assert c.dead(claim)
    rd.write_rank(RankRecord(0, token="older", state="failed"))  # another attempt's record
    assert not c.dead(claim)
    atomic_write(rd.rank_owner(0), "B")  # rank 0 started again: A is an orphan
    assert c.dead(claim)


def test_dead_when_the_heartbeat_stalls_for_a_lease_on_the_observers_clock(tmp_path):
    rd = new_run_dir(tmp_path)
    now = [1000.0]
    c = Claims(rd, 1, "me", [0], lease_s=10, clock=lambda: now[0])
    claim = Claim(0, 0, 0, "A")
    atomic_write(rd.rank_owner(0), "A")
    atomic_write(rd.rank_beat(0), "A 0")
    assert not c.dead(claim)  # first sight starts the clock
    now[0] += 9
    assert not c.dead(claim)
    atomic_write(rd.rank_beat(0), "A 1")  # it beat: the lease restarts
    now[0] += 5
    assert not c.dead(claim)
    now[0] += 9.5
    assert not c.dead(claim)
    now[0] += 1
    assert c.dead(claim)


def test_takeover_makes_the_old_holder_stop_writing(tmp_path):
    rd = new_run_dir(tmp_path)
    a, b = Claims(rd, 0, "A", [0, 1], 60), Claims(rd, 1, "B", [0, 1], 60)
    assert a.next() == 0
    a.check(0)
    atomic_write(rd.rank_owner(0), "A-restarted")  # A is superseded
    assert b.next() == 0 and b.mine == {0: 1}
    with pytest.raises(ClaimLost):
        a.check(0)
    b.check(0)
    c = Claims(rd, 2, "C", [0, 1], 60)  # B is alive: C gets the free shard, not B's
    assert c.next() == 1 and c.next() is None


def test_the_policy_hears_how_many_other_ranks_are_gone(tmp_path):
    """A rank that died leaves its share to the others (the policy divides by the ranks left);
    one that restarted (a newer attempt owns it) will come back for its own claims."""
    rd = new_run_dir(tmp_path)
    seen = []

    def spy(candidates, unfinished, gone):
        seen.append(gone)
        return candidates[0]

    for rank, token in ((0, "A"), (2, "C")):
        atomic_write(rd.rank_owner(rank), token)
        atomic_write(rd.rank_beat(rank), f"{token} 0")
        assert Claims(rd, rank, token, [rank], 60).next() == rank
    rd.write_rank(RankRecord(0, token="A", state=FAILED))  # rank 0 died
    b = Claims(rd, 1, "B", [0, 2, 5], 60)
    assert b.next(spy) == 0 and seen == [1]  # rank 0 is gone; rank 2 lives
    atomic_write(rd.rank_owner(2), "C2")  # rank 2 restarted: its old claim is dead, the rank is not
    assert b.next(spy) == 2 and seen == [1, 0]


def test_heartbeat_advances(tmp_path):
    rd = new_run_dir(tmp_path)
    hb = Heartbeat(rd, 3, "tok", 0.05).start()
    try:
        first = rd.rank_beat(3).read_text()
        time.sleep(0.3)
        assert first == "tok 0" and rd.rank_beat(3).read_text() != first
    finally:
        hb.stop()
