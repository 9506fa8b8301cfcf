"""The claim protocol at scale (rundir/claims.py): who holds a claim from holders/ names, liveness
from beats/ names judged once per attempt and look, file checks cached for `cache_s`, lost races
that move on without listing again. The protocol's guarantees are tests/rundir/test_claims.py's."""

from __future__ import annotations

import json
import time

import pytest

from hpcinfer.rundir.claims import (
    UNKNOWN,
    Claim,
    Claims,
    Heartbeat,
    attempt_tag,
    parse_beat_name,
    parse_holder_name,
)
from hpcinfer.rundir.files import atomic_write
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import FAILED, RankRecord


def new_run_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    return rd


def test_names_parse():
    assert parse_holder_name("000012.3.7.abcdef012345") == (12, 3, 7, "abcdef012345", False)
    assert parse_holder_name("000012.3.7.abcdef012345.done") == (12, 3, 7, "abcdef012345", True)
    assert parse_holder_name("000012.3.7.abcdef012345.tmp") is None
    assert parse_holder_name("000012.3") is None and parse_holder_name(".claim.x") is None
    assert parse_beat_name("7.abc.12") == (7, "abc", "12") and parse_beat_name("7.abc.end") == (7, "abc", "end")
    assert parse_beat_name("7.abc.tmp") is None
    assert attempt_tag("host:1:2.5") == attempt_tag("#" + attempt_tag("host:1:2.5"))


def test_holders_come_from_the_index_names_without_opening_claims(tmp_path, monkeypatch):
    rd = new_run_dir(tmp_path)
    a, b = Claims(rd, 0, "A", [0, 1, 2], 60), Claims(rd, 1, "B", [0, 1, 2], 60)
    assert a.next() == 0 and b.next() == 1
    monkeypatch.setattr(Claims, "_read", lambda *args: pytest.fail("a claim file was opened"))
    held = Claims(rd, 2, "C", [0, 1, 2], 60).holders()
    assert held == {0: Claim(0, 0, 0, "#" + attempt_tag("A")), 1: Claim(1, 0, 1, "#" + attempt_tag("B"))}
    assert a.holders()[0] == Claim(0, 0, 0, "A")  # its own: by its token
    # the index name is the claim's file: a hard link of the same content
    index = rd.holders_dir / "000000" / f"000000.0.0.{attempt_tag('A')}"
    assert index.samefile(rd.claim(0, 0)) and json.loads(index.read_text())["token"] == "A"


def test_claims_without_an_index_name_or_with_two_are_read(tmp_path):
    rd = new_run_dir(tmp_path)
    now = [0.0]
    c = Claims(rd, 2, "C", [0, 1], 60, clock=lambda: now[0], cache_s=5)
    rd.claim(0, 0).write_text(json.dumps({"rank": 5, "token": "old", "host": "h"}))  # an older hpcinfer
    rd.claim(1, 0).write_text(json.dumps({"rank": 6, "token": "T6", "host": "h"}))
    (rd.holders_dir / "000000").mkdir()
    for rank, tag in ((6, attempt_tag("T6")), (7, "leftover")):  # a crashed lost race's name beside it
        (rd.holders_dir / "000000" / f"000001.0.{rank}.{tag}").write_text("{}")
    # two names: a lost race's not removed yet; held and live, by whom is looked at again later
    assert c.holders() == {1: Claim(1, 0, UNKNOWN, "<unsure>")}
    assert c.next() is None  # shard 0 has no name: claiming it loses the race (the link) ...
    assert c.holders() == {0: Claim(0, 0, 5, "old"), 1: Claim(1, 0, UNKNOWN, "<unsure>")}  # ... then it is read
    now[0] += 5  # still two names after cache_s: a crash left one; the claim file is read
    assert c.holders() == {0: Claim(0, 0, 5, "old"), 1: Claim(1, 0, 6, "T6")}
    (rd.holders_dir / "000000" / "000001.0.7.leftover").unlink()
    assert c.holders()[1] == Claim(1, 0, 6, "#" + attempt_tag("T6"))


