"""The dynamic schedule: token-sized shards (cut_by_tokens), the claim protocol (claims.py)
and the worker loop claiming, taking over and finishing shards. The worker tests run the real
worker loop with FakeEngine, a fake implementation of the engine.Engine protocol that needs no
vLLM: they test orchestration only; tests/test_e2e_local.py and tests/test_chaos_local.py run
real vLLM."""
import dataclasses
import json
import multiprocessing
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bare_plan

from hpcinfer import config
from hpcinfer.cli import compose
from hpcinfer.errors import DataError
from hpcinfer.finalize import finalize
from hpcinfer.planning.inputs import InputFile, scan
from hpcinfer.planning.sharding import cut_by_tokens, expected_ranks, make_shards, row_tokens
from hpcinfer.rank import schedule, worker
from hpcinfer.rank.context import RankContext
from hpcinfer.rank.engine import Engine
from hpcinfer.rank.schedule import claim_order
from hpcinfer.rundir.claims import Claim, ClaimLost, Claims, Heartbeat, claimable, parse_claim_name
from hpcinfer.rundir.files import atomic_write, atomic_write_json
from hpcinfer.rundir.manifest import Shard, write_manifest
from hpcinfer.rundir.output import RowResult
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DONE, FAILED, RankRecord


# ---- cutting by tokens -----------------------------------------------------------------------
def files_of(sizes):
    return [InputFile(f"/data/part-{i}.parquet", n) for i, n in enumerate(sizes)]


