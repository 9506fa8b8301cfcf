"""Benchmark: finalize merging 10M result rows from 1,000 shards.

    .venv/bin/python bench/finalize.py                         # 10,000,000 rows, 1,000 shards
    .venv/bin/python bench/finalize.py --rows 1000000 --shards 100   # scaled down
    options: --files N (input files, default 100)  --ranks N (default 100)
             --tmp DIR (where the run directory goes)  --keep (leave it there)
             --placed (a run with prefix placement: shards hold slots of a random permutation of
             the rows, inputs/placement.npy; finalize writes them back in input order)

What it measures: `hpcinfer.finalize.finalize(run_dir)` (completeness check, streaming ordered merge
with row-position verification, summary.json) run in a child process on a finished run
directory, so that the peak RSS reported is finalize's own (os.wait4 of that child). Reported:
rows, shards, seconds (inside the child, imports excluded; the child's wall time too), rows/s,
peak RSS, and the RSS of a bare `python -c 'import hpcinfer.rundir.merge'` for comparison.

Target: peak RSS < 1 GiB (memory must stay bounded by a record batch, whatever the row count).

The run directory is built with the project's own contract, as submit and the ranks would leave
it: config.yaml (config.to_yaml(cli.compose(...))), plan.json, manifest.parquet
(make_shards + write_manifest), shards/<id>.parquet (output.shard_table, written with
pq.write_table as the worker does), done/<id>.json (RunDir.mark_done) and ranks/<r>.json
(RunDir.write_rank). Input columns: id int64 and prompt (~60 chars); generated_text ~200 chars,
every 50th row a failed one. The input files themselves are listed in the manifest but not
written: finalize never reads them. To keep generation cheap, one shard table is made per
distinct shard size and written for every shard of that size with its id and ROW_COLUMN (the
global position, which finalize verifies) replaced. Deterministic (seeded by the shard size).
The shard files are freshly written, so they are read from the page cache (a warm-cache number).
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import (
    GIB,
    MIB,
    check_ok,
    free_bytes,
    machine_lines,
    parse_args,
    print_table,
    run_measured,
    verdict,
    words,
    work_dir,
)

from hpcinfer import config
from hpcinfer.cli import compose
from hpcinfer.planning.inputs import InputFile
from hpcinfer.planning.sharding import make_shards, partition
from hpcinfer.rank.engine import RowResult
from hpcinfer.rundir import output
from hpcinfer.rundir.files import atomic_write, atomic_write_json
from hpcinfer.rundir.manifest import Shard, write_manifest
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DoneRecord, Memory, Plan, RankRecord

TARGET_RSS = 1 * GIB
BYTES_PER_ROW = 320  # ~8 id + 60 prompt + 200 text + finish_reason, tokens, error, position
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from hpcinfer.finalize import finalize
t1 = time.perf_counter()
summary = finalize(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, finalize_s=t2 - t1, rows=summary["rows"], shards=summary["shards"],
                      rows_failed=summary["rows_failed"])))
"""


def fit_rows(rows: int, tmp_free: int) -> int:
    """Rows that fit on the disk: shards and results.parquet both hold every row once (at most
    BYTES_PER_ROW each, before compression), plus 10% and 1 GiB of room."""
    need = int(rows * BYTES_PER_ROW * 2 * 1.1) + GIB
    if need <= tmp_free:
        return rows
    fit = max(0, int((tmp_free - GIB) / (BYTES_PER_ROW * 2 * 1.1)))
    print(
        f"note: {rows:,} rows need ~{need / GIB:.1f} GiB, only {tmp_free / GIB:.1f} GiB free: "
        f"scaled down to {fit:,} rows"
    )
    return fit


