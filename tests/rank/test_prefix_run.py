"""Prefix placement through the shard loop, finalize and resume, with the fake engine of
test_shard_loop.py (orchestration only; tests/e2e/test_prefix_placement.py runs real vLLM): with placement on
and off, two ranks give identical results, every row once, in input order; a document's rows
run on one rank, one after another."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bare_plan
from test_shard_loop import FakeEngine, new_run_dir

from hpcinfer import config
from hpcinfer.cli import compose
from hpcinfer.finalize import finalize
from hpcinfer.launch.env import RankContext
from hpcinfer.planning.inputs import scan
from hpcinfer.planning.prepare import plan_shards
from hpcinfer.rank import worker
from hpcinfer.rundir.files import atomic_write, atomic_write_json
from hpcinfer.rundir.manifest import load_placement, read_manifest, write_manifest

D, Q = 6, 5  # documents x questions, question-major


def prompts():
    docs = [(f"document {d} " * 60) for d in range(D)]
    return [f"{docs[d]}\nquestion {q}" for q in range(Q) for d in range(D)]


def planned(tmp_path, prefix, mode="dynamic"):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(D * Q)), "prompt": prompts()}), path)
    rd = new_run_dir(tmp_path / prefix)
    cfg = compose(
        ["dp=2", f"data.input={path}", f"schedule.prefix={prefix}", f"schedule.mode={mode}", "checkpoint.rows=2"]
    )
    inputs = scan([str(path)], "prompt")
    atomic_write(rd.config, config.to_yaml(cfg))
    sharded = plan_shards(cfg, inputs, 2, None, rd.inputs_dir if rd.inputs_dir.mkdir() is None else None)
    plan = dataclasses.replace(bare_plan(2, per_rank=1), engine_args=config.engine_args(cfg, "/fake"))
    plan = dataclasses.replace(plan, submitted_at=time.time(), schedule=mode)
    atomic_write_json(rd.plan, plan.to_json())
    rel = "inputs/placement.npy" if sharded.placement else None
    write_manifest(str(rd.manifest), sharded.shards, inputs.schema, rel)
    return rd, sharded


class RecordingEngine(FakeEngine):
    """FakeEngine that keeps the rows it was given, in order, per rank."""

    seen = {}

    def __init__(self, args, rank):
        super().__init__(args)
        self.rank = rank
        RecordingEngine.seen[rank] = []

    def add(self, tag, index, request):
        RecordingEngine.seen[self.rank].append(request.row)
        super().add(tag, index, request)


def run_both(rd, monkeypatch):
    codes = {}

    def one(r):
        ctx = RankContext(r, 2, r, ["localhost"], "127.0.0.1", 1, "cuda", [str(r)])
        codes[r] = worker.run(str(rd.path), ctx)

    engines = {}
    lock = threading.Lock()

    def make(args):
        with lock:
            r = len(engines) % 2
            engines[r] = RecordingEngine(args, r)
            return engines[r]

    monkeypatch.setattr("hpcinfer.rank.engine.create_engine", make)
    threads = [threading.Thread(target=one, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == {0: 0, 1: 0}
    finalize(str(rd.path))
    return pq.read_table(rd.results), dict(RecordingEngine.seen)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_placement_on_and_off_give_identical_results_in_input_order(tmp_path, monkeypatch, mode):
    off_rd, off = planned(tmp_path, "off", mode)
    on_rd, on = planned(tmp_path, "on", mode)
    assert off.placement is None and on.placement is not None
    assert load_placement(str(off_rd.manifest)) is None
    order = load_placement(str(on_rd.manifest))
    assert sorted(order.tolist()) == list(range(D * Q))
    off_table, _ = run_both(off_rd, monkeypatch)
    on_table, seen = run_both(on_rd, monkeypatch)
    assert on_table.equals(off_table)
    assert on_table.column("id").to_pylist() == list(range(D * Q))  # every row once, in input order
    assert on_table.column("generated_text").to_pylist() == [f"gen {i}" for i in range(D * Q)]
    assert on_table.column("prompt").to_pylist() == prompts()
    if mode == "dynamic":  # each document's questions on one rank, one after another
        for rows in seen.values():
            docs = [r % D for r in rows]
            runs = [d for i, d in enumerate(docs) if i == 0 or docs[i - 1] != d]
            assert len(runs) == len(set(runs)), docs


def test_the_plan_finds_the_sharing_and_auto_turns_placement_on(tmp_path):
    rd, sharded = planned(tmp_path, "auto")
    s = sharded.sharing
    assert s.placed and s.mode == "auto"
    assert s.shared_fraction > 0.5 and s.prefill_placed * 2 < s.prefill_input_order  # levels: a lower bound
    shards, _ = read_manifest(str(rd.manifest))
    assert {sh.group for sh in shards} and all(sh.group >= 0 for sh in shards)


def test_auto_leaves_rows_without_shared_starts_in_input_order(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"{i} unique prompt {i * 7919}" for i in range(50)]}), path)
    cfg = compose(["dp=2", f"data.input={path}"])
    sharded = plan_shards(cfg, scan([str(path)], "prompt"), 2, None, None)
    assert not sharded.sharing.placed and sharded.placement is None
    assert all(s.group == -1 for s in sharded.shards)
    assert [s.global_start for s in sharded.shards] == sorted(s.global_start for s in sharded.shards)


def test_a_resume_plans_the_same_placement_and_keeps_its_files(tmp_path):
    rd, first = planned(tmp_path, "on")
    mtime = (rd.inputs_dir / "placed.parquet").stat().st_mtime_ns
    cfg = compose(["dp=2", f"data.input={tmp_path / 'in.parquet'}", "schedule.prefix=on"])
    again = plan_shards(cfg, scan([str(tmp_path / "in.parquet")], "prompt"), 2, None, rd.inputs_dir)
    assert again.shards == first.shards
    assert (rd.inputs_dir / "placed.parquet").stat().st_mtime_ns == mtime
    assert np.array_equal(np.load(again.placement), np.load(first.placement))
