"""The run directory: the contract between submit, the ranks, finalize, status and resume.

Every step reads and writes only here, under fixed names, so any of them can be rerun or
inspected on its own (as datatrove's executors coordinate through one logging folder). `RunDir`
names every path and reads and writes the JSON records as the typed records of records.py:

    <run_dir>/
      config.yaml                 the resolved config of the run
      plan.json                   Plan: layout, devices per rank, engine_args, memory estimate
      manifest.parquet            one row per shard (rank, file, row range, global start, est. tokens)
      inputs/<n>.parquet          JSON Lines, CSV, OpenAI Batch input converted to Parquet (+ sources.json)
      results.jsonl               OpenAI Batch input: the output file, one line per input line (finalize)
      shards/<id>.parquet         a finished shard's output (written to a temp file, then renamed)
      shards/<id>.parts/          durable parts of a shard in progress (parts.py)
      done/<id>.json              DoneRecord: written only after the shard output is durable
      ranks/<r>.json              RankRecord: the rank's latest attempt, its state and counters
      ranks/<r>.owner             which attempt of the rank may write (the newest start)
      ranks/<r>.beat              the attempt's heartbeat (dynamic schedule: claims.py)
      claims/<id>.<gen>           which attempt claimed a shard (dynamic schedule: claims.py)
      holders/<id>.<gen>.<r>.<tag>  the same claim's file, named by its rank and attempt (claims.py)
      beats/<r>.<tag>.<n>         the attempt's heartbeat as a name: renamed each beat (claims.py)
      logs/rank-<r>.log           per-rank output (a spanning replica's leader, node 0)
      logs/rank-<r>-node-<n>.log  node n > 0 of a rank spanning nodes (its headless process)
      logs/forkserver.log         local launch on CPU: the process the ranks are forked from
      lock                        held (flock) while a submission of this run is live
      finalize.lock               held (flock) while a finalize of this run writes; a second one waits
      repair.lock                 held (flock) while a torn file is checked again and set aside
      repairs/<name>.json         Repair: a file found torn or unreadable and what was done (integrity.py)
      discarded/<name>            what was set aside (moved, never copied; delete it when not needed)
      jobs.json                   Slurm: every submission's worker and finalize job ids (Submission)
      slurm/                      Slurm: submitit's job scripts, pickles and task logs
      finalize.json               FinalizeOutcome: how the last finalize ended
      results.parquet             the ordered, verified result (finalize)
      summary.json                totals, layout, sampling, engine_args, ranks (finalize)

Every write is atomic: a temp file in the same directory, fsync, rename (progress records skip
the fsync); a failing rank's record on a full disk is the one exception (`write_rank`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from hpcinfer.errors import RunInProgress, disk_full
from hpcinfer.rundir.files import atomic_write_json, overwrite_in_place, read_json
from hpcinfer.rundir.records import DoneRecord, FinalizeOutcome, Plan, RankRecord, Repair


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


@contextlib.contextmanager
def _flocked(path: Path, waiting: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting for it; `waiting(holder)` once when it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting(os.pread(fd, 64, 0).decode(errors="replace").strip() or "?")
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # the holder's pid is informative only (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class RunDir:
    """Paths and small readers/writers for one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()

    def __str__(self) -> str:
        return str(self.path)

    # ---- fixed names -------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    plan = property(lambda self: self.path / "plan.json")
    manifest = property(lambda self: self.path / "manifest.parquet")
    shards_dir = property(lambda self: self.path / "shards")
    done_dir = property(lambda self: self.path / "done")
    ranks_dir = property(lambda self: self.path / "ranks")
    claims_dir = property(lambda self: self.path / "claims")
    holders_dir = property(lambda self: self.path / "holders")
    beats_dir = property(lambda self: self.path / "beats")
    logs_dir = property(lambda self: self.path / "logs")
    lock_file = property(lambda self: self.path / "lock")
    results = property(lambda self: self.path / "results.parquet")
    results_jsonl = property(lambda self: self.path / "results.jsonl")
    inputs_dir = property(lambda self: self.path / "inputs")
    summary = property(lambda self: self.path / "summary.json")
    jobs = property(lambda self: self.path / "jobs.json")
    slurm_dir = property(lambda self: self.path / "slurm")
    finalize_outcome = property(lambda self: self.path / "finalize.json")
    finalize_lock_file = property(lambda self: self.path / "finalize.lock")
    repair_lock_file = property(lambda self: self.path / "repair.lock")
    repairs_dir = property(lambda self: self.path / "repairs")
    discarded_dir = property(lambda self: self.path / "discarded")

    def shard_output(self, shard: int) -> Path:
        return self.shards_dir / f"{shard_name(shard)}.parquet"

    def shard_parts(self, shard: int) -> Path:
        return self.shards_dir / f"{shard_name(shard)}.parts"

    def done_marker(self, shard: int) -> Path:
        return self.done_dir / f"{shard_name(shard)}.json"

    def claim(self, shard: int, gen: int) -> Path:
        """Generation `gen` of the claim of `shard` (claims.py)."""
        return self.claims_dir / f"{shard_name(shard)}.{gen}"

    def rank_file(self, rank: int) -> Path:
        return self.ranks_dir / f"{rank}.json"

    def rank_owner(self, rank: int) -> Path:
        return self.ranks_dir / f"{rank}.owner"

    def rank_beat(self, rank: int) -> Path:
        return self.ranks_dir / f"{rank}.beat"

    def rank_log(self, rank: int) -> Path:
        return self.logs_dir / f"rank-{rank}.log"

    def node_log(self, rank: int, node_rank: int) -> Path:
        """The log of node `node_rank` of a rank (a replica spanning nodes): node 0, the leader,
        writes the rank's own log; the others a log each."""
        return self.rank_log(rank) if node_rank == 0 else self.logs_dir / f"rank-{rank}-node-{node_rank}.log"

    def forkserver_log(self) -> Path:
        return self.logs_dir / "forkserver.log"

    # ---- lifecycle ---------------------------------------------------------------------
    def create(self) -> None:
        """Create the layout, private to the user (0700): pickled payloads and prompts live here."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        for d in (self.shards_dir, self.done_dir, self.ranks_dir, self.logs_dir):
            d.mkdir(exist_ok=True, mode=0o700)

    def exists(self) -> bool:
        return self.config.exists()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock; a second live submission of the same run is refused."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInProgress(f"run_dir {str(self.path)!r} is in use by another submission") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def finalizing(self, waiting: Callable[[str], None] = lambda holder: None) -> Iterator[None]:
        """Hold the finalize lock: one finalize of the run writes at a time; a second one waits
        (`waiting(holder's pid)` is called once first) and then runs on its own."""
        with _flocked(self.finalize_lock_file, waiting):
            yield

    @contextlib.contextmanager
    def repairing(self) -> Iterator[None]:
        """Hold the repair lock (integrity.py): a file is checked again and set aside under it, so
        two processes never both set aside a shard, nor one a shard another has just redone."""
        with _flocked(self.repair_lock_file, lambda holder: None):
            yield

    # ---- the plan ----------------------------------------------------------------------
    def read_plan(self) -> Plan:
        return Plan.from_json(read_json(self.plan))

    # ---- shard completion --------------------------------------------------------------
    def is_done(self, shard: int) -> bool:
        return self.done_marker(shard).exists()

    def done_shards(self) -> set[int]:
        """Shards with a done marker (as written; `verified_done_shards` checks their outputs)."""
        if not self.done_dir.exists():
            return set()
        return {int(p.stem) for p in self.done_dir.glob("*.json") if p.stem.isdigit()}

    def verified_done_shards(self, by: str = "check") -> set[int]:
        """Shards done with an output that is provably complete (its footer, row count and row
        positions agree with the manifest); a done shard that is not is set aside and recorded
        (integrity.verify_done), so that its rows are generated again."""
        from hpcinfer.rundir.integrity import verify_done
        from hpcinfer.rundir.manifest import read_manifest

        return verify_done(self, read_manifest(str(self.manifest))[0], by).done

    def mark_done(self, record: DoneRecord) -> None:
        """Record shard `record.shard` as finished. Call only after its output is durable."""
        if not self.shard_output(record.shard).exists():
            raise RuntimeError(f"shard {record.shard} has no output; refusing to mark it done")
        atomic_write_json(self.done_marker(record.shard), record.to_json())

    def read_done(self, shard: int) -> DoneRecord:
        return DoneRecord.from_json(read_json(self.done_marker(shard)))

    # ---- rank state --------------------------------------------------------------------
    def write_rank(self, record: RankRecord) -> None:
        """`ranks/<record.rank>.json`. Progress, rewritten often: atomic for readers, not fsynced
        (it is not the output). An ended attempt's record (its error) on a full disk, where no
        temp file can be made, is rewritten in place instead: the error must reach `status`."""
        try:
            atomic_write_json(self.rank_file(record.rank), record.to_json(), durable=False)
        except OSError as e:
            if not (disk_full(e) and record.ended and self.rank_file(record.rank).exists()):
                raise
            text = json.dumps(record.to_json(), indent=1, sort_keys=True, default=str) + "\n"
            overwrite_in_place(self.rank_file(record.rank), text)

    def read_rank(self, rank: int) -> Optional[RankRecord]:
        """The rank's record, or None when it has written none (yet) or it cannot be read (a rank
        sets an unreadable one aside when it starts: integrity.read_rank_checked)."""
        d = self.read_optional(self.rank_file(rank))
        return RankRecord.from_json(d) if isinstance(d, dict) else None

    def read_ranks(self) -> Dict[int, RankRecord]:
        """Every rank's record, by rank (files that are not a rank's record are skipped)."""
        out = {}
        if self.ranks_dir.exists():
            for p in self.ranks_dir.glob("*.json"):
                with contextlib.suppress(ValueError, TypeError, AttributeError, OSError):
                    out[int(p.stem)] = RankRecord.from_json(read_json(p))
        return dict(sorted(out.items()))

    # ---- finalize ----------------------------------------------------------------------
    def write_finalize_outcome(self, outcome: FinalizeOutcome) -> None:
        atomic_write_json(self.finalize_outcome, outcome.to_json())

    def read_finalize_outcome(self) -> Optional[FinalizeOutcome]:
        """How the last finalize ended, or None when none has recorded it."""
        d = self.read_optional(self.finalize_outcome)
        return None if d is None else FinalizeOutcome.from_json(d)

    # ---- repairs -----------------------------------------------------------------------
    def read_repairs(self) -> List[Repair]:
        """Every repair recorded in the run, oldest first (integrity.py writes them)."""
        out = []
        if self.repairs_dir.exists():
            for p in self.repairs_dir.glob("*.json"):
                with contextlib.suppress(ValueError, TypeError, AttributeError, OSError):
                    out.append(Repair.from_json(read_json(p)))
        return sorted(out, key=lambda r: (r.at or 0.0, r.path))

    # ---- any JSON file -----------------------------------------------------------------
    def read_optional(self, path: Path) -> Any:
        """A JSON file of the run directory, or None when it is not there (yet)."""
        try:
            return read_json(path)
        except (FileNotFoundError, ValueError):
            return None
