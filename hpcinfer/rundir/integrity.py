"""Trusting what is on disk: a file of the run directory counts only when it is provably complete.

Every write of a run is atomic (files.py), but a file can still be torn or lost after it was
written: a node lost mid-copy, a bad sync between filesystems, a filesystem repaired after a
crash. So whoever reads the run's progress checks it first:

    a done shard     its done marker is readable and names this shard, and shards/<id>.parquet
                     has a readable Parquet footer, exactly the shard's rows, and row positions
                     global_start .. global_start+rows-1 (the footer's statistics: no data read)
    a part           readable, and every row position inside its shard (parts.py reads them)
    a rank record    readable (ranks/<r>.json; its counters start again when it is not)
    a claim          readable (claims.py takes an unreadable one over as a dead claim)

What fails is *set aside*: moved (a rename, never a copy: no space needed) to
`discarded/<time>-<pid>.<path>`, with a `Repair` record in `repairs/` written before the move, so
nothing disappears silently and the evidence stays for the user to inspect and delete. Moving
rather than deleting keeps rows a user may want to look at; the run never reads `discarded/`.
Only the rows of what was set aside are generated again. A claim is the exception: it is left in
place (claim generations are write-once) and taken over.

The checks run where progress is trusted: when a rank starts (rank/work.py), in submit before it
decides which ranks to start, and in finalize (which then refuses to publish and says that
`resume` regenerates the rows). Checking again and setting aside happen under the run's repair
lock, so two processes never both set aside one shard, nor one a shard another has just redone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcinfer.errors import one_line
from hpcinfer.rundir.files import atomic_write_json, read_json
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.output import ROW_COLUMN
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DoneRecord, RankRecord, Repair

READ_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, pa.ArrowException)


class TornFile(Exception):
    """A run-directory file that cannot be trusted; the message says why."""


# ---- checks (read only) -------------------------------------------------------------------------
def output_problem(path: Path, shard: Shard) -> Optional[str]:
    """Why the shard output at `path` is not provably `shard`'s rows, or None when it is: its
    footer is readable, it has exactly the shard's rows, and its row positions span exactly the
    shard's range (read from the footer's statistics; from the column when there are none)."""
    try:
        md = pq.read_metadata(path)
    except FileNotFoundError:
        return "missing"
    except READ_ERRORS as e:
        return f"unreadable: {one_line(str(e))}"
    if md.num_rows != shard.rows:
        return f"{md.num_rows} rows, its shard has {shard.rows}"
    if shard.rows == 0:
        return None
    lo, hi = _position_range(path, md)
    want = (shard.global_start, shard.global_start + shard.rows - 1)
    if (lo, hi) != want:
        return f"row positions {lo}..{hi}, its shard has {want[0]}..{want[1]}"
    return None


def _position_range(path: Path, md) -> tuple:
    lows, highs = [], []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        col = next((rg.column(c) for c in range(rg.num_columns) if rg.column(c).path_in_schema == ROW_COLUMN), None)
        if col is None:
            return None, None
        st = col.statistics
        if st is None or not st.has_min_max:
            try:  # no statistics: read the one column
                pos = pq.read_table(path, columns=[ROW_COLUMN]).column(ROW_COLUMN)
            except READ_ERRORS:
                return None, None
            return pc.min(pos).as_py(), pc.max(pos).as_py()
        lows.append(st.min)
        highs.append(st.max)
    return (min(lows), max(highs)) if lows else (None, None)


def done_problem(rd: RunDir, shard: Shard) -> Optional[tuple]:
    """(the file at fault, why) when done shard `shard` is not provably complete, or None."""
    marker = rd.done_marker(shard.shard)
    try:
        done = DoneRecord.from_json(read_json(marker))
    except FileNotFoundError:
        return None  # not done (or set aside by someone else meanwhile)
    except READ_ERRORS as e:
        return marker, f"unreadable: {one_line(str(e))}"
    if done.shard != shard.shard or done.rows != shard.rows:
        return marker, f"names shard {done.shard} with {done.rows} rows, not shard {shard.shard} with {shard.rows}"
    why = output_problem(rd.shard_output(shard.shard), shard)
    return None if why is None else (rd.shard_output(shard.shard), why)


def part_positions(path: Path, shard: Shard) -> List[int]:
    """The shard positions (0-based, within the shard) a part holds; TornFile when it is
    unreadable or holds rows outside its shard."""
    try:
        rows = pq.read_table(path, columns=[ROW_COLUMN]).column(ROW_COLUMN).to_pylist()
    except READ_ERRORS as e:
        raise TornFile(f"unreadable: {one_line(str(e))}") from None
    bad = [r for r in rows if r is None or not shard.global_start <= r < shard.global_start + shard.rows]
    if bad:
        raise TornFile(
            f"holds row {bad[0]}, outside its shard's {shard.global_start}..{shard.global_start + shard.rows - 1}"
        )
    return [r - shard.global_start for r in rows]


# ---- setting aside ------------------------------------------------------------------------------
def relative(rd: RunDir, path: Path) -> str:
    try:
        return str(Path(path).relative_to(rd.path))
    except ValueError:
        return str(path)


def record(rd: RunDir, repair: Repair, name: Optional[str] = None) -> Path:
    """Write `repair` to repairs/ (under `name`, or a new unique name); its path."""
    rd.repairs_dir.mkdir(exist_ok=True, mode=0o700)
    path = rd.repairs_dir / (name or f"{time.time_ns()}-{os.getpid()}.{repair.path.replace('/', '_')}.json")
    atomic_write_json(path, repair.to_json())
    return path


def set_aside(
    rd: RunDir, files: Sequence[Path], what: str, path: Path, why: str, by: str, then: str
) -> Optional[Repair]:
    """Move `files` (those that exist, in order) to discarded/, recording first that `what` at
    `path` was set aside, why and what happens `then`; None when the first of `files` is already
    gone (another process set it aside first) and nothing was done."""
    if not os.path.lexists(files[0]):
        return None
    rd.discarded_dir.mkdir(exist_ok=True, mode=0o700)
    stamp = f"{time.time_ns()}-{os.getpid()}"
    moves = [
        (p, rd.discarded_dir / f"{stamp}.{relative(rd, p).replace('/', '_')}") for p in files if os.path.lexists(p)
    ]
    repair = Repair(
        what=what,
        path=relative(rd, path),
        why=why,
        action=f"moved to {', '.join(relative(rd, d) for _, d in moves)}; {then}",
        by=by,
        at=time.time(),
    )
    note = record(rd, repair)  # first: nothing is set aside without its record
    for i, (src, dst) in enumerate(moves):
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            if i == 0:
                note.unlink()
                return None
    return repair


@dataclass
class Verified:
    done: Set[int]  # done shards whose outputs are provably complete
    repairs: List[Repair] = field(default_factory=list)  # what this check set aside


def verify_done(rd: RunDir, shards: Sequence[Shard], by: str) -> Verified:
    """The done shards among `shards` that are provably complete; for each one that is not, its
    done marker (first: the shard is then not done) and its output are set aside and recorded, so
    that its rows are generated again."""
    markers = rd.done_shards()
    out = Verified(set())
    for s in shards:
        if s.shard not in markers:
            continue
        if done_problem(rd, s) is None:
            out.done.add(s.shard)
            continue
        with rd.repairing():  # check again: another process may have set it aside, or redone it
            problem = done_problem(rd, s)
            if problem is None:
                if rd.is_done(s.shard):
                    out.done.add(s.shard)
                continue
            repair = set_aside_shard(rd, s, *problem, by)
            if repair is not None:
                out.repairs.append(repair)
    return out


def set_aside_shard(rd: RunDir, shard: Shard, bad: Path, why: str, by: str) -> Optional[Repair]:
    """Set a done shard aside because `bad` (its marker or its output) is `why`: its done marker
    first (the shard is then not done), then its output. Call under rd.repairing()."""
    marker = rd.done_marker(shard.shard)
    return set_aside(
        rd,
        [marker, rd.shard_output(shard.shard)],
        "done marker" if bad == marker else "shard output",
        bad,
        why,
        by,
        f"shard {shard.shard} is not done: its {shard.rows} row(s) are generated again",
    )


def read_rank_checked(rd: RunDir, rank: int, by: str) -> Optional[RankRecord]:
    """The rank's record; an unreadable one is set aside (its counters start again) and None."""
    path = rd.rank_file(rank)
    try:
        return RankRecord.from_json(read_json(path))
    except FileNotFoundError:
        return None
    except READ_ERRORS as e:
        set_aside(
            rd,
            [path],
            "rank record",
            path,
            f"unreadable: {one_line(str(e))}",
            by,
            "the rank's attempts and rows_generated counters start again (its done shards keep their rows)",
        )
        return None


def describe(repair: Repair) -> str:
    """One line for a repair (status, logs)."""
    return f"{repair.what} {repair.path}: {repair.why}; {repair.action} (found by {repair.by})"


def say_repairs(repairs: Sequence[Repair], say: Callable[[str], None]) -> None:
    for r in repairs:
        say(f"repaired: {describe(r)}")
