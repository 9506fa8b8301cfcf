"""The shard manifest (manifest.parquet) and reading a shard's input rows.

A `Shard` is a contiguous range of one input file's rows, with its place in the global row order
(the input files in sorted path order, each in its own row order). With prefix placement
(planning/prefix.py) the "input file" of every shard is the run's placed copy of the input
(`inputs/placed.parquet`: the rows in placement order), and a shard's `global_start` counts in
that order (its *slots*); the slot -> input row map is a NumPy file (`inputs/placement.npy`, int64,
one entry per row: 80 MB at 10M rows, memory-mapped where it is read), named in the manifest's
metadata (`placement_path`). Without placement slots are input rows. planning/sharding.py cuts the
input into shards; submit writes them here (`write_manifest`, with the input schema in the file's
metadata); the ranks read them back (`read_manifest`) and read a shard's rows (`read_shard`).
"""

from __future__ import annotations

import base64
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hpcinfer.errors import DataError

SCHEMA_KEY = b"hpcinfer.input_schema"
PLACEMENT_KEY = b"hpcinfer.placement"  # the slot -> input row map, relative to the manifest's folder


@dataclass(frozen=True)
class Shard:
    """A contiguous range of one input file's rows: owned by one rank (static), or claimed by
    whichever rank has room (dynamic; `rank` is then the expected one)."""

    shard: int
    rank: int
    path: str
    file_start: int
    file_end: int
    global_start: int
    tokens: int = 0  # estimated prompt + output tokens of its rows (the dynamic schedule's size)
    group: int = -1  # prefix placement: its chain (consecutive shards of rows sharing a prompt start), else -1

    @property
    def rows(self) -> int:
        return self.file_end - self.file_start


# ---- the manifest ----------------------------------------------------------------------
def write_manifest(path: str, shards: Sequence[Shard], schema: pa.Schema, placement: Optional[str] = None) -> None:
    """`placement`: the slot -> input row map's path relative to the manifest's folder (placed runs)."""
    from hpcinfer.rundir.files import atomic_path

    table = pa.Table.from_pylist([asdict(s) for s in shards], schema=_MANIFEST_SCHEMA)
    meta = {SCHEMA_KEY: base64.b64encode(schema.serialize().to_pybytes())}
    if placement is not None:
        meta[PLACEMENT_KEY] = placement.encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: str) -> Tuple[List[Shard], pa.Schema]:
    """The shards, in global order, and the input schema every shard is cast to."""
    table = pq.read_table(path)
    raw = base64.b64decode(table.schema.metadata[SCHEMA_KEY])
    schema = pa.ipc.read_schema(pa.py_buffer(raw))
    return [Shard(**row) for row in table.to_pylist()], schema


def placement_path(path: str) -> Optional[str]:
    """The slot -> input row map of a placed run (absolute), None when slots are input rows."""
    meta = pq.read_schema(path).metadata or {}
    rel = meta.get(PLACEMENT_KEY)
    return None if rel is None else os.path.join(os.path.dirname(os.path.abspath(path)), rel.decode())


def load_placement(path: str) -> Optional[np.ndarray]:
    """The slot -> input row map of the run whose manifest is `path` (memory-mapped), or None."""
    where = placement_path(path)
    return None if where is None else np.load(where, mmap_mode="r")


_MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("rank", pa.int64()),
        ("path", pa.string()),
        ("file_start", pa.int64()),
        ("file_end", pa.int64()),
        ("global_start", pa.int64()),
        ("tokens", pa.int64()),
        ("group", pa.int64()),
    ]
)


# ---- reading a shard -------------------------------------------------------------------
def read_shard(shard: Shard, schema: pa.Schema) -> pa.Table:
    """The shard's input rows, cast to the run's input schema. Reads only the row groups that
    overlap the shard."""
    pf = pq.ParquetFile(shard.path)
    groups, first, offset = [], None, 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset < shard.file_end and offset + n > shard.file_start:
            groups.append(i)
            first = offset if first is None else first
        offset += n
    if offset < shard.file_end:
        raise DataError(
            f"{shard.path!r} has {offset} rows now, fewer than the {shard.file_end} it had when the run was planned"
        )
    table = pf.read_row_groups(groups).slice(shard.file_start - (first or 0), shard.rows)
    table = table.replace_schema_metadata(None)
    return table if table.schema.equals(schema) else table.select(schema.names).cast(schema)
