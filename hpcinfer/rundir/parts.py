"""Durable progress inside a shard: its parts.

While a shard is generated, finished rows are buffered and written as *parts*
(`shards/<id>.parts/<seq>.parquet`, each atomically: temp file, fsync, rename) every
`checkpoint.rows` rows or `checkpoint.seconds` seconds. A rank killed with `kill -9` loses at most
its buffer (< one part). A restarted rank reads the parts back and generates only the rows they
lack, so no row is written twice. A part that is torn or unreadable (integrity.py) is set aside
and recorded, and its rows are generated again. When every row is durable, the parts are
assembled in order into `shards/<id>.parquet`, the done marker is written, and the parts are
removed.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from typing import Callable, List, Optional, Set, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from hpcinfer.rundir.files import atomic_path
from hpcinfer.rundir.integrity import TornFile, part_positions, set_aside
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.output import OutputSpec, RowResult, assemble, output_table
from hpcinfer.rundir.paths import RunDir


class ShardCheckpoint:
    """One attempt's parts of a shard: which rows are durable, the buffer of finished rows not
    yet written, and the shard's output assembled from the parts. `before_write` runs before
    each part is written (the worker checks there that this attempt may still write the shard).
    `by` names the attempt in the record of a part it sets aside."""

    def __init__(
        self,
        rd: RunDir,
        shard: Shard,
        inputs: pa.Table,
        every_rows: int,
        every_seconds: float,
        before_write: Callable[[], None] = lambda: None,
        by: str = "a rank",
        spec: Optional[OutputSpec] = None,
    ):
        self.rd, self.shard, self.inputs, self.before_write = rd, shard, inputs, before_write
        self.spec = spec  # the run's generated columns (plan.json's output)
        self.every_rows, self.every_seconds = max(1, every_rows), every_seconds
        self.dir = rd.shard_parts(shard.shard)
        self.dir.mkdir(exist_ok=True, mode=0o700)
        self.durable: Set[int] = set()  # positions within the shard
        self.seq = 0
        for path in self.part_files():
            self.seq = max(self.seq, int(path.stem) + 1)  # a set-aside part's number is not reused
            try:
                self.durable.update(part_positions(path, shard))
            except TornFile as e:
                set_aside(rd, [path], "part", path, str(e), by, "its rows are generated again")
        self.buffer: List[Tuple[int, RowResult]] = []
        self._last_flush = time.monotonic()

    def part_files(self):
        return sorted(p for p in self.dir.glob("*.parquet") if p.stem.isdigit())

    def todo(self) -> List[int]:
        """Positions (within the shard) of the rows still to generate, in order."""
        return [p for p in range(self.shard.rows) if p not in self.durable]

    def add(self, position: int, result: RowResult) -> None:
        self.buffer.append((position, result))
        if len(self.buffer) >= self.every_rows or time.monotonic() - self._last_flush >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        """Make the buffered rows durable as one part."""
        self._last_flush = time.monotonic()
        if not self.buffer:
            return
        self.before_write()  # e.g. raises when a newer attempt of this rank owns the shard
        positions = [p for p, _ in self.buffer]
        table = output_table(self.inputs, positions, [r for _, r in self.buffer], self.shard.global_start, self.spec)
        with atomic_path(self.dir / f"{self.seq:06d}.parquet") as tmp:
            pq.write_table(table, tmp)
        self.seq += 1
        self.durable.update(positions)
        self.buffer.clear()

    def complete(self) -> pa.Table:
        """The shard's output from its parts, in order (ValueError unless exactly complete)."""
        return assemble([pq.read_table(p) for p in self.part_files()], self.shard.global_start, self.shard.rows)


def remove_parts(rd: RunDir, shard: int) -> None:
    """Drop a shard's parts (once its output and its done marker are durable)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(rd.shard_parts(shard))
