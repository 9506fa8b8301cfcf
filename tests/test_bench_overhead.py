"""bench/overhead.py's pure parts: pooling several runs' --json files (which side went first in
each pair, also for runs from before that was recorded) and the start difference split by order."""

from __future__ import annotations

import json
import os
import sys
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


def test_split_cores_gives_each_side_an_equal_share_of_neighbouring_cores(overhead):
    assert overhead.split_cores([1, 0], 2) == [[0], [1]]
    assert overhead.split_cores([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3]]  # core 4 stays idle
    assert overhead.split_cores(range(6), 3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="3 sides at once need 3 cores or more; this machine offers 2"):
        overhead.split_cores([0, 1], 3)


def test_overlap_is_the_shared_time_over_the_union(overhead):
    assert overhead.overlap([(0, 10), (0, 10)]) == 1.0
    assert overhead.overlap([(0, 10), (1, 11)]) == pytest.approx(9 / 11)
    assert overhead.overlap([(0, 4), (5, 9)]) == 0.0


def concurrent(start: float, window, cpus) -> dict:
    return {**run(start), "window_at": list(window), "cpus": cpus}


def test_concurrent_pairs_are_described_by_their_cores_and_windows_not_by_an_order(overhead, tmp_path):
    raw = [concurrent(10, (100, 130), [0]), concurrent(10, (200, 230), [1])]
    hpc = [concurrent(9, (101, 131), [1]), concurrent(9, (200, 229), [0])]
    text = overhead.arrangement(["raw", "hpcinfer"], [raw[0], hpc[0]])
    assert text.startswith("together: raw on 0, hpcinfer on 1; windows overlap 94%")
    assert text.endswith("hpcinfer began +1.0 s, ended +1.0 s")
    assert "raw on 1" in overhead.arrangement(["hpcinfer", "raw"], [hpc[1], raw[1]])
    summary = overhead.concurrent_summary(raw, hpc, [0.99, 1.01])
    assert summary == (
        "windows overlap median 95.1% (min 93.5%); ratio on cores 0: median 1.010 (1 pairs); "
        "on cores 1: median 0.990 (1 pairs)"
    )
    # nobody went first: no split of the start difference by order, and pooling leaves it so
    text = overhead.split_differences(raw, hpc)
    assert "start median -1.00 s" in text and "went first" not in text
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "args": {"rows": 8, "max_tokens": 4, "mode": "concurrent"},
                "engine_args": {},
                "results": {"raw": raw, "hpcinfer": hpc},
            }
        )
    )
    assert all("position" not in r for r in overhead.pooled([str(path)])["raw"])
    seq = write(tmp_path / "s.json", [run(30)], [run(31)], rows=8)
    with pytest.raises(SystemExit, match="s.json measured something else"):
        overhead.pooled([str(path), seq])


def test_together_opens_every_gate_once_all_sides_wait_at_theirs_and_raises_a_sides_failure(overhead, tmp_path):
    """Each side says it is ready (its ready file), then waits for its gate, as the rank and the
    raw script do; no gate opens before the slower side is ready."""
    gates = {"raw": tmp_path / "g-raw", "hpcinfer": tmp_path / "g-hpcinfer"}
    assert overhead.ready("raw", gates["raw"]).name == "g-raw.ready"
    assert overhead.ready("hpcinfer", gates["hpcinfer"]).name == "g-hpcinfer.rank0.ready"
    began = overhead.time.monotonic()

    def side(name, up_after):
        overhead.time.sleep(up_after)
        overhead.ready(name, gates[name]).write_text(repr(overhead.time.time()))
        ready_at = overhead.time.monotonic() - began
        while not gates[name].exists():
            overhead.time.sleep(0.01)
        return {"ready": ready_at, "go": overhead.time.monotonic() - began}

    out = overhead.together({"raw": lambda: side("raw", 0.05), "hpcinfer": lambda: side("hpcinfer", 0.4)}, gates)
    assert out["raw"]["ready"] < 0.2 and out["hpcinfer"]["ready"] >= 0.4
    assert out["raw"]["go"] >= 0.4 and abs(out["raw"]["go"] - out["hpcinfer"]["go"]) < 0.1  # together

    def fails():
        sys.exit("raw vLLM failed with exit code 1")

    others = tmp_path / "other"  # a side waiting at its gate goes on once the other has failed
    with pytest.raises(SystemExit, match="raw vLLM failed"):
        overhead.together(
            {"raw": fails, "hpcinfer": lambda: side("hpcinfer", 0.0)},
            {"raw": others, "hpcinfer": gates["hpcinfer"]},
        )
    # a side without a gate (a baseline from before the rank's gate) does not hold the others
    gates = {"raw": tmp_path / "g2-raw", "hpcinfer": tmp_path / "g2-hpcinfer"}
    out = overhead.together({"raw": lambda: side("raw", 0.0), "base": lambda: {}}, {"raw": gates["raw"]})
    assert out["base"] == {} and out["raw"]["go"] < 5
