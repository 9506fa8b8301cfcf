"""Writing rows in another order, streaming, within a memory bound: the placed copy of the input
(planning, prefix placement) and results.parquet of a placed run (finalize: slots back to input
order) both take rows that arrive in one order and write them in another.

Two passes over buckets of the destination order (`write_reordered`): rows are spilled, as they
arrive, into one Arrow IPC file per bucket of `bucket_rows` consecutive destinations (buffered up
to `budget / 4` bytes in all), then each bucket is read back, checked to hold each of its
destinations exactly once, sorted, and written. Memory: one bucket (about `budget` bytes, sized
from the rows' average size) and the buffers; disk: one more copy of the rows, removed after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterable, List, Tuple

import numpy as np
import pyarrow as pa

DEST = "__hpcinfer_dest"
BUDGET = 128 << 20


class OrderError(ValueError):
    """The rows given do not cover the destinations exactly once."""


def write_reordered(
    batches: Iterable[Tuple[pa.RecordBatch, np.ndarray]],
    n_rows: int,
    write: Callable[[pa.Table], None],
    spill_dir: str,
    budget: int = BUDGET,
    out_rows: int = 64 * 1024,
) -> None:
    """Write `n_rows` rows in destination order through `write` (tables of up to `out_rows`
    rows). `batches` yields (rows, their destinations in 0..n_rows-1). OrderError, with nothing
    more written, unless every destination comes exactly once."""
    os.makedirs(spill_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".reorder-", dir=spill_dir)
    try:
        _write(iter(batches), n_rows, write, tmp, budget, out_rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(batches, n_rows, write, tmp, budget, out_rows) -> None:
    schema = None
    bucket_rows = None
    buffers: Dict[int, List[pa.RecordBatch]] = {}
    buffered = 0
    writers: Dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    sinks: Dict[int, object] = {}

    def flush(b: int) -> None:
        nonlocal buffered
        if b not in writers:
            sinks[b] = pa.OSFile(os.path.join(tmp, f"{b}.arrow"), "wb")
            writers[b] = pa.ipc.new_stream(sinks[b], schema)
        for batch in buffers.pop(b, []):
            writers[b].write_batch(batch)
            buffered -= batch.nbytes

    seen = 0
    for batch, dest in batches:
        if batch.num_rows == 0:
            continue
        dest = np.asarray(dest, dtype=np.int64)
        if len(dest) != batch.num_rows:
            raise OrderError(f"{len(dest)} destinations for {batch.num_rows} rows")
        if dest.min() < 0 or dest.max() >= n_rows:
            raise OrderError(f"a destination outside 0..{n_rows - 1}")
        batch = batch.append_column(DEST, pa.array(dest, pa.int64()))
        if schema is None:
            schema = batch.schema
            per_row = max(1, batch.nbytes // batch.num_rows)
            bucket_rows = max(1024, budget // per_row)
        seen += batch.num_rows
        bucket = dest // bucket_rows
        order = np.argsort(bucket, kind="stable")
        sorted_b = bucket[order]
        batch = batch.take(pa.array(order))
        bounds = np.flatnonzero(np.diff(sorted_b)) + 1
        for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(sorted_b)]))):
            part = batch.slice(int(lo), int(hi - lo))
            buffers.setdefault(int(sorted_b[lo]), []).append(part)
            buffered += part.nbytes
        while buffered > budget // 4 and buffers:
            flush(max(buffers, key=lambda b: sum(p.nbytes for p in buffers[b])))
    if seen != n_rows:
        raise OrderError(f"{seen} rows for {n_rows} destinations")
    if schema is None:
        return
    for w in writers.values():
        w.close()
    for s in sinks.values():
        s.close()
    for b in range(-(-n_rows // bucket_rows)):
        parts: List[pa.RecordBatch] = []
        path = os.path.join(tmp, f"{b}.arrow")
        if os.path.exists(path):
            with pa.memory_map(path) as src:
                parts += list(pa.ipc.open_stream(src).read_all().to_batches())
        parts += buffers.pop(b, [])
        table = pa.Table.from_batches(parts, schema=schema)
        lo, hi = b * bucket_rows, min(n_rows, (b + 1) * bucket_rows)
        dest = table.column(DEST).to_numpy()
        order = np.argsort(dest, kind="stable")
        if len(dest) != hi - lo or not np.array_equal(dest[order], np.arange(lo, hi)):
            raise OrderError(f"destinations {lo}..{hi - 1} are not each covered exactly once")
        table = table.drop_columns([DEST])
        for start in range(0, table.num_rows, out_rows):  # sorted a slice at a time: one copy of a slice
            write(table.take(pa.array(order[start : start + out_rows])))
        del table, parts
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