def test_cut_by_tokens_gives_long_rows_their_own_small_shards():
    files = files_of([10, 10])
    tokens = [[100] * 10, [10] * 10]  # the first file's rows are 10x longer
    shards = cut_by_tokens(files, tokens, ranks=2, shards_per_rank=2, max_rows=100)
    # target = 1100 / 4 = 275 tokens: 3 long rows per shard, then the short file's rows together
    assert [(s.path[-10:], s.file_start, s.file_end, s.tokens) for s in shards] == [
        ("-0.parquet", 0, 3, 300), ("-0.parquet", 3, 6, 300), ("-0.parquet", 6, 9, 300),
        ("-0.parquet", 9, 10, 100), ("-1.parquet", 0, 10, 100)]
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
        assert all(s.tokens == sum(tokens[i][s.file_start:s.file_end]) for s in mine)
        offset += n
        covered += mine
    assert [s.shard for s in shards] == list(range(len(shards)))
    assert all(1 <= s.rows <= max_rows for s in shards)
    target = -(-sum(map(sum, tokens)) // (ranks * per)) if shards else 0
    # a shard only passes the target by its last row
    assert all(s.rows == 1 or sum(tokens[int(s.path[-9])][s.file_start:s.file_end - 1]) < target for s in shards)


def test_claim_order_is_densest_then_largest_then_input_order():
    shards = [Shard(i, 0, "/f", i, i + 1, i, tok) for i, tok in enumerate([5, 9, 5, 1, 9])]  # one row each
    assert [s.shard for s in claim_order(shards)] == [1, 4, 0, 2, 3]
    # 2 rows of 50 tokens come before 10 rows of 12 tokens, though they are less work
    mixed = [Shard(0, 0, "/f", 0, 10, 0, 120), Shard(1, 0, "/f", 10, 12, 10, 100)]
    assert [s.shard for s in claim_order(mixed)] == [1, 0]


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


@pytest.mark.parametrize("values, message", [
    (pa.array(["1", "2"]), "has type string; expected integers"),
    (pa.array([3, 0], pa.int64()), "must be >= 1, but row 1 of"),
    (pa.array([-5, None], pa.int16()), "must be >= 1, but row 0 of"),
])
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


# ---- the worker loop with a fake engine ------------------------------------------------------
class FakeTokenizer:
    """One token per character, called as vLLM's tokenizers are: a list of texts in, input_ids out."""

    def __call__(self, texts):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


class FakeEngine:
    """A fake engine: implements the Engine protocol without vLLM, 'generating' `gen <row>` a
    few rows per step. For orchestration tests only (claims, takeover, parts); never evidence
    that inference works."""

    max_num_seqs = 4
    max_model_len = 100_000
    instances = []

    def __init__(self, engine_args, rows_per_step=2, crash_after=None, barrier=None):
        self.tokenizer = FakeTokenizer()
        self.queue, self.rows_per_step, self.crash_after, self.generated = [], rows_per_step, crash_after, 0
        if barrier is not None:
            barrier.wait()
        FakeEngine.instances.append(self)

    @property
    def pending(self):
        return len(self.queue)

    def add(self, tag, index, request):
        self.queue.append((tag, index, request.row))

    def step(self):
        time.sleep(0.005)
        out, self.queue = self.queue[:self.rows_per_step], self.queue[self.rows_per_step:]
        self.generated += len(out)
        if self.crash_after is not None and self.generated > self.crash_after:
            raise RuntimeError("fake engine crashed")
        return [(tag, i, RowResult(f"gen {row}", "length", 1, 1, None)) for tag, i, row in out]

    def abort(self, tag):
        self.queue = [q for q in self.queue if q[0] != tag]

    def group_busy(self):
        return False

    def shutdown(self):
        pass


def test_the_fake_engine_is_an_engine():
    assert isinstance(FakeEngine({}), Engine)
    assert not isinstance(object(), Engine)


ROWS = 37


def planned_run(tmp_path, prompts, overrides):
    """A planned, not started run directory of 2 ranks over `prompts`, sharded as its schedule does."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    rd = new_run_dir(tmp_path)
    cfg = compose(["dp=2", *overrides, f"data.input={path}"])
    inputs = scan([str(path)], "prompt")
    atomic_write(rd.config, config.to_yaml(cfg))
    plan = dataclasses.replace(bare_plan(2, per_rank=1), ep=cfg.ep, engine_args=config.engine_args(cfg, "/fake"),
                               submitted_at=time.time())
    atomic_write_json(rd.plan, plan.to_json())
    if cfg.dynamic:
        tokens = row_tokens(inputs.files, "prompt", None, cfg.sampling.max_tokens)
        shards = cut_by_tokens(inputs.files, tokens, 2, cfg.schedule.shards_per_rank, cfg.data.shard_rows)
    else:
        shards = make_shards(inputs.files, 2, cfg.data.shard_rows)
    write_manifest(str(rd.manifest), shards, inputs.schema)
    return rd, shards


@pytest.fixture
def claimed_run(tmp_path):
    """A planned, not started run directory with the dynamic schedule: 2 ranks."""
    return planned_run(tmp_path, [("x" * (200 if i % 9 == 0 else 8)) + str(i) for i in range(ROWS)],
                       ["schedule.lease_s=0.4", "checkpoint.rows=2"])


def run_rank(rd, rank, monkeypatch, **engine_kw):
    monkeypatch.setattr("hpcinfer.rank.engine.create_engine", lambda args: FakeEngine(args, **engine_kw))
    ctx = RankContext(rank, 2, rank, ["localhost"], "127.0.0.1", 1, "cuda", [str(rank)])
    return worker.run(str(rd.path), ctx)


def finalized_texts(rd):
    finalize(str(rd.path))
    return pq.read_table(rd.results).column("generated_text").to_pylist()


def test_two_ranks_share_the_shards_and_every_row_is_generated_once(claimed_run, monkeypatch):
    rd, shards = claimed_run
    barrier, codes = threading.Barrier(2), {}
    threads = [threading.Thread(target=lambda r=r: codes.update({r: run_rank(rd, r, monkeypatch, barrier=barrier)}))
               for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == {0: 0, 1: 0}
    assert finalized_texts(rd) == [f"gen {i}" for i in range(ROWS)]
    by = {rd.read_done(s.shard).rank for s in shards}
    assert by == {0, 1}  # both ranks did work
    assert all(p.name.endswith(".0") for p in rd.claims_dir.iterdir())  # no takeovers: nobody died
    assert sum(e.generated for e in FakeEngine.instances[-2:]) == ROWS


def test_a_dead_ranks_claims_are_taken_over_with_their_parts(claimed_run, monkeypatch):
    rd, shards = claimed_run
    assert run_rank(rd, 0, monkeypatch, crash_after=6) == 1  # claims a batch's worth, crashes after 6 rows
    assert rd.read_rank(0).state == FAILED
    held = {parse_claim_name(p.name)[0] for p in rd.claims_dir.iterdir()}
    done_by_0 = rd.done_shards()
    assert held - done_by_0  # it died holding unfinished shards ...
    in_parts = sum(pq.read_metadata(p).num_rows for p in rd.shards_dir.glob("*.parts/*.parquet"))
    assert in_parts >= 1  # ... and rows of them in durable parts
    assert run_rank(rd, 1, monkeypatch) == 0  # takes over at once: rank 0 recorded that it failed
    assert finalized_texts(rd) == [f"gen {i}" for i in range(ROWS)]
    assert {s.shard for s in shards if rd.read_done(s.shard).rank == 1} == {s.shard for s in shards} - done_by_0
    assert sum(rd.read_done(s.shard).rows_resumed for s in shards) == in_parts  # parts were kept, not redone
    rows_by_0 = sum(s.rows for s in shards if s.shard in done_by_0)
    assert FakeEngine.instances[-1].generated == ROWS - rows_by_0 - in_parts


def test_a_silent_rank_loses_its_claim_when_its_lease_expires(claimed_run, monkeypatch):
    rd, shards = claimed_run
    first = claim_order(shards)[0].shard
    rd.claims_dir.mkdir()
    rd.claim(first, 0).write_text(json.dumps({"rank": 0, "token": "ghost", "host": "lost-node"}))
    atomic_write(rd.rank_owner(0), "ghost")
    atomic_write(rd.rank_beat(0), "ghost 7")  # and never again: its node is gone
    t0 = time.monotonic()
    assert run_rank(rd, 1, monkeypatch) == 0
    assert time.monotonic() - t0 >= 0.4  # it waited for the lease (schedule.lease_s=0.4)
    assert rd.claim(first, 1).exists()
    assert finalized_texts(rd) == [f"gen {i}" for i in range(ROWS)]


def test_rows_that_cannot_be_generated_get_their_error_and_the_rest_is_generated(tmp_path, monkeypatch):
    """requests.build_requests turns a null, empty or too long prompt into its error row at once;
    the shard loop delivers those beside the engine's rows (here: all of a shard's rows fail)."""
    rd, shards = planned_run(tmp_path, ["p0", None, "", "x" * 50, "p4", None, None], ["data.shard_rows=2"])
    monkeypatch.setattr(FakeEngine, "max_model_len", 10)
    assert run_rank(rd, 0, monkeypatch) == 0 and run_rank(rd, 1, monkeypatch) == 0
    finalize(str(rd.path))
    res = pq.read_table(rd.results)
    assert res.column("generated_text").to_pylist() == ["gen 0", None, None, None, "gen 4", None, None]
    assert res.column("error").to_pylist() == [
        None, "prompt is null", "prompt is empty (0 tokens)",
        "prompt has 50 tokens; max_model_len=10 leaves no room for output", None, "prompt is null", "prompt is null"]
    assert sum(rd.read_done(s.shard).rows_failed for s in shards) == 5


class BusyGroupEngine(FakeEngine):
    """A fake lockstep engine: the group stays busy for `busy_steps` more of this rank's steps."""

    def __init__(self, *args, busy_steps=0, **kw):
        super().__init__(*args, **kw)
        self.busy_left, self.idle_steps = busy_steps, 0

    def step(self):
        if not self.queue:
            self.idle_steps += 1
            self.busy_left -= 1
        return super().step()

    def group_busy(self):
        return self.busy_left > 0


