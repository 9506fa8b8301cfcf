"""Finalize (finalize.py): the ordered, verified merge of shard outputs, without vLLM.

`fake_run_dir` writes by hand what submit and the ranks would write: config.yaml, plan.json,
manifest.parquet, shards/<id>.parquet (built with output.shard_table from made-up RowResults)
and done/<id>.json markers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, bare_plan, fill_disk

from hpcinfer import config
from hpcinfer.cli import compose
from hpcinfer.errors import RunIncomplete
from hpcinfer.finalize import finalize
from hpcinfer.planning.inputs import discover, scan
from hpcinfer.planning.sharding import make_shards, partition
from hpcinfer.rundir import output
from hpcinfer.rundir.files import atomic_write, atomic_write_json
from hpcinfer.rundir.manifest import read_shard, write_manifest
from hpcinfer.rundir.output import RowResult
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DoneRecord

PYTHON = sys.executable


FILE_SIZES = (7, 0, 11, 5)  # an empty file in the middle


RANKS = 3


SHARD_ROWS = 4


def input_table(n, start):
    rows = range(start, start + n)
    return pa.table(
        {
            "id": pa.array(rows, pa.int64()),
            "prompt": pa.array([None if i == 3 else f"prompt {i} — ü" for i in rows], pa.string()),
            "tags": pa.array([[f"t{i}"] * (i % 3) for i in rows], pa.list_(pa.string())),
        }
    )


def fake_result(row, prompt):
    """A made-up generation for global row `row`: every 5th row failed."""
    if prompt is None or row % 5 == 4:
        return RowResult(None, None, 0, 0, "prompt is null" if prompt is None else "boom")
    return RowResult(f"gen {row}", "length", row + 1, 10 + row % 3, None)


def fake_run_dir(tmp_path, order="forward", skip_done=(), ranks=RANKS, shard_rows=SHARD_ROWS):
    """A finished (or deliberately unfinished) run directory built by hand; returns
    (RunDir, shards, the original input table)."""
    inputs_dir = tmp_path / "inputs"
    inputs_dir.mkdir()
    tables, start = [], 0
    for i, n in enumerate(FILE_SIZES):
        t = input_table(n, start)
        pq.write_table(t, inputs_dir / f"part-{i}.parquet", row_group_size=3)
        tables.append(t)
        start += n
    original = pa.concat_tables(tables)
    inputs = scan(discover(str(inputs_dir)), "prompt", "id")

    rd = RunDir(tmp_path / "run")
    rd.create()
    cfg = compose([])
    atomic_write(rd.config, config.to_yaml(cfg))
    plan = dataclasses.replace(
        bare_plan(ranks, per_rank=1), engine_args=config.engine_args(cfg, "/fake/tiny"), submitted_at=time.time() - 5
    )
    atomic_write_json(rd.plan, plan.to_json())
    shards = make_shards(inputs.files, ranks, shard_rows)
    write_manifest(str(rd.manifest), shards, inputs.schema)

    todo = list(reversed(shards)) if order == "reverse" else list(shards)
    for s in todo:
        rows = read_shard(s, inputs.schema)
        prompts = rows.column("prompt").to_pylist()
        results = [fake_result(s.global_start + i, p) for i, p in enumerate(prompts)]
        pq.write_table(output.shard_table(rows, results, s.global_start), rd.shard_output(s.shard))
        if s.shard in skip_done:
            continue
        rd.mark_done(
            DoneRecord(
                shard=s.shard,
                rank=s.rank,
                host="fakehost",
                rows=s.rows,
                rows_failed=sum(r.error is not None for r in results),
                prompt_tokens=sum(r.prompt_tokens for r in results),
                output_tokens=sum(r.output_tokens for r in results),
                generation_seconds=0.5,
            )
        )
    return rd, shards, original


def expected_results(original):
    prompts = original.column("prompt").to_pylist()
    return [fake_result(i, p) for i, p in enumerate(prompts)]


def leftover_temp_files(path):
    return [p for p in Path(path).rglob("*") if p.name.endswith(".tmp")]


# ---- finalize -----------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_finalize_merges_in_input_order(tmp_path, order):
    rd, shards, original = fake_run_dir(tmp_path, order=order)
    assert len(shards) > RANKS  # several shards per rank, cut at files and SHARD_ROWS
    summary = finalize(str(rd.path))

    res = pq.read_table(rd.results)
    assert output.ROW_COLUMN not in res.column_names
    assert res.column_names == original.column_names + [f.name for f in output.GENERATED]
    assert res.num_rows == original.num_rows == sum(FILE_SIZES)
    # the input columns are exactly the input, nested list column included, in input order
    assert res.select(original.column_names).equals(original)
    assert res.schema.field("tags").type == pa.list_(pa.string())
    want = expected_results(original)
    assert res.column("generated_text").to_pylist() == [r.generated_text for r in want]
    assert res.column("error").to_pylist() == [r.error for r in want]
    assert res.column("prompt_tokens").to_pylist() == [r.prompt_tokens for r in want]

    assert summary["rows"] == original.num_rows
    assert summary["rows_failed"] == sum(r.error is not None for r in want)
    assert summary["prompt_tokens"] == sum(r.prompt_tokens for r in want)
    assert summary["output_tokens"] == sum(r.output_tokens for r in want)
    assert summary["shards"] == len(shards)
    assert summary["layout"] == dict(tp=1, pp=1, dp=RANKS, ep=False, ranks=RANKS)
    assert summary["model"] == "tiny"
    assert summary["results"] == str(rd.results)
    per_rank = {r["rank"]: r for r in summary["ranks"]}
    assert sorted(per_rank) == list(range(RANKS))
    for r, (lo, hi) in enumerate(partition(original.num_rows, RANKS)):
        assert per_rank[r]["rows"] == hi - lo
        assert per_rank[r]["rows_failed"] == sum(w.error is not None for w in want[lo:hi])
        assert per_rank[r]["output_tokens"] == sum(w.output_tokens for w in want[lo:hi])
        assert per_rank[r]["host"] == "fakehost"
    assert rd.summary.exists()
    assert leftover_temp_files(rd.path) == []


def test_finalize_given_the_config_in_hand_writes_the_summary_config_yaml_gives(tmp_path):
    """The local launcher passes the config it has: the summary is the one config.yaml gives,
    and config.yaml is not read again (here it no longer parses)."""
    rd, _, _ = fake_run_dir(tmp_path)
    want = finalize(str(rd.path))
    cfg = config.load_run_config(rd.config)
    rd.results.unlink()
    rd.summary.unlink()
    rd.config.write_text("model: [not yaml\n")
    got = finalize(str(rd.path), cfg)
    timed = ("wall_seconds", "finished_at")
    assert {k: v for k, v in got.items() if k not in timed} == {k: v for k, v in want.items() if k not in timed}
    assert got["model"] == "tiny" and got["sampling"]["max_tokens"] == cfg.sampling.max_tokens
    with pytest.raises(yaml.YAMLError):  # without the config in hand it is read, and fails here
        finalize(str(rd.path))


def test_finalize_drops_parts_left_by_a_rank_killed_after_its_done_marker(tmp_path):
    rd, shards, _ = fake_run_dir(tmp_path)
    stale = rd.shard_parts(shards[1].shard)
    stale.mkdir()
    (stale / "000000.parquet").write_bytes(b"partial")
    finalize(str(rd.path))
    assert rd.results.exists() and not stale.exists()


def test_finalize_missing_done_marker(tmp_path):
    rd, shards, _ = fake_run_dir(tmp_path, skip_done={2})
    with pytest.raises(RunIncomplete) as e:
        finalize(str(rd.path))
    msg = str(e.value)
    assert f"1 of {len(shards)} shard(s) missing" in msg
    assert f"2 (rank {shards[2].rank}," in msg
    assert not rd.results.exists()
    assert not rd.summary.exists()


def test_finalize_done_marker_without_output(tmp_path):
    rd, shards, _ = fake_run_dir(tmp_path)
    rd.shard_output(1).unlink()
    with pytest.raises(RunIncomplete, match=r"shard 1 \(shards/000001.parquet: missing\).*hpcinfer resume"):
        finalize(str(rd.path))
    assert not rd.results.exists()
    assert not rd.is_done(1)  # its marker is set aside: resume generates the shard again
    with pytest.raises(RunIncomplete, match=r"1 of \d+ shard\(s\) missing: 1 \(rank"):
        finalize(str(rd.path))


def rewrite_positions(rd, shard, positions):
    path = rd.shard_output(shard)
    t = pq.read_table(path)
    i = t.column_names.index(output.ROW_COLUMN)
    pq.write_table(t.set_column(i, output.ROW_COLUMN, pa.array(positions, pa.int64())), path)


@pytest.mark.parametrize("damage", ["duplicate", "swap", "foreign"])
def test_finalize_rejects_bad_row_positions(tmp_path, damage):
    rd, shards, _ = fake_run_dir(tmp_path)
    s = next(s for s in shards if s.rows >= 3)
    pos = list(range(s.global_start, s.global_start + s.rows))
    if damage == "duplicate":
        pos[1] = pos[0]
    elif damage == "swap":
        pos[0], pos[1] = pos[1], pos[0]
    else:
        pos[-1] = 10_000
    rewrite_positions(rd, s.shard, pos)
    with pytest.raises(RunIncomplete) as e:
        finalize(str(rd.path))
    assert f"shard {s.shard}" in str(e.value)
    assert not rd.results.exists()
    assert not rd.summary.exists()
    assert leftover_temp_files(rd.path) == []


def test_finalize_rejects_wrong_row_count(tmp_path):
    rd, shards, _ = fake_run_dir(tmp_path)
    path = rd.shard_output(0)
    t = pq.read_table(path)
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), path)  # one row duplicated at the end
    with pytest.raises(RunIncomplete, match=f"shard 0 .*: {shards[0].rows + 1} rows, its shard has {shards[0].rows}"):
        finalize(str(rd.path))
    assert not rd.results.exists()


def test_finalize_cli_exit_codes(tmp_path):
    rd, shards, _ = fake_run_dir(tmp_path, skip_done={0})

    def run(*args):
        return subprocess.run(
            [PYTHON, "-m", "hpcinfer.finalize", *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )

    p = run(str(rd.path))
    assert p.returncode == 1
    assert "incomplete" in p.stderr and "0 (rank 0" in p.stderr
    assert not rd.results.exists()

    rd.mark_done(
        DoneRecord(
            shard=0,
            rank=0,
            host="fakehost",
            rows=shards[0].rows,
            rows_failed=0,
            prompt_tokens=0,
            output_tokens=0,
            generation_seconds=0.0,
        )
    )
    p = run(str(rd.path))
    assert p.returncode == 0, p.stderr
    assert f"{sum(FILE_SIZES)} rows" in p.stdout
    assert rd.results.exists()

    assert run().returncode == 2  # usage


# ---- finalize killed, two at once, a full disk ---------------------------------------------------
def big_run_dir(tmp_path, rows=300_000, shards=30):
    """A finished run directory large enough that finalize takes a while (~1 s): one input file,
    `shards` shards of one rank each... written directly (no vLLM)."""
    path = tmp_path / "in.parquet"
    prompts = [f"prompt {i} " + "x" * 40 for i in range(rows)]
    pq.write_table(pa.table({"prompt": prompts}), path)
    inputs = scan([str(path)], "prompt")
    rd = RunDir(tmp_path / "run")
    rd.create()
    cfg = compose([])
    atomic_write(rd.config, config.to_yaml(cfg))
    plan = dataclasses.replace(bare_plan(1, per_rank=1), engine_args=config.engine_args(cfg, "/fake/tiny"))
    atomic_write_json(rd.plan, plan.to_json())
    manifest = make_shards(inputs.files, 1, rows // shards)
    write_manifest(str(rd.manifest), manifest, inputs.schema)
    for s in manifest:
        table = read_shard(s, inputs.schema)
        n = table.num_rows
        out = output.shard_table(table, [RowResult(None, None, 0, 0, None)] * n, s.global_start)
        gen = pa.array([f"gen {s.global_start + i} " + "y" * 40 for i in range(n)])
        out = out.set_column(out.column_names.index("generated_text"), "generated_text", gen)
        pq.write_table(out, rd.shard_output(s.shard))
        rd.mark_done(DoneRecord(s.shard, 0, "fakehost", n, 0, 0, 0, 0.1))
    return rd, rows


def start_finalize(rd):
    return subprocess.Popen(
        [PYTHON, "-m", "hpcinfer.finalize", str(rd.path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_published(rd, rows):
    res = pq.read_table(rd.results)
    assert res.num_rows == rows
    assert res.column("generated_text").to_pylist() == [f"gen {i} " + "y" * 40 for i in range(rows)]
    assert json.loads(rd.summary.read_text())["rows"] == rows
    assert leftover_temp_files(rd.path) == []


def test_finalize_killed_mid_write_publishes_nothing_and_a_rerun_completes(tmp_path):
    rd, rows = big_run_dir(tmp_path)
    p = start_finalize(rd)
    deadline = time.time() + 60
    while not list(rd.path.glob(".results.parquet.*.tmp")):  # it is writing results.parquet
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not rd.results.exists() and not rd.summary.exists()  # absent, not partial
    assert leftover_temp_files(rd.path)  # what a kill -9 leaves ...
    assert finalize(str(rd.path))["rows"] == rows
    check_published(rd, rows)  # ... the next finalize removes


def test_a_second_finalize_waits_for_the_first(tmp_path):
    import select

    rd, rows = big_run_dir(tmp_path, rows=2000, shards=4)
    with rd.finalizing():  # a finalize of this run is writing
        p = start_finalize(rd)
        assert select.select([p.stderr], [], [], 60)[0], "the second finalize said nothing"
        assert p.stderr.readline() == f"hpcinfer: waiting for another finalize of {rd.path} (pid {os.getpid()})\n"
        time.sleep(0.5)
        assert p.poll() is None and not rd.results.exists()  # it waits ...
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err  # ... and runs once the first is through
    check_published(rd, rows)


def test_two_finalizes_at_once_both_publish_the_same_complete_results(tmp_path):
    rd, rows = big_run_dir(tmp_path)
    procs = [start_finalize(rd) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # at most one waits (whether they overlap depends on the machine; the next test makes one wait)
    assert sum("waiting for another finalize" in err for _, err in outs) <= 1
    check_published(rd, rows)


def test_finalize_on_a_full_disk_says_so_in_one_line_and_publishes_after_space_is_freed(small_fs):
    rd, shards, original = fake_run_dir(small_fs)
    filler = fill_disk(small_fs)
    p = subprocess.run([PYTHON, "-m", "hpcinfer.finalize", str(rd.path)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr  # one line, no traceback
    assert p.stderr.startswith("hpcinfer: incomplete, nothing published: no space left on device writing ")
    assert f"free space and run finalize again (hpcinfer finalize {rd.path})" in p.stderr
    assert not rd.results.exists() and not rd.summary.exists()
    assert leftover_temp_files(rd.path) == []
    filler.unlink()
    summary = finalize(str(rd.path))
    assert summary["rows"] == original.num_rows and summary["repaired"] == []
    assert pq.read_table(rd.results).select(original.column_names).equals(original)
