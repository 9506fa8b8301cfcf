"""bench/overhead.py's pure parts: pooling several runs' --json files (which side went first in
each pair, also for runs from before that was recorded) and the start difference split by order."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import bench_module


@pytest.fixture(scope="module")
def overhead():
    return bench_module("overhead")


def run(start: float, after: float = 1.0, position=None) -> dict:
    r = {"split": {"to_engine_s": 1.0, "engine_s": start - 1.0, "window_s": 10.0, "after_s": after}}
    if position is not None:
        r["position"] = position
    return r


def write(path: Path, raw, hpc, rows=512) -> str:
    args = {"rows": rows, "max_tokens": 16}
    path.write_text(json.dumps({"args": args, "engine_args": {"model": "m"}, "results": {"raw": raw, "hpcinfer": hpc}}))
    return str(path)


def test_pooled_runs_know_which_side_went_first_recorded_or_not(overhead, tmp_path):
    # an old run (no position): its pair i started with side i % 2 (raw, hpcinfer, raw, ...)
    old = write(tmp_path / "old.json", [run(30), run(31), run(32)], [run(33), run(34), run(35)])
    # a later call of one pair numbered on (--first-pair 3): hpcinfer went first, as recorded
    new = write(tmp_path / "new.json", [run(40, position=1)], [run(38, position=0)])
    pooled = overhead.pooled([old, new])
    assert [r["position"] for r in pooled["raw"]] == [0, 1, 0, 1]
    assert [r["position"] for r in pooled["hpcinfer"]] == [1, 0, 1, 0]
    text = overhead.split_differences(pooled["raw"], pooled["hpcinfer"])
    # all pairs: +3, +3, +3, -2; it first: +3 (pair 1) and -2 (the new call); raw first: +3, +3
    assert "start median +3.00 s (-2.0 to +3.0)" in text
    assert "where it went first: median +0.50 s (-2.0 to +3.0), 2 pairs" in text
    assert "where raw went first: median +3.00 s (+3.0 to +3.0), 2 pairs" in text


def test_pooled_refuses_a_run_that_measured_something_else(overhead, tmp_path):
    a = write(tmp_path / "a.json", [run(30)], [run(31)])
    b = write(tmp_path / "b.json", [run(30)], [run(31)], rows=1024)
    with pytest.raises(SystemExit, match="b.json measured something else"):
        overhead.pooled([a, b])


def test_one_order_only_says_so(overhead):
    text = overhead.split_differences([run(30, position=0)], [run(35, position=1)])
    assert "where it went first: no pair; where raw went first: median +5.00 s" in text


def test_settle_waits_for_the_gpu_processes_that_came_after_the_benchmark_began(overhead, tmp_path, monkeypatch):
    apps = tmp_path / "apps"
    smi = tmp_path / "bin" / "nvidia-smi"  # a stand-in: prints the pids listed in `apps`
    smi.parent.mkdir()
    smi.write_text(f"#!/bin/sh\ncat {apps}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    apps.write_text("100\n")
    before = overhead.gpu_pids()
    assert before == {"100"}
    assert overhead.settle(before) < 0.1  # only the process that was there before: no wait
    apps.write_text("100\n200\n")  # the previous run's engine core, still freeing its memory
    threading.Timer(0.5, lambda: apps.write_text("100\n")).start()
    waited = overhead.settle(before)
    assert 0.4 < waited < 5
    assert overhead.settle(before, limit_s=0.3) < 0.1


def test_settle_on_cpu_waits_for_nothing(overhead, monkeypatch):
    monkeypatch.setattr(overhead.shutil, "which", lambda name: None)
    assert overhead.gpu_pids() is None and overhead.settle(None) == pytest.approx(0, abs=0.05)


def test_start_difference_by_part_where_both_sides_recorded_their_import(overhead):
    # raw: interpreter + import 14 + prompts = to engine 16, LLM() 18; hpcinfer: 2 before its
    # engine, whose start-up 41 is its rank's import 20 and LLM() 21
    raw = {"split": {"to_engine_s": 16.0, "engine_s": 18.0, "after_s": 1.0}, "startup": {"import_seconds": 14.0}}
    hpc = {"split": {"to_engine_s": 2.0, "engine_s": 41.0, "after_s": 1.5}, "startup": {"import_seconds": 20.0}}
    hpc["to_rank_s"] = 1.0
    assert overhead.start_parts(raw) == (14.0, 18.0, 2.0)
    assert overhead.start_parts(hpc) == (20.0, 21.0, 2.0)
    text = overhead.split_differences([raw], [hpc])
    assert "start median +9.00 s" in text
    assert (
        "by part: import vllm median +6.00 s (+6.0 to +6.0), LLM() median +3.00 s (+3.0 to +3.0), the rest median +0.00 s"
        in text
    )
    # a run from before the import was recorded: no split by part
    assert "by part" not in overhead.split_differences([run(30)], [run(31)])


def test_rounds_rotate_the_order_across_calls_and_stop_before_one_past_the_budget(overhead, monkeypatch, capsys):
    kinds = ["raw", "hpcinfer"]
    assert [o for _, o in overhead.rounds(kinds, 0, 3, None, 0.0)] == [kinds, kinds[::-1], kinds]
    assert [i for i, _ in overhead.rounds(kinds, 3, 2, None, 0.0)] == [3, 4]  # a later call goes on
    now = [100.0]
    monkeypatch.setattr(overhead.time, "monotonic", lambda: now[0])
    ran = []
    for i, _ in overhead.rounds(("a", "b", "c"), 0, 5, 250.0, 100.0, what="round"):
        ran.append(i)
        now[0] += 100.0  # each round takes 100 s: at 200 s, one more would end at 300 s > 250 s
    assert ran == [0, 1]
    assert "no room for round 2 (the longest took 100 s)" in capsys.readouterr().out