def template(n: int):
    """One shard's output table of `n` rows starting at global row 0, and its done-marker totals."""
    rng = np.random.default_rng(n)
    inputs = pa.table({"id": pa.array(np.arange(n), pa.int64()), "prompt": pa.array(words(rng, n, 60), pa.string())})
    texts = words(rng, n, 200)
    out_tokens = rng.integers(20, 60, n)
    results = [
        RowResult(None, None, 0, 0, "boom: made-up failure")
        if i % 50 == 49
        else RowResult(texts[i], "length" if i % 3 else "stop", 15 + i % 7, int(out_tokens[i]), None)
        for i in range(n)
    ]
    table = output.shard_table(inputs, results, 0)
    totals = dict(
        rows_failed=sum(r.error is not None for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        output_tokens=sum(r.output_tokens for r in results),
    )
    return table, totals


def at_position(table: pa.Table, global_start: int, order=None) -> pa.Table:
    """The template with id and ROW_COLUMN set to the shard's global positions (with `order`,
    a placed run's slot -> input row map: id is the input row at each slot)."""
    pos = pa.array(np.arange(global_start, global_start + table.num_rows), pa.int64())
    ids = pos if order is None else pa.array(order[global_start : global_start + table.num_rows], pa.int64())
    table = table.set_column(0, table.schema.field(0), ids)
    last = table.num_columns - 1
    return table.set_column(last, table.schema.field(last), pos)


def build_run_dir(root, rows: int, shards_wanted: int, n_files: int, ranks: int, placed: bool = False):
    """A finished run directory (see the module docstring); returns (RunDir, shards)."""
    per_file = partition(rows, n_files)
    files = [InputFile(str(root / "inputs" / f"part-{i:05d}.parquet"), hi - lo) for i, (lo, hi) in enumerate(per_file)]
    shard_rows = max(1, math.ceil(rows / shards_wanted))
    shards = make_shards(files, ranks, shard_rows)
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string())])

    rd = RunDir(root / "run")
    rd.create()
    cfg = compose(
        [f"dp={ranks}", f"data.input={root / 'inputs'}", "data.id_column=id", f"data.shard_rows={shard_rows}"]
    )
    atomic_write(rd.config, config.to_yaml(cfg))
    now = time.time()
    atomic_write_json(
        rd.plan,
        Plan(
            tp=1,
            pp=1,
            dp=ranks,
            ep=False,
            ranks=ranks,
            device_kind="cpu",
            gpus_per_rank=0,
            nodes=1,
            rows=rows,
            files=n_files,
            shards=len(shards),
            memory=Memory(None, None, None, None, None),
            engine_args=config.engine_args(cfg, str(root / "model")),
            model={},
            submitted_at=now - 3600,
        ).to_json(),
    )
    order = None
    if placed:  # a random permutation: the worst case for locality
        order = np.random.default_rng(0).permutation(rows).astype(np.int64)
        (rd.path / "inputs").mkdir(exist_ok=True)
        np.save(rd.path / "inputs" / "placement.npy", order)
    write_manifest(str(rd.manifest), shards, schema, "inputs/placement.npy" if placed else None)

    templates: Dict[int, tuple] = {}
    for s in shards:
        if s.rows not in templates:
            templates[s.rows] = template(s.rows)

    def write(s: Shard) -> None:
        table, totals = templates[s.rows]
        pq.write_table(at_position(table, s.global_start, order), rd.shard_output(s.shard))
        rd.mark_done(
            DoneRecord(
                shard=s.shard,
                rank=s.rank,
                host=socket.gethostname(),
                rows=s.rows,
                generation_seconds=1.0,
                rows_resumed=0,
                finished_at=now,
                **totals,
            ),
        )

    with ThreadPoolExecutor(max_workers=2) as pool:  # pyarrow releases the GIL while writing
        list(pool.map(write, shards))
    for r in range(ranks):
        rd.write_rank(
            RankRecord(
                rank=r,
                host=socket.gethostname(),
                state="done",
                device_kind="cpu",
                devices=[],
                attempts=1,
                rows_generated=rows // ranks,
                started_at=now - 3500,
                engine_seconds=10.0,
                generation_started_at=now - 3400,
                generation_ended_at=now - 100,
                finished_at=now - 90,
            ),
        )
    return rd, shards, len(templates)


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    placed = "--placed" in argv
    args, argv = parse_args(
        __doc__, [a for a in argv if a != "--placed"], rows=10_000_000, shards=1_000, files=100, ranks=100
    )
    argv = argv + (["--placed"] if placed else [])

    with work_dir("hpcinfer-bench-finalize-", args.tmp, args.keep) as root:
        rows = fit_rows(args.rows, free_bytes(root) // (2 if placed else 1))  # placed: the reorder spills once
        if rows < 1:
            sys.exit("not enough free disk space for any rows")
        t0 = time.perf_counter()
        rd, shards, n_templates = build_run_dir(root, rows, args.shards, args.files, args.ranks, placed)
        setup_s = time.perf_counter() - t0
        shard_bytes = sum(rd.shard_output(s.shard).stat().st_size for s in shards)
        print(
            f"setup: {len(shards):,} shards ({n_templates} distinct sizes), {rows:,} rows, "
            f"{shard_bytes / MIB:,.0f} MiB of shard files, in {setup_s:.1f} s"
        )

        py = sys.executable
        base = run_measured([py, "-c", "import hpcinfer.rundir.merge"])
        check_ok(base, "import hpcinfer.rundir.merge")
        fin = run_measured([py, "-c", CHILD, str(rd.path)])
        check_ok(fin, "finalize")
        res = json.loads(fin.stdout.strip().splitlines()[-1])
        meta = pq.ParquetFile(rd.results).metadata
        if res["rows"] != rows or meta.num_rows != rows:
            sys.exit(f"finalize merged {res['rows']} rows, results.parquet has {meta.num_rows}; expected {rows}")
        seen = 0
        for batch in pq.ParquetFile(rd.results).iter_batches(columns=["id"], batch_size=1 << 20):
            if not np.array_equal(batch.column(0).to_numpy(), np.arange(seen, seen + batch.num_rows)):
                sys.exit(f"results.parquet is not in input order near row {seen}")
            seen += batch.num_rows

        print_table(
            "finalize benchmark",
            machine_lines()
            + [
                ("command", f"python bench/finalize.py {' '.join(argv)}".rstrip()),
                (
                    "rows",
                    f"{rows:,} ({res['rows_failed']:,} failed rows)"
                    + (", placed (random permutation)" if placed else ""),
                ),
                ("shards", f"{len(shards):,} ({args.ranks} ranks, {args.files} input files)"),
                ("shard files", f"{shard_bytes / MIB:,.0f} MiB"),
                ("results.parquet", f"{rd.results.stat().st_size / MIB:,.0f} MiB, {meta.num_row_groups:,} row groups"),
                (
                    "finalize seconds",
                    f"{res['finalize_s']:.2f} (child wall {fin.seconds:.2f}, imports {res['import_s']:.2f})",
                ),
                ("rows/s", f"{rows / res['finalize_s']:,.0f}"),
                ("peak RSS finalize", f"{fin.max_rss_bytes / MIB:,.0f} MiB"),
                ("peak RSS `import hpcinfer.rundir.merge`", f"{base.max_rss_bytes / MIB:,.0f} MiB"),
                ("verdict", verdict(fin.max_rss_bytes / MIB, TARGET_RSS / MIB, "MiB")),
            ],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