def test_a_lost_race_moves_on_within_the_same_look(tmp_path):
    rd = new_run_dir(tmp_path)
    order = list(range(6))
    a, b = Claims(rd, 0, "A", order, 60), Claims(rd, 1, "B", order, 60, spread=4)
    stale = b.look()
    assert a.next() == 0
    got = b.next(look=stale)  # loses shard 0, then tries further down without listing again
    assert got not in (None, 0) and b.mine == {got: 0}
    assert sorted(p.name for p in (rd.holders_dir / "000000").iterdir()) == sorted(
        [f"000000.0.0.{attempt_tag('A')}", f"{rd.claim(got, 0).name}.1.{attempt_tag('B')}"]
    )  # the lost race's name is gone


def test_beat_names_advance_end_and_are_superseded(tmp_path):
    rd = new_run_dir(tmp_path)
    hb = Heartbeat(rd, 3, "T1", 0.02).start()
    c = Claims(rd, 0, "X", [], 60)
    key = (3, attempt_tag("T1"))
    first = c.beats()[key]
    deadline = time.monotonic() + 5
    while c.beats()[key] == first and time.monotonic() < deadline:
        pass
    assert c.beats()[key] != first
    hb2 = Heartbeat(rd, 3, "T2", 60).start()  # the rank restarted: the older attempt's name ends
    hb.stop()
    beats = c.beats()
    assert beats[key] == "end" and beats[(3, attempt_tag("T2"))] == "0"
    hb2.stop()
    assert c.beats()[(3, attempt_tag("T2"))] == "end"
    assert len(list(rd.beats_dir.iterdir())) == 2


class Reads:
    """Counts reads of a rank's owner and record files."""

    def __init__(self, rd, monkeypatch):
        self.n = 0
        real = RunDir.read_rank

        def read_rank(rd_, rank):
            self.n += 1
            return real(rd_, rank)

        monkeypatch.setattr(RunDir, "read_rank", read_rank)


def test_liveness_is_judged_once_per_attempt_and_look_and_file_checks_are_cached(tmp_path, monkeypatch):
    rd = new_run_dir(tmp_path)
    now = [1000.0]
    order = list(range(8))
    holder = Claims(rd, 0, "A", order, 60)
    for _ in range(5):
        holder.next()  # rank 0 holds shards 0-4
    atomic_write(rd.rank_owner(0), "A")
    hb = Heartbeat(rd, 0, "A", 3600).start()  # one beat name, never renamed in this test
    reads = Reads(rd, monkeypatch)
    c = Claims(rd, 1, "B", order, lease_s=80, clock=lambda: now[0], cache_s=10)
    assert c.next() == 5 and reads.n == 0  # a beat name seen: alive, no file read
    now[0] += 29  # under 3/8 of the lease: still no reads
    assert c.next() == 6 and reads.n == 0
    now[0] += 1  # 3/8 of the lease unchanged: its owner and record are read, once for its 5 claims
    assert c.next() == 7 and reads.n == 1
    now[0] += 5  # within cache_s: kept
    c.next()
    assert reads.n == 1
    now[0] += 5  # cache_s passed: read again
    c.next()
    assert reads.n == 2
    rd.write_rank(RankRecord(0, token="A", state=FAILED))  # it recorded that it ended
    now[0] += 10
    assert c.next() == 0 and reads.n == 3  # taken over (gen 1) as soon as the cache expired
    assert c.mine[0] == 1
    hb.stop()


def test_an_ended_beat_name_is_dead_at_once_and_its_rank_gone(tmp_path):
    rd = new_run_dir(tmp_path)
    a = Claims(rd, 0, "A", [0, 1], 60)
    hb = Heartbeat(rd, 0, "A", 3600).start()
    assert a.next() == 0
    seen = []

    def spy(candidates, unfinished, gone):
        seen.append((candidates, gone))
        return candidates[0]

    b = Claims(rd, 1, "B", [0, 1], 60)
    assert b.next(spy) == 1 and seen[-1] == ([1], 0)  # A beats: its claim is live
    hb.stop()  # A ends (it would have recorded that, too)
    b.release(1)
    assert b.next(spy) == 0 and seen[-1] == ([0], 1)
    assert b.mine == {0: 1}


