"""Finalize: verify that every shard is done, stream the shard outputs in input order into
results.parquet, prove every input row appears exactly once, and write summary.json.

Nothing is published unless the result is complete: a missing shard, a shard whose row count or
row positions disagree with the manifest, raises RunIncomplete and leaves no results.parquet; a
shard whose data cannot be read (torn inside, though its footer is whole) raises TornShard.
Memory stays bounded by one record batch (shards are streamed, never loaded whole). A placed run
(prefix placement: shards hold slots, rundir/manifest.py) is checked the same way, slot by slot,
and its rows go back to input order through rundir/permute.py (one bucket of rows in memory, about
128 MiB, plus the slot -> row map, memory-mapped); each input row must come exactly once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcinfer import __version__
from hpcinfer.config import RunConfig, load_run_config
from hpcinfer.errors import RunIncomplete
from hpcinfer.rundir.files import atomic_path
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.output import ROW_COLUMN, OutputSpec, explode, token_sum
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import Plan, RankRecord

BATCH_ROWS = 64 * 1024


class TornShard(RunIncomplete):
    """A done shard's output could not be read while merging (the merge publishes nothing)."""

    def __init__(self, shard: Shard, why: str):
        super().__init__(f"shard {shard.shard} output is unreadable: {why}")
        self.shard, self.why = shard, why


def read_batches(path, shard: Shard):
    """A shard output's record batches, with (row count, batches); TornShard when it cannot be read."""
    try:
        pf = pq.ParquetFile(path)
        rows = pf.metadata.num_rows
    except (OSError, pa.ArrowException, ValueError) as e:
        raise TornShard(shard, " ".join(str(e).split())) from None

    def batches():
        try:
            yield from pf.iter_batches(batch_size=BATCH_ROWS)
        except (OSError, pa.ArrowException, ValueError) as e:
            raise TornShard(shard, " ".join(str(e).split())) from None

    return rows, batches()


def describe_missing(missing: List[Shard], total: int) -> str:
    listed = ", ".join(
        f"{s.shard} (rank {s.rank}, rows {s.global_start}-{s.global_start + s.rows - 1})" for s in missing[:20]
    )
    more = f", and {len(missing) - 20} more" if len(missing) > 20 else ""
    return f"{len(missing)} of {total} shard(s) missing: {listed}{more}"


def merge_shards(
    rd: RunDir,
    shards: List[Shard],
    schema,
    spec: Optional[OutputSpec] = None,
    placement: Optional[np.ndarray] = None,
) -> Dict[str, int]:
    """Stream shards in global order into results.parquet, checking each row's position; with
    `spec.explode`, each row's samples become rows (`rows` counts the input rows); with
    `placement` (slot -> input row) the rows are written in input order."""
    explode_samples = spec is not None and spec.explode
    if placement is not None:
        return _merge_placed(rd, shards, schema, placement, explode_samples)
    totals = dict(rows=0, rows_failed=0, prompt_tokens=0, output_tokens=0)
    pending: List = []  # batches of small shards, written together: one row group per ~BATCH_ROWS rows

    def write(writer, force: bool = False) -> None:
        if pending and (force or sum(b.num_rows for b in pending) >= BATCH_ROWS):
            writer.write_table(pa.Table.from_batches(pending, schema=schema))
            pending.clear()

    with atomic_path(rd.results) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for rows, _ in _checked_batches(rd, shards, totals):
                if explode_samples:  # one row per sample
                    pending.extend(explode(rows).cast(schema).to_batches())
                else:
                    pending.append(rows.cast(schema))
                write(writer)
            write(writer, force=True)
    return totals


def _checked_batches(rd: RunDir, shards: List[Shard], totals: Dict[str, int]):
    """Each shard's output batches in slot order, with their slots, checked as merge_shards checks
    them, counting `totals`."""
    for s in shards:
        if s.global_start != totals["rows"]:
            raise RunIncomplete(
                f"manifest gap or overlap at shard {s.shard}: it starts at row {s.global_start}, expected {totals['rows']}"
            )
        num_rows, batches = read_batches(rd.shard_output(s.shard), s)
        if num_rows != s.rows:
            raise RunIncomplete(f"shard {s.shard} output has {num_rows} rows, the manifest says {s.rows}")
        for batch in batches:
            pos = batch.column(ROW_COLUMN).to_numpy(zero_copy_only=False)
            want = np.arange(totals["rows"], totals["rows"] + len(pos))
            if not np.array_equal(pos, want):
                raise RunIncomplete(
                    f"shard {s.shard} holds rows out of order, duplicated or foreign (expected {want[0]}..{want[-1]})"
                )
            totals["rows"] += len(pos)
            totals["rows_failed"] += len(pos) - batch.column("error").null_count
            totals["prompt_tokens"] += int(pc.sum(batch.column("prompt_tokens")).as_py() or 0)
            totals["output_tokens"] += token_sum(batch.column("output_tokens"))
            yield batch.drop_columns([ROW_COLUMN]), pos


