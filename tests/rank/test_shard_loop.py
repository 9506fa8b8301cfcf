"""The worker's shard loop claiming, taking over and finishing shards, run for real with FakeEngine, a
fake implementation of the rank/engine.py Engine protocol that needs no vLLM: these test
orchestration only; tests/e2e/test_local.py and tests/e2e/test_chaos_local.py run real vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bare_plan, fill_disk

from hpcinfer import config
from hpcinfer.cli import compose
from hpcinfer.errors import RunIncomplete
from hpcinfer.finalize import finalize
from hpcinfer.launch.env import RankContext
from hpcinfer.planning.inputs import scan
from hpcinfer.planning.sharding import cut_by_tokens, make_shards, row_tokens
from hpcinfer.rank import worker
from hpcinfer.rank.engine import Engine
from hpcinfer.rank.schedule import claim_order
from hpcinfer.rundir.claims import parse_claim_name
from hpcinfer.rundir.files import atomic_write, atomic_write_json
from hpcinfer.rundir.integrity import part_positions, verify_done
from hpcinfer.rundir.manifest import write_manifest
from hpcinfer.rundir.output import RowResult
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DONE, FAILED


def new_run_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    return rd


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
        out, self.queue = self.queue[: self.rows_per_step], self.queue[self.rows_per_step :]
        self.generated += len(out)
        if self.crash_after is not None and self.generated > self.crash_after:
            raise RuntimeError("fake engine crashed")
        return [(tag, i, RowResult(f"gen {row}", "length", 1, 1, None)) for tag, i, row in out]

    def abort(self, tag):
        self.queue = [q for q in self.queue if q[0] != tag]

    def group_busy(self):
        return False

    def shutdown(self):
        self.shut_down = True


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
    plan = dataclasses.replace(
        bare_plan(2, per_rank=1), ep=cfg.ep, engine_args=config.engine_args(cfg, "/fake"), submitted_at=time.time()
    )
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
    return planned_run(
        tmp_path,
        [("x" * (200 if i % 9 == 0 else 8)) + str(i) for i in range(ROWS)],
        ["schedule.lease_s=0.4", "checkpoint.rows=2"],
    )


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
    threads = [
        threading.Thread(target=lambda r=r: codes.update({r: run_rank(rd, r, monkeypatch, barrier=barrier)}))
        for r in (0, 1)
    ]
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


def test_a_rank_process_keeps_its_shut_down_engine_until_it_exits_and_drops_a_failed_one(claimed_run, monkeypatch):
    """worker.main ends with os._exit: freeing the engine before it only cost time (~1.2 s on CPU).
    A failed attempt's engine is not kept: its destructor stops the engine's processes."""
    rd, _ = claimed_run
    monkeypatch.setattr(worker, "KEEP_UNTIL_EXIT", [])  # as main() sets it
    assert run_rank(rd, 0, monkeypatch, crash_after=6) == 1
    assert worker.KEEP_UNTIL_EXIT == []
    assert run_rank(rd, 1, monkeypatch) == 0
    assert worker.KEEP_UNTIL_EXIT == [FakeEngine.instances[-1]] and FakeEngine.instances[-1].shut_down


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
        None,
        "prompt is null",
        "prompt is empty (0 tokens)",
        "prompt has 50 tokens; max_model_len=10 leaves no room for output",
        None,
        "prompt is null",
        "prompt is null",
    ]
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


# ---- torn files and a full disk -------------------------------------------------------------------
def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def run_both(rd, monkeypatch, **engine_kw):
    """Both ranks, one after the other (what a resume does); the rows their engines generated."""
    before = len(FakeEngine.instances)
    codes = [run_rank(rd, r, monkeypatch, **engine_kw) for r in (0, 1)]
    assert codes == [0, 0], [rd.read_rank(r).error for r in (0, 1)]
    return sum(e.generated for e in FakeEngine.instances[before:])  # a rank with nothing to do makes none


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("found_by", ["rank", "finalize"])
def test_a_torn_shard_output_is_set_aside_and_only_its_rows_are_generated_again(
    tmp_path, monkeypatch, schedule, found_by
):
    """The issue: a finished run whose shards/<id>.parquet was truncated, results.parquet and
    summary.json removed, then resumed, failed with pyarrow's ArrowInvalid (the done marker was
    trusted). Now the shard is set aside (recorded), only its rows are generated again, and the
    results equal the undisturbed run's."""
    rd, shards = planned_run(
        tmp_path,
        [f"p{i}" for i in range(ROWS)],
        [f"schedule.mode={schedule}", "data.shard_rows=5", "checkpoint.rows=2"],
    )
    assert run_both(rd, monkeypatch) == ROWS
    reference = finalized_texts(rd)
    torn = shards[2]
    truncate(rd.shard_output(torn.shard))
    rd.results.unlink()
    rd.summary.unlink()
    if found_by == "finalize":
        with pytest.raises(RunIncomplete, match=rf"shard {torn.shard} .*magic bytes.*hpcinfer resume"):
            finalize(str(rd.path))
        assert not rd.results.exists() and not rd.is_done(torn.shard)
    assert run_both(rd, monkeypatch) == torn.rows  # only the torn shard's rows
    assert finalized_texts(rd) == reference
    summary = json.loads(rd.summary.read_text())
    [repair] = summary["repaired"]
    assert repair["what"] == "shard output" and repair["path"] == f"shards/{torn.shard:06d}.parquet"
    assert "magic bytes" in repair["why"] and repair["by"].startswith(found_by)