def test_a_stalled_beat_name_is_dead_after_a_lease_on_the_observers_clock(tmp_path):
    rd = new_run_dir(tmp_path)
    now = [0.0]
    atomic_write(rd.rank_owner(0), "A")
    assert Claims(rd, 0, "A", [0], 60).next() == 0
    hb = Heartbeat(rd, 0, "A", 3600).start()
    c = Claims(rd, 1, "B", [0], lease_s=40, clock=lambda: now[0])
    assert c.next() is None  # first sight starts the clock
    now[0] += 39.9
    assert c.next() is None
    now[0] += 0.1
    assert c.next() == 0
    hb.stop()


def test_a_launcher_ends_the_beat_name_of_a_rank_killed_silently(tmp_path):
    from hpcinfer.rank.worker import record_exit

    rd = new_run_dir(tmp_path)
    assert Claims(rd, 0, "A", [0], 60).next() == 0
    Heartbeat(rd, 0, "A", 3600).start()  # and then kill -9: no stop()
    rd.write_rank(RankRecord(0, token="A", state="running"))
    b = Claims(rd, 1, "B", [0], 60)
    assert b.next() is None
    record_exit(rd, 0, -9)
    assert b.next() == 0 and b.mine == {0: 1}


class Listings:
    """Counts listings of holders/ buckets (by bucket) and of beats/."""

    def __init__(self, monkeypatch):
        import hpcinfer.rundir.claims as claims

        self.buckets, self.beats = [], 0
        real = claims.list_names

        def list_names(path):
            if path.parent.name == "holders":
                self.buckets.append(int(path.name))
            elif path.name == "beats":
                self.beats += 1
            return real(path)

        monkeypatch.setattr(claims, "list_names", list_names)


def test_a_full_look_lists_the_buckets_only_when_an_attempt_ended_or_stalled(tmp_path, monkeypatch):
    """4 buckets of 2 shards, all claimed: with every attempt beating, a full look lists beats/
    and, having nothing to claim, the open buckets only up to the first not all done; a newly
    `end`ed attempt makes the next full look list them all and take its claim over."""
    rd = new_run_dir(tmp_path)
    order = list(range(8))
    a = Claims(rd, 0, "A", order, 60, bucket=2)
    hb = Heartbeat(rd, 0, "A", 3600).start()
    for _ in range(7):
        a.next()  # A holds 0-6
    c = Claims(rd, 1, "C", order, 60, bucket=2)
    assert c.next() == 7  # its first look lists every bucket (as every first look does)
    c.look(full=True)  # and the next sees its own claim's bucket full
    seen = Listings(monkeypatch)
    look = c.look(full=True)
    assert look.order == [] and seen.beats == 1 and seen.buckets == [0]  # up to bucket 0, not all done
    for s in (0, 1):  # A finishes bucket 0
        rd.done_marker(s).write_text("{}")
        a.release(s, done=True)
    a.flush()
    seen.buckets.clear()
    c.look(full=True)
    assert seen.buckets == [0, 1]  # bucket 0 closed: on to the first not all done
    hb.stop()  # A ends holding 2-6: `end`
    seen.buckets.clear()
    look = c.look(full=True)
    assert sorted(seen.buckets) == [1, 2, 3] and look.order[:5] == [2, 3, 4, 5, 6]
    assert c.next(look=look) == 2 and c.mine[2] == 1  # taken over


def test_a_clean_end_is_fin_and_sends_no_one_looking(tmp_path, monkeypatch):
    """An attempt whose every claim is done ends `fin`: dead to the others, yet no full look lists
    the buckets for it; one that leaves a claim not done ends `end`."""
    from hpcinfer.rank.work import ClaimedWork
    from hpcinfer.rundir.manifest import Shard

    rd = new_run_dir(tmp_path)
    shards = [Shard(i, i % 2, "/in.parquet", i, i + 1, i, tokens=10) for i in range(4)]
    done = ClaimedWork(rd, 0, 2, "A", shards, 60, background=False)
    left = ClaimedWork(rd, 1, 2, "B", shards, 60, background=False)
    a, b = done.claims.next(), left.claims.next()
    assert {a, b} <= set(range(4)) and a != b
    rd.done_marker(a).write_text("{}")
    done.release(a, done=True)
    done.close()
    left.close()  # B drops its shard undone
    beats = Claims(rd, 2, "C", [s.shard for s in shards], 60).beats()
    assert beats == {(0, attempt_tag("A")): "fin", (1, attempt_tag("B")): "end"}
    assert parse_beat_name("0.abc.fin") == (0, "abc", "fin")