def _merge_placed(
    rd: RunDir, shards: List[Shard], schema, placement: np.ndarray, explode_samples: bool = False
) -> Dict[str, int]:
    """A placed run's merge: the rows back in input order (rundir/permute.py), then, with
    `explode_samples`, one row per sample (after the reorder: the placement maps rows, not samples)."""
    from hpcinfer.rundir.permute import OrderError, write_reordered

    totals = dict(rows=0, rows_failed=0, prompt_tokens=0, output_tokens=0)
    n = len(placement)
    batches = (
        (b if explode_samples else b.cast(schema), np.asarray(placement[pos]))
        for b, pos in _checked_batches(rd, shards, totals)
    )
    with atomic_path(rd.results) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            write = (lambda t: writer.write_table(explode(t).cast(schema))) if explode_samples else writer.write_table
            try:
                write_reordered(batches, n, write, str(rd.path), out_rows=BATCH_ROWS)
            except OrderError as e:
                raise RunIncomplete(f"the shards do not hold every input row exactly once: {e}") from None
    return totals


def rank_generation_seconds(record: Optional[RankRecord], shard_seconds: float) -> float:
    """A rank's generation time: from its engine's start of generation to its last shard's end
    (shards overlap in the engine, so their own times add up to more); the shards' sum when the
    rank recorded no window (a run from before these fields). Pure."""
    start = record.generation_started_at if record else None
    end = record.generation_ended_at if record else None
    return max(0.0, end - start) if start and end else shard_seconds


def build_summary(
    rd: RunDir, shards: List[Shard], totals: Dict[str, int], plan: Plan, cfg: Optional[RunConfig] = None
) -> Dict:
    """summary.json: the run's totals, layout, model, sampling and engine_args, and per rank its
    share of the rows and tokens (from the done markers) and its times (from its record). `plan`:
    plan.json, as the caller read it. `cfg`: the run's config where the caller has it (the local
    launcher: submit refuses a config that differs from config.yaml in what the summary takes),
    else read from config.yaml (~0.15 s)."""
    cfg = cfg or load_run_config(rd.config)
    ranks = rd.read_ranks()
    per_rank: Dict[int, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in shards:
        done = rd.read_done(s.shard)
        who = done.rank  # the rank that generated it (dynamic: whoever claimed it)
        for key in ("rows", "rows_failed", "prompt_tokens", "output_tokens", "generation_seconds"):
            per_rank[who][key] += getattr(done, key)
        per_rank[who]["host"] = done.host
    starts = [r.generation_started_at for r in ranks.values() if r.generation_started_at]
    ends = [r.generation_ended_at for r in ranks.values() if r.generation_ended_at]
    gen_seconds = max(ends) - min(starts) if starts and ends else 0.0
    now = time.time()
    rank_list = []
    for r in sorted(set(per_rank) | set(ranks)):  # a rank that started counts, even with no rows
        info = ranks.get(r)
        started = info.started_at if info and info.started_at is not None else now
        rank_list.append(
            dict(
                rank=r,
                host=info.host if info and info.host is not None else per_rank[r]["host"],
                device_kind=info.device_kind if info else None,
                devices=info.devices if info else None,
                rows=int(per_rank[r]["rows"]),
                rows_failed=int(per_rank[r]["rows_failed"]),
                prompt_tokens=int(per_rank[r]["prompt_tokens"]),
                output_tokens=int(per_rank[r]["output_tokens"]),
                seconds=round(((info.finished_at if info else None) or now) - started, 3),
                engine_seconds=round(info.engine_seconds if info else 0.0, 3),
                startup=dict(info.startup) if info else {},
                generation_seconds=round(rank_generation_seconds(info, per_rank[r]["generation_seconds"]), 3),
                attempts=info.attempts if info else 1,
                rows_generated=info.rows_generated if info else 0,
                cached_tokens=info.cached_tokens if info else 0,  # prompt tokens from the prefix cache
            )
        )
    submitted = plan.submitted_at if plan.submitted_at is not None else now
    return dict(
        run_dir=str(rd.path),
        repaired=[r.to_json() for r in rd.read_repairs()],  # files found torn or unreadable, set aside
        results=str(rd.results),
        hpcinfer_version=__version__,
        rows=totals["rows"],
        rows_failed=totals["rows_failed"],
        rows_recomputed=max(0, sum(r.rows_generated for r in ranks.values()) - totals["rows"]),
        prompt_tokens=totals["prompt_tokens"],
        output_tokens=totals["output_tokens"],
        cached_tokens=sum(r.cached_tokens for r in ranks.values()),
        prefix=plan.prefix,
        wall_seconds=round(now - submitted, 3),
        generation_seconds=round(gen_seconds, 3),
        output_tokens_per_second=round(totals["output_tokens"] / gen_seconds, 2) if gen_seconds > 0 else None,
        layout=dict(tp=plan.tp, pp=plan.pp, dp=plan.dp, ep=plan.ep, ranks=plan.ranks),
        model=cfg.model.name,
        sampling=asdict(cfg.sampling),
        engine_args=plan.engine_args,
        shards=len(shards),
        ranks=rank_list,
        finished_at=now,
    )