def test_a_lockstep_rank_out_of_rows_keeps_stepping_until_its_group_is_done(tmp_path, monkeypatch):
    """Fake engine (orchestration only; vLLM's CPU build cannot run lockstep): with ep=true a rank
    whose rows are all done must step with its group, not exit and leave the others hanging."""
    rd, _ = planned_run(tmp_path, [f"p{i}" for i in range(6)], ["model=tiny_moe", "ep=true"])
    engines = []

    def engine(args):
        engines.append(BusyGroupEngine(args, busy_steps=5))
        return engines[-1]

    monkeypatch.setattr("hpcinfer.rank.engine.create_engine", engine)
    assert worker.run(str(rd.path), RankContext(0, 2, 0, ["localhost"], "127.0.0.1", 1, "cuda", ["0"])) == 0
    assert engines[0].generated == 3 and engines[0].idle_steps == 5 and not engines[0].group_busy()
    assert rd.read_rank(0).state == DONE


# ---- balancing policies (schedule.py) --------------------------------------------------------
def test_share_allows_never_leaves_a_shard_unclaimable():
    rng = np.random.default_rng(7)
    for _ in range(2000):
        world, candidate = int(rng.integers(1, 9)), int(rng.integers(1, 100))
        held = rng.integers(0, 100, size=world)
        pool = int(held.sum()) + candidate + int(rng.integers(0, 50))  # what the ranks hold + the candidate + free
        assert any(schedule.share_allows(int(h), candidate, pool, world) for h in held)
    assert schedule.share_allows(0, 10, 10, 4)  # the only shard left: an empty-handed rank takes it
    assert schedule.share_allows(30, 10, 70, 2)  # 30 <= (70 - 10) / 2
    assert not schedule.share_allows(31, 10, 70, 2)