def test_a_torn_part_is_set_aside_and_its_rows_generated_again(tmp_path, monkeypatch):
    rd, shards = planned_run(
        tmp_path, [f"p{i}" for i in range(ROWS)], ["schedule.mode=static", "data.shard_rows=40", "checkpoint.rows=4"]
    )
    assert run_rank(rd, 0, monkeypatch, crash_after=9) == 1
    parts = sorted(rd.shard_parts(shards[0].shard).glob("*.parquet"))
    assert len(parts) == 2  # 8 durable rows
    truncate(parts[0])
    assert run_rank(rd, 0, monkeypatch) == 0
    assert FakeEngine.instances[-1].generated == shards[0].rows - 4  # the torn part's 4 rows again
    assert run_rank(rd, 1, monkeypatch) == 0
    assert finalized_texts(rd) == [f"gen {i}" for i in range(ROWS)]
    [repair] = json.loads(rd.summary.read_text())["repaired"]
    assert (repair["what"], repair["path"]) == ("part", f"shards/{shards[0].shard:06d}.parts/000000.parquet")


def test_unreadable_records_do_not_stop_a_resume(tmp_path, monkeypatch):
    """A done marker and a rank record torn (e.g. a crash of the filesystem): the shard is
    generated again, the rank's counters start again, the run completes."""
    rd, shards = planned_run(tmp_path, [f"p{i}" for i in range(ROWS)], ["schedule.mode=static", "data.shard_rows=5"])
    assert run_both(rd, monkeypatch) == ROWS
    reference = finalized_texts(rd)
    rd.results.unlink()
    rd.done_marker(shards[0].shard).write_text('{"shard": 0, "ra')
    rd.rank_file(1).write_bytes(b"")
    assert run_both(rd, monkeypatch) == shards[0].rows
    assert finalized_texts(rd) == reference
    assert sorted(r["what"] for r in json.loads(rd.summary.read_text())["repaired"]) == ["done marker", "rank record"]


class FillingEngine(FakeEngine):
    """Fills the run directory's disk once it has generated `fill_after` rows."""

    def __init__(self, *args, disk, fill_after, **kw):
        super().__init__(*args, **kw)
        self.disk, self.fill_after = disk, fill_after

    def step(self):
        out = super().step()
        if self.generated >= self.fill_after and not (self.disk / "filler").exists():
            fill_disk(self.disk)
        return out


def test_a_full_disk_fails_the_rank_clearly_and_a_resume_completes_identically(tmp_path, small_fs, monkeypatch):
    prompts, overrides = (
        [f"p{i}" for i in range(ROWS)],
        ["schedule.mode=static", "data.shard_rows=5", "checkpoint.rows=2"],
    )
    rd, _ = planned_run(tmp_path, prompts, overrides)
    run_both(rd, monkeypatch)
    reference = finalized_texts(rd)

    rd, shards = planned_run(small_fs, prompts, overrides)
    monkeypatch.setattr(
        "hpcinfer.rank.engine.create_engine", lambda args: FillingEngine(args, disk=small_fs, fill_after=7)
    )
    ctx = RankContext(0, 2, 0, ["localhost"], "127.0.0.1", 1, "cuda", ["0"])
    assert worker.run(str(rd.path), ctx) == 1
    record = rd.read_rank(0)
    assert record.state == FAILED
    assert record.error.startswith("no space left on device writing ")
    assert f"free space and resume (hpcinfer resume {rd.path})" in record.error
    # nothing half-written: no temp file, every done shard and every part provably complete
    assert [p for p in rd.path.rglob("*") if p.name.endswith(".tmp")] == []
    assert verify_done(rd, shards, "test").repairs == [] and rd.read_repairs() == []
    for s in shards:
        for part in rd.shard_parts(s.shard).glob("*.parquet"):
            part_positions(part, s)
    (small_fs / "filler").unlink()  # space freed: resume
    assert run_both(rd, monkeypatch) < ROWS  # what was durable is kept
    assert finalized_texts(rd) == reference


