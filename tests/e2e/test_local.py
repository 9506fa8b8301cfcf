"""End to end on real vLLM (CPU build), real Parquet, the local backend: the whole pipeline a
Slurm cluster will run, launched through the real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.vllm

INPUT_COLUMNS = ["id", "prompt", "tags", "meta", "note"]
MAX_TOKENS = 12


def _table(rows):
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("prompt", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("meta", pa.struct([("lang", pa.string()), ("score", pa.float64())])),
            ("note", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def _row(i, prompt, lang="en"):
    return {
        "id": 1000 - i,
        "prompt": prompt,
        "tags": [f"t{i}", "x"] if i % 3 else [],
        "meta": {"lang": lang, "score": i / 7},
        "note": f"row {i} ✓",
    }


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    """Four files in sorted order: nested columns, unicode, an empty file, a null prompt, an
    over-long prompt (> max_model_len 512 tokens) and an empty-string prompt."""
    d = tmp_path_factory.mktemp("inputs")
    a = [_row(i, f"Write a short story about rivers number {i}.") for i in range(7)]
    a[3] = _row(3, "Explique les glaciers à un enfant — ça marche? 日本語のテキスト 🚀", lang="fr")
    b: list = []
    c = [_row(10 + i, f"List three facts about compilers and {i} trains.") for i in range(5)]
    c[1] = _row(11, None)
    c[2] = _row(12, "the river " * 400)  # ~800 tokens: longer than max_model_len
    c[4] = _row(14, "")
    d_ = [_row(20 + i, f"Compare tea and paper, part {i}.") for i in range(9)]
    pq.write_table(_table(a), d / "part-00.parquet", row_group_size=3)
    pq.write_table(_table(b), d / "part-01.parquet")
    pq.write_table(_table(c), d / "part-02.parquet")
    pq.write_table(_table(d_), d / "part-03.parquet", row_group_size=4)
    return d


def multi_args(input_dir, run_dir, *extra):
    """The issue's command: dp=2 over a glob of files, an id column, greedy sampling."""
    return [
        "dp=2",
        f"data.input={input_dir}/*.parquet",
        "data.id_column=id",
        "sampling=greedy",
        f"sampling.max_tokens={MAX_TOKENS}",
        "data.shard_rows=4",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def multi_file_run(input_dir, tmp_path_factory, hpcinfer):
    run_dir = tmp_path_factory.mktemp("runs") / "multi"
    proc = hpcinfer("submit", *multi_args(input_dir, run_dir), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


def _inputs(input_dir) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(input_dir.glob("*.parquet")))


def test_every_row_once_in_input_order_with_pass_through_columns(multi_file_run, input_dir):
    run_dir, proc = multi_file_run
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir)
    results = pq.read_table(run_dir / "results.parquet")
    inputs = _inputs(input_dir)
    assert results.num_rows == inputs.num_rows == 21
    assert results.column_names == INPUT_COLUMNS + [
        "generated_text",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "error",
    ]
    assert results.select(INPUT_COLUMNS).equals(inputs)  # nested and unicode columns unchanged, same order


def test_errors_only_where_a_row_cannot_be_generated(multi_file_run):
    run_dir, _ = multi_file_run
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    errors = {r["id"]: r["error"] for r in rows if r["error"] is not None}
    assert set(errors) == {1000 - 11, 1000 - 12}
    assert "null" in errors[1000 - 11]
    assert "max_model_len" in errors[1000 - 12]
    for r in rows:
        if r["error"] is None:
            assert isinstance(r["generated_text"], str) and r["output_tokens"] > 0
            assert r["finish_reason"] in ("length", "stop") and r["prompt_tokens"] >= 1
        else:
            assert r["generated_text"] is None and r["output_tokens"] == 0


def test_summary_contract(multi_file_run):
    run_dir, _ = multi_file_run
    s = json.loads((run_dir / "summary.json").read_text())
    results = pq.read_table(run_dir / "results.parquet")
    assert s["rows"] == 21 and s["rows_failed"] == 2
    assert s["output_tokens"] == sum(results.column("output_tokens").to_pylist())
    assert s["prompt_tokens"] == sum(results.column("prompt_tokens").to_pylist())
    assert s["layout"] == {"tp": 1, "pp": 1, "dp": 2, "ep": False, "ranks": 2}
    assert s["sampling"]["temperature"] == 0.0 and s["sampling"]["max_tokens"] == MAX_TOKENS
    assert s["engine_args"]["enforce_eager"] is True and s["engine_args"]["tensor_parallel_size"] == 1
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    assert sum(r["rows"] for r in s["ranks"]) == 21
    assert all(r["host"] and r["devices"] and r["seconds"] > 0 for r in s["ranks"])
    assert s["ranks"][0]["devices"] != s["ranks"][1]["devices"]  # each rank on its own core
    assert s["wall_seconds"] >= s["generation_seconds"] > 0 and s["output_tokens_per_second"] > 0
    assert (run_dir / "config.yaml").exists()


def test_greedy_text_equals_raw_vllm_in_one_process(multi_file_run):
    """What hpcinfer produced over 2 ranks and 6 shards equals one vllm.LLM(**engine_args) call."""
    run_dir, _ = multi_file_run
    s = json.loads((run_dir / "summary.json").read_text())
    rows = [r for r in pq.read_table(run_dir / "results.parquet").to_pylist() if r["error"] is None]
    script = f"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens={MAX_TOKENS}), use_tqdm=False)