@pytest.mark.parametrize("world", [2, 1000, 10000])
def test_a_live_attempt_seen_between_beats_is_never_suspect(tmp_path, world):
    """A beat name is renamed every lease/4 and looked at every sweep_s: unchanged up to their
    sum while alive. Only longer is suspect (files read, buckets listed), and always before the
    lease ends it."""
    from hpcinfer.rank.work import ClaimedWork

    rd = new_run_dir(tmp_path)
    w = ClaimedWork(rd, 0, world, "A", [], 120, background=False)
    beat = w.heartbeat.interval
    assert beat + w.sweep_s < w.claims.suspect_s < w.claims.lease_s
    assert w.claims.suspect_s >= 3 * 120 / 8
    w.close()


def no_listing(monkeypatch):
    import hpcinfer.rundir.claims as claims

    monkeypatch.setattr(claims, "list_names", lambda path: pytest.fail(f"listed {path}"))


def test_ranks_take_turns_without_looking(tmp_path, monkeypatch):
    """Rank r of 3 claims positions r, r+3, r+6 of the claim order, listing nothing; a turn that a
    rank looking took first is a lost race, and the rank goes on to its next turn."""
    rd = new_run_dir(tmp_path)
    order = [10 + i for i in range(9)]  # the claim order: shard ids are not positions
    ranks = [Claims(rd, r, f"T{r}", order, 60, turns=3, bucket=4) for r in range(3)]
    no_listing(monkeypatch)
    assert [c.take_turn() for c in ranks] == [10, 11, 12]
    assert [c.take_turn() for c in ranks[:2]] == [13, 14]
    assert rd.claim(15, 0).exists() is False
    Claims(rd, 5, "X", order, 60)._create(15, 0)  # rank 2's next turn, taken by a rank that looked
    assert ranks[2].take_turn() == 18 and ranks[2].mine == {12: 0, 18: 0}  # 15 lost: on to 18
    assert ranks[2].take_turn() is None  # no turn left
    assert Claims(rd, 0, "T0b", order, 60, turns=0).take_turn() is None  # no turns taken: looks decide


def test_a_turn_known_taken_costs_nothing_and_two_lost_in_a_row_leave_it_to_a_look(tmp_path):
    rd = new_run_dir(tmp_path)
    order = list(range(8))
    other = Claims(rd, 1, "O", order, 60)
    for s in (0, 2, 4):
        other._create(s, 0)
    c = Claims(rd, 0, "A", order, 60, turns=2, bucket=8)
    tried = []
    real = c._create
    c._create = lambda s, g: tried.append(s) or real(s, g)
    assert c.take_turn() is None and tried == [0, 2]  # TURN_TRIES lost in a row: a look decides
    c.holders()  # a listing shows 4 taken
    tried.clear()
    assert c.take_turn() == 6 and tried == [6]  # 4 passed over without a try


def test_a_turn_waits_for_the_policy_and_for_claims_to_take_over(tmp_path):
    rd = new_run_dir(tmp_path)
    order = list(range(4))
    c = Claims(rd, 0, "A", order, 60, turns=2)
    assert c.take_turn(lambda cands, unfinished, gone: None) is None and c._turn == 0  # declined: it waits
    assert c.take_turn(lambda cands, unfinished, gone: cands[0]) == 0
    a = Claims(rd, 1, "B", order, 60)
    hb = Heartbeat(rd, 1, "B", 3600).start()
    assert a.next() == 1
    hb.stop()  # B ends holding shard 1: the next full look finds it dead
    look = c.look(full=True)
    assert 1 in look.order and c.take_turn() is None  # the dead claim first (`next` takes it over)
    assert c.next(look=look) == 1 and c.mine[1] == 1
    assert c.take_turn() == 2


def test_turns_pass_over_the_shards_done_when_the_attempt_started(tmp_path):
    rd = new_run_dir(tmp_path)
    c = Claims(rd, 0, "A", list(range(4)), 60, turns=2, done={0})
    assert c.take_turn() == 2 and not rd.claim(0, 0).exists()