def test_by_mix_is_its_definition(seed=3):
    """by_mix's prefix sums give what its definition says: the first candidate whose rank holds,
    of the unfinished shards at least as dense, at most its share of the rest."""
    rng = np.random.default_rng(seed)

    def definition(candidates, unfinished, tokens, rows, held, world):
        def density(s):
            return tokens[s] / max(1, rows[s])
        for c in candidates:
            pool = sum(tokens[s] for s in unfinished if density(s) >= density(c))
            mine = sum(tokens[s] for s in held if density(s) >= density(c))
            if schedule.share_allows(mine, tokens[c], pool, world):
                return c
        return None

    for _ in range(2000):
        n = int(rng.integers(1, 40))
        rows = {s: int(rng.choice([1, 2, 3, 8])) for s in range(n)}
        tokens = {s: rows[s] * int(rng.choice([1, 2, 5, 100])) for s in range(n)}
        order = sorted(range(n), key=lambda s: (-tokens[s] / rows[s], -tokens[s], s))
        unfinished = [s for s in order if rng.random() < 0.8]
        held = {s for s in unfinished if rng.random() < 0.3}
        candidates = [s for s in unfinished if s not in held]
        world = int(rng.integers(1, 6))
        args = (candidates, unfinished, tokens, rows, held, world)
        assert schedule.by_mix(*args) == definition(*args), args


def simulate_claims(shards, world, room_rows, policy):
    """Ranks claiming one after the other (claims take milliseconds, engine start-ups differ by
    seconds), each while fewer than `room_rows` rows are pending, nothing finishing: what each rank
    holds once no rank claims any more (the start of a run)."""
    tokens = {s.shard: s.tokens for s in shards}
    rows = {s.shard: s.rows for s in shards}
    order = [s.shard for s in claim_order(shards)]
    held = [set() for _ in range(world)]
    progress = True
    while progress:
        progress = False
        for r in range(world):
            while sum(rows[s] for s in held[r]) < room_rows:
                free = [s for s in order if not any(s in h for h in held)]
                got = policy(free, order, tokens, rows, held[r], world) if free else None
                if got is None:
                    break
                held[r].add(got)
                progress = True
    return held


def test_by_mix_gives_every_gpu_its_share_of_the_long_requests_at_once():
    """The GPU benchmark's workload: 4,096 rows, the first 10% asking for 1,024 tokens, the rest
    for 32, cut into 16 shards of equal work. Claiming densest first while less than a batch is
    pending (the old GPU rule) gave one GPU every long request; by_mix splits them evenly."""
    caps = [1024] * 410 + [32] * 3686
    files = [InputFile("/data/skewed.parquet", len(caps))]
    shards = cut_by_tokens(files, [caps], 2, 8, 4096)
    long_rows = {s.shard: sum(c == 1024 for c in caps[s.global_start:s.global_start + s.rows]) for s in shards}

    def greedy(free, order, tokens, rows, held, world):
        return free[0]

    def mix(free, order, tokens, rows, held, world):
        return schedule.by_mix(free, order, tokens, rows, held, world)

    def long_per_rank(held):
        return sorted(sum(long_rows[s] for s in h) for h in held)

    assert long_per_rank(simulate_claims(shards, 2, 1024, greedy)) == [0, 410]
    lo, hi = long_per_rank(simulate_claims(shards, 2, 1024, mix))
    assert lo + hi == 410 and hi - lo <= max(long_rows.values())  # even, to one shard
    for world in (3, 4):
        shards = cut_by_tokens(files, [caps], world, 8, 4096)
        long_rows = {s.shard: sum(c == 1024 for c in caps[s.global_start:s.global_start + s.rows]) for s in shards}
        per = long_per_rank(simulate_claims(shards, world, 1024, mix))
        assert sum(per) == 410 and per[-1] - per[0] <= max(long_rows.values()), per