print(json.dumps([o.outputs[0].text for o in outs]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(s["engine_args"]), json.dumps([r["prompt"] for r in rows])],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["generated_text"] for r in rows] == raw


def test_resume_recomputes_only_missing_shards(multi_file_run, input_dir, tmp_path, hpcinfer):
    """Drop one shard's output and the published result: re-running the same command redoes
    only that shard and publishes the identical result."""
    run_dir, _ = multi_file_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = pq.read_table(copy / "results.parquet")
    shards = len(list((copy / "shards").glob("*.parquet")))
    assert shards >= 4  # 21 rows, 2 ranks, at most 4 rows per shard, cut at file boundaries
    for name in ("results.parquet", "summary.json", "done/000002.json", "shards/000002.parquet"):
        (copy / name).unlink()
    marker_times = {p.name: p.stat().st_mtime_ns for p in (copy / "done").glob("*.json")}
    proc = hpcinfer("submit", *multi_args(input_dir, copy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{shards - 1} of {shards} shard(s) already done" in proc.stderr
    assert pq.read_table(copy / "results.parquet").equals(before)
    assert {
        p.name: p.stat().st_mtime_ns for p in (copy / "done").glob("*.json") if p.name in marker_times
    } == marker_times
    again = hpcinfer("submit", *multi_args(input_dir, copy))
    assert again.returncode == 0 and "already finished" in again.stderr


def test_rerun_with_a_different_config_is_refused(multi_file_run, input_dir, hpcinfer):
    run_dir, _ = multi_file_run
    before = (run_dir / "results.parquet").stat().st_mtime_ns
    proc = hpcinfer("submit", *multi_args(input_dir, run_dir, "sampling.temperature=0.5"))
    assert proc.returncode == 2
    assert "different config" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "results.parquet").stat().st_mtime_ns == before


def test_demo_default_run(hpcinfer, tmp_path):
    """The README's first command: defaults only (tiny model, demo data, local cluster)."""
    run_dir = tmp_path / "demo"
    proc = hpcinfer("submit", f"run_dir={run_dir}", "data.demo_rows=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows" in proc.stderr and "tok/s" in proc.stderr  # progress and the final line
    results = pq.read_table(run_dir / "results.parquet")
    assert results.num_rows == 40 and results.column("id").to_pylist() == list(range(40))
    assert results.column("error").null_count == 40
    assert oct((run_dir).stat().st_mode & 0o777) == "0o700"


def test_failed_rank_leaves_nothing_published(hpcinfer, tmp_path):
    """A rank that cannot start its engine: exit 1, the failing rank's log tail, the missing
    shards listed, no results.parquet."""
    run_dir = tmp_path / "broken"
    proc = hpcinfer("submit", f"run_dir={run_dir}", "data.demo_rows=10", "+engine.no_such_engine_arg=1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank 0 failed" in proc.stderr
    assert "no_such_engine_arg" in proc.stderr  # from the rank's log tail
    assert re.search(r"(\d+) of \1 shard\(s\) missing: 0 \(rank 0, rows 0-", proc.stderr), proc.stderr[-2000:]
    assert not (run_dir / "results.parquet").exists() and not (run_dir / "summary.json").exists()
    state = json.loads((run_dir / "ranks" / "0.json").read_text())
    assert state["state"] == "failed" and "no_such_engine_arg" in state["error"]


def test_tiny_moe_runs_on_real_vllm(hpcinfer, tmp_path):
    """The built-in MoE (Mixtral-style, 4 experts, top-2) builds offline and generates."""
    run_dir = tmp_path / "moe"
    proc = hpcinfer(
        "submit", "model=tiny_moe", "sampling=greedy", "sampling.max_tokens=8", "data.demo_rows=6", f"run_dir={run_dir}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["rows"] == 6 and s["rows_failed"] == 0 and 0 < s["output_tokens"] <= 6 * 8
    assert "tiny-mixtral" in s["engine_args"]["model"]


def test_plan_cli(hpcinfer):
    ok = hpcinfer("plan", "dp=2")
    assert ok.returncode == 0, ok.stderr
    assert "dp=2 x tp=1 x pp=1" in ok.stdout and "rank 1" in ok.stdout
    bad = hpcinfer("plan", "dp=2", "tp=3")
    assert bad.returncode == 2 and "tp=3" in bad.stderr and "heads" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def test_sigterm_stops_every_rank_and_a_rerun_finishes(cli_env, tmp_path, hpcinfer):
    """scancel/kill of a local submit takes its ranks down (no orphans), records them as
    stopped, and the same command then continues the run to a complete result."""
    import signal
    import time

    run_dir = tmp_path / "term"
    args = [
        "dp=2",
        "data.demo_rows=200",
        "data.shard_rows=25",
        "sampling.max_tokens=128",
        "sampling.ignore_eos=true",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcinfer.submit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until both ranks generate
        states = (
            [json.loads(p.read_text()).get("state") for p in (run_dir / "ranks").glob("*.json")]
            if (run_dir / "ranks").exists()
            else []
        )
        if states.count("running") == 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    time.sleep(1)
    assert _processes_mentioning(str(run_dir)) == []
    states = {json.loads(p.read_text())["state"] for p in (run_dir / "ranks").glob("*.json")}
    assert states <= {"stopped", "done"} and not (run_dir / "results.parquet").exists()
    rerun = hpcinfer("submit", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "continuing" in rerun.stderr
    results = pq.read_table(run_dir / "results.parquet")
    assert results.column("id").to_pylist() == list(range(200))
    assert set(results.column("output_tokens").to_pylist()) == {128}