# ---- n samples a row (issue 14): list columns in parts and shards, exploded by finalize ---------
class SamplingEngine(FakeEngine):
    """FakeEngine whose rows have request.sampling["n"] samples, `gen <row>.<j>`, j tokens + 1 each."""

    def add(self, tag, index, request):
        self.queue.append((tag, index, (request.row, request.sampling["n"])))

    def step(self):
        from hpcinfer.rundir.output import Sample

        out, self.queue = self.queue[: self.rows_per_step], self.queue[self.rows_per_step :]
        done = []
        for tag, i, (row, n) in out:
            samples = [Sample(f"gen {row}.{j}", "length", j + 1) for j in range(n)]
            done.append(
                (tag, i, RowResult(samples[0].text, "length", 1, sum(s.output_tokens for s in samples), None, samples))
            )
        return done


@pytest.mark.parametrize("explode", [False, True])
def test_samples_are_list_columns_or_one_row_each_in_input_order(tmp_path, monkeypatch, explode):
    from hpcinfer.rundir.output import OutputSpec
    from hpcinfer.rundir.records import RequestSpec

    prompts = [f"p{i}" for i in range(7)]
    pq.write_table(
        pa.table({"prompt": prompts, "s": ['{"n": 2}', None, "{bad", '{"n": 3}', None, None, '{"n": 1}']}),
        tmp_path / "in.parquet",
    )
    rd = new_run_dir(tmp_path)
    overrides = [
        "dp=2",
        "data.sampling_column=s",
        "sampling.n=1",
        "data.shard_rows=2",
        f"data.input={tmp_path / 'in.parquet'}",
    ]
    cfg = compose([*overrides, f"output.explode_samples={str(explode).lower()}"])
    inputs = scan([str(tmp_path / "in.parquet")], "prompt")
    atomic_write(rd.config, config.to_yaml(cfg))
    plan = dataclasses.replace(
        bare_plan(2, per_rank=1),
        engine_args=config.engine_args(cfg, "/fake"),
        submitted_at=time.time(),
        request=RequestSpec(sampling_column="s", seed_stride=3),
        output=OutputSpec(samples=True, explode=explode),
    )
    atomic_write_json(rd.plan, plan.to_json())
    shards = cut_by_tokens(inputs.files, row_tokens(inputs.files, "prompt", None, 8), 2, 2, 2)
    write_manifest(str(rd.manifest), shards, inputs.schema)
    monkeypatch.setattr("hpcinfer.rank.engine.create_engine", lambda args: SamplingEngine(args))
    for rank in (0, 1):
        assert (
            worker.run(str(rd.path), RankContext(rank, 2, rank, ["localhost"], "127.0.0.1", 1, "cuda", [str(rank)]))
            == 0
        )
    summary = finalize(str(rd.path))
    rows = pq.read_table(rd.results).to_pylist()
    n = {0: 2, 1: 1, 3: 3, 4: 1, 5: 1, 6: 1}
    assert summary["rows"] == 7 and summary["rows_failed"] == 1
    assert summary["output_tokens"] == sum(k * (k + 1) // 2 for k in n.values())
    if not explode:
        assert [r["generated_text"] for r in rows] == [
            None if i == 2 else [f"gen {i}.{j}" for j in range(n[i])] for i in range(7)
        ]
        assert rows[3]["output_tokens"] == [1, 2, 3] and "not valid JSON" in rows[2]["error"]
    else:
        want = [(p, j, f"gen {i}.{j}") for i, p in enumerate(prompts) if i != 2 for j in range(n[i])]
        want.insert(3, ("p2", None, None))
        assert [(r["prompt"], r["sample_index"], r["generated_text"]) for r in rows] == want