def test_markers_spare_the_others_listing_full_and_done_buckets(tmp_path, monkeypatch):
    """A look that lists a bucket full (or all done) leaves holders/<bucket>.full (.done); a rank
    that never listed it reads the markers (one listing of holders/) instead of the bucket."""
    rd = new_run_dir(tmp_path)
    order = list(range(6))
    a = Claims(rd, 0, "A", order, 60, bucket=2)
    hb = Heartbeat(rd, 0, "A", 3600).start()
    for _ in range(5):
        a.next()  # A holds 0-4: buckets 0 and 1 full
    assert {p.name for p in rd.holders_dir.iterdir() if "." in p.name} == {"000000.full", "000001.full"}
    for s in (0, 1):
        rd.done_marker(s).write_text("{}")
        a.release(s, done=True)
    a.flush()  # bucket 0 all done
    assert (rd.holders_dir / "000000.done").exists()
    c = Claims(rd, 2, "C", order, 60, bucket=2)
    seen = Listings(monkeypatch)
    look = c.look(full=True)
    assert seen.buckets == [2] and look.order == [4, 5]  # buckets 0 and 1 known from the markers
    assert 0 in c.closed and 1 in c._full
    assert c.next(look=look) == 5
    # a shard set aside (its done marker) reopens its bucket for the rank that set it aside: the
    # bucket's `.done` marker is not taken for true there
    d = Claims(rd, 3, "D", order, 60, bucket=2, notdone=[0])
    seen.buckets.clear()
    d.look(full=True)
    assert 0 not in d.closed and seen.buckets[0] == 0
    hb.stop()


def test_a_full_look_that_only_watches_lists_beats_alone(tmp_path, monkeypatch):
    rd = new_run_dir(tmp_path)
    order = list(range(4))
    a = Claims(rd, 0, "A", order, 60, bucket=2)
    hb = Heartbeat(rd, 0, "A", 3600).start()
    assert a.next() == 0
    c = Claims(rd, 1, "C", order, 60, bucket=2)
    c.look(full=True)  # its first look
    seen = Listings(monkeypatch)
    look = c.look(full=True, claiming=False)
    assert seen.beats == 1 and seen.buckets == [] and not look.claiming
    hb.stop()  # A ended holding shard 0: the watching look lists the buckets, to take it over
    look = c.look(full=True, claiming=False)
    assert seen.buckets and look.order[0] == 0


def test_an_attempt_that_started_after_the_beats_listing_is_not_read_from_files(tmp_path, monkeypatch):
    rd = new_run_dir(tmp_path)
    order = list(range(4))
    c = Claims(rd, 1, "C", order, 60)
    real_beats = c.beats
    late = []

    def beats():  # B starts and claims between C's listing of beats/ and of the buckets
        got = real_beats()
        if not late:
            late.append(Heartbeat(rd, 0, "B", 3600).start())
            assert Claims(rd, 0, "B", order, 60).next() == 0
        return got

    monkeypatch.setattr(c, "beats", beats)
    monkeypatch.setattr(Claims, "dead", lambda *a: pytest.fail("read from files"))
    look = c.look(full=True)
    assert look.late is not None and look.judged == {(0, attempt_tag("B")): False}  # alive
    assert c.next(look=look) == 1
    late[0].stop()


def test_the_beat_board_is_shared_on_one_clock_and_times_beats_from_their_first_sighting(tmp_path):
    rd = new_run_dir(tmp_path)
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    a, b = Claims(rd, 0, "A", [], 60, clock=clock), Claims(rd, 1, "B", [], 60, clock=clock)
    other = Claims(rd, 2, "C", [], 60)  # another clock: a board of its own
    assert a.board is b.board and other.board is not a.board
    hb = Heartbeat(rd, 5, "T", 3600).start()
    key = (5, attempt_tag("T"))
    assert a.beats()[key] == "0"
    now[0] += 30
    assert b.beats()[key] == "0" and b.board.since(key, "0", now[0]) == 100.0  # A's listing saw it first
    assert a.board.update([], 50.0)[key] == "0"  # a listing older than the latest changes nothing
    hb._beat(1)
    assert b.beats()[key] == "1" and b.board.since(key, "1", 0.0) == 130.0
    hb.stop()
