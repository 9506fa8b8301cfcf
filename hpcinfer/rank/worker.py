"""One rank's process: `python -m hpcinfer.rank.worker <run_dir>`.

Started by a launcher with the rank's environment (context.py). It builds one engine
(engine.py) and streams shards through it (`ShardLoop`): with the dynamic schedule it claims
them from the run directory as the batch has room, each rank its share of the longest requests
first (`ClaimedWork`: rundir/claims.py, schedule.py); with the static one it takes its own
(`StaticWork`). Rows become requests and results through requests.py. For each shard it writes
finished rows in durable parts (rundir/parts.py), then the shard output atomically, and only then
the done marker; a restarted rank skips done shards and rows already in parts, so no row is
written twice (both checked first: a torn one is set aside and its rows generated again,
rundir/integrity.py). A full disk fails the attempt with a record error saying so. Its state and counters go to `ranks/<rank>.json` (`RankState`, a RankRecord).

`should_restart` and `record_exit` are for launchers: what to do once a rank's process has ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcinfer.config import RunConfig, engine_args, load_run_config
from hpcinfer.errors import disk_full, disk_full_message, exit_on_signal
from hpcinfer.launch.env import RankContext, context_from_env, pin_to_cores, replica_engine_args
from hpcinfer.rank import staging
from hpcinfer.rank.engine import Engine
from hpcinfer.rank.requests import build_requests, split_reasoning
from hpcinfer.rank.work import ClaimedWork, StaticWork, Work
from hpcinfer.rundir.claims import ClaimLost, end_beat
from hpcinfer.rundir.files import atomic_path, atomic_write, written_path
from hpcinfer.rundir.integrity import describe, read_rank_checked
from hpcinfer.rundir.manifest import Shard, load_placement, read_manifest, read_shard
from hpcinfer.rundir.output import OutputSpec, RowResult, token_sum
from hpcinfer.rundir.parts import ShardCheckpoint, remove_parts
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DONE, FAILED, RUNNING, STOPPED, TERMINAL, DoneRecord, RankRecord, RequestSpec

_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(RankRecord))


class Superseded(Exception):
    """A newer attempt of this rank has started (this one is an orphan, e.g. on a lost node)."""


class RankState:
    """This attempt's `ranks/<rank>.json` (`record`, a RankRecord), rewritten atomically as it
    goes. The attempt is `record.token`, also written to `ranks/<rank>.owner`: a newer attempt
    of the rank replaces it there, and this one stops writing (`Superseded`). `attempts` and
    `rows_generated` carry over from the rank's earlier attempts."""

    WRITE_INTERVAL_S = 0.5

    def __init__(self, rd: RunDir, ctx: RankContext, rows_total: int, shards_total: int):
        self.rd, self._last = rd, 0.0
        host = socket.gethostname()
        token = f"{host}:{os.getpid()}:{time.time()}"
        atomic_write(rd.rank_owner(ctx.rank), token)
        before = read_rank_checked(rd, ctx.rank, f"rank {ctx.rank} ({token})")
        self.record = RankRecord(
            rank=ctx.rank,
            token=token,
            host=host,
            pid=os.getpid(),
            device_kind=ctx.device_kind,
            devices=ctx.devices,
            rows_total=rows_total,
            shards_total=shards_total,
            attempts=(before.attempts if before else 0) + 1,
            rows_generated=before.rows_generated if before else 0,
            started_at=time.time(),
        )

    @property
    def token(self) -> str:
        return self.record.token

    def write(self, force: bool = True, **changes) -> None:
        """Apply `changes` (RankRecord fields) and write the record: always when `force`, else
        at most every WRITE_INTERVAL_S."""
        unknown = changes.keys() - _RECORD_FIELDS
        if unknown:
            raise TypeError(f"not RankRecord fields: {sorted(unknown)}")
        for key, value in changes.items():
            setattr(self.record, key, value)
        now = time.time()
        if force or now - self._last >= self.WRITE_INTERVAL_S:
            self._last = now
            self.check_owner()
            self.record.updated_at = now
            self.rd.write_rank(self.record)

    def check_owner(self) -> None:
        """Raise Superseded when a newer attempt of this rank owns it: stop writing at once."""
        try:
            owner = self.rd.rank_owner(self.record.rank).read_text()
        except FileNotFoundError:
            owner = self.token
        if owner != self.token:
            raise Superseded(f"rank {self.record.rank} was started again elsewhere ({owner})")

    def add_shard(self, done: DoneRecord) -> None:
        r = self.record
        r.rows_failed += done.rows_failed
        r.prompt_tokens += done.prompt_tokens
        r.output_tokens += done.output_tokens
        r.generation_seconds += done.generation_seconds
        r.shards_done += 1


def run(run_dir: str, ctx: Optional[RankContext] = None) -> int:
    ctx = ctx or context_from_env(os.environ)
    if ctx.device_kind == "cpu":
        pin_to_cores(ctx.devices)
    rd = RunDir(run_dir)
    try:
        return _run(rd, ctx)
    except OSError as e:  # a full disk before the attempt could record anything (its owner file)
        if not disk_full(e):
            raise
        error = failure_message(rd, e)
        say(f"rank {ctx.rank}: {error}")
        with contextlib.suppress(OSError):
            now = time.time()
            before = rd.read_rank(ctx.rank) or RankRecord(ctx.rank)
            rd.write_rank(dataclasses.replace(before, state=FAILED, finished_at=now, updated_at=now, error=error))
        return 1


def failure_message(rd: RunDir, e: BaseException) -> str:
    """The error a failed attempt records: a full disk says so and what to do; anything else is
    the exception itself."""
    if disk_full(e):
        return disk_full_message(
            e,
            written_path(getattr(e, "filename", None), f"to {rd.path}"),
            f"resume (hpcinfer resume {rd.path}); the rows already written are kept",
        )
    return f"{type(e).__name__}: {e}"


START_GATE = "HPCINFER_START_GATE"


def wait_at_gate(gate: Optional[str], rank: int, poll_s: float = 0.01) -> None:
    """For benchmarks (bench/overhead.py): with `HPCINFER_START_GATE=<path>` set, a rank whose
    engine is up says so (`<path>.rank<r>.ready`, holding the time) and waits until `<path>`
    exists before it generates, so that its generation starts together with another process's.
    Unset: returns at once."""
    if not gate:
        return
    atomic_write(f"{gate}.rank{rank}.ready", repr(time.time()), durable=False)
    while not os.path.exists(gate):
        time.sleep(poll_s)


def say(msg: str) -> None:
    """A line in the rank's log; lost, not raised, when the log's disk is full."""
    with contextlib.suppress(OSError):
        print(msg, flush=True)


def _run(rd: RunDir, ctx: RankContext) -> int:
    cfg = load_run_config(rd.config)
    plan = rd.read_plan()
    shards, schema = read_manifest(str(rd.manifest))
    expected = [s for s in shards if s.rank == ctx.rank]
    state = RankState(rd, ctx, sum(s.rows for s in expected), len(expected))
    work: Optional[Work] = None
    try:
        work = (
            ClaimedWork(rd, ctx.rank, ctx.world_size, state.token, shards, cfg.schedule.lease_s)
            if cfg.dynamic
            else StaticWork(rd, expected, f"rank {ctx.rank} ({state.token})")
        )
        for repair in work.repairs:
            say(f"rank {ctx.rank}: repaired: {describe(repair)}")
        finished_rows = 0
        for s in shards:  # shards this rank finished in an earlier attempt count as its own
            if s.shard in work.done:
                done = rd.read_done(s.shard)
                if done.rank == ctx.rank:
                    state.add_shard(done)
                    finished_rows += s.rows
        state.write(rows_done=finished_rows)
        say(
            f"rank {ctx.rank}/{ctx.world_size} on {socket.gethostname()} ({ctx.device_kind} {ctx.devices}): "
            f"{work.describe()} (attempt {state.record.attempts})"
        )
        if not work.exhausted() or cfg.lockstep:  # a lockstep rank steps with its group even when idle
            from hpcinfer.rank.engine import create_engine  # looked up now: tests replace the factory

            t0 = time.time()
            # from config.yaml, whose secrets re-resolve from the environment (plan.json has them masked)
            args = {
                **engine_args(cfg, plan.engine_args["model"], plan.device_kind, plan.input_format),
                **replica_engine_args(os.environ),
            }
            log = rd.rank_log(ctx.rank)
            offset = staging.size_of(log)
            args, startup = staging.prepare(rd, cfg, args, say=lambda m: say(f"rank {ctx.rank}: {m}"))
            with staging.compile_lock(rd, cfg, args):
                engine = create_engine(args)
            startup.update(staging.startup_split(staging.read_from(log, offset)))
            if getattr(engine, "import_seconds", None) is not None:  # a VllmEngine (not a test's fake)
                startup["import_seconds"] = round(engine.import_seconds, 3)
            engine_seconds = time.time() - t0
            wait_at_gate(os.environ.get(START_GATE), ctx.rank)
            state.write(
                state=RUNNING, engine_seconds=engine_seconds, startup=startup, generation_started_at=time.time()
            )
            ShardLoop(rd, cfg, work, schema, engine, state, finished_rows, ctx.rank, plan.request, plan.output).run()
            if cfg.lockstep:
                while engine.group_busy():  # idle here, busy elsewhere: vLLM runs a dummy batch
                    engine.step()
            engine.shutdown()
            if KEEP_UNTIL_EXIT is not None:
                KEEP_UNTIL_EXIT.append(engine)
        state.write(state=DONE, finished_at=time.time())
        say(f"rank {ctx.rank} done: {state.record.rows_done} rows, {state.record.output_tokens} output tokens")
        return 0
    except Superseded as e:  # leave everything to the newer attempt
        say(f"{e}; this attempt stops without writing")
        return 1
    except BaseException as e:
        stopped = isinstance(e, (SystemExit, KeyboardInterrupt))
        error = failure_message(rd, e)
        if disk_full(e):
            say(f"rank {ctx.rank}: {error}")
        elif not stopped:
            with contextlib.suppress(OSError):
                traceback.print_exc()
        with contextlib.suppress(Superseded):
            state.write(state=STOPPED if stopped else FAILED, finished_at=time.time(), error=error[:2000])
        return 1
    finally:
        if work is not None:
            work.close()


@dataclass
class OpenShard:
    """A shard whose rows are in the engine."""

    shard: Shard
    ck: ShardCheckpoint
    todo: List[int]  # positions generated in this attempt (index = the engine's index)
    left: int
    started: float
    tokens: int = 0  # output tokens streamed so far (progress)


class ShardLoop:
    """Generates the missing rows of the shards `work` hands out through one engine, durably in
    parts. The next shard's rows join the engine while the current one's still run (below
    `work.room_batches` batches' worth pending), so the batch never drains at a shard boundary.
    Each shard is assembled and marked done as soon as its last row is durable (`close`).

    Counters: `finished_rows` (rows of the shards this rank finished, earlier attempts included)
    and `base_tokens` (their output tokens); the record's rows_done and output_tokens are these
    plus what the open shards have so far (`progress`)."""

    def __init__(
        self,
        rd: RunDir,
        cfg: RunConfig,
        work: Work,
        schema: pa.Schema,
        engine: Engine,
        state: RankState,
        rows_before: int,
        rank: int,
        spec: Optional[RequestSpec] = None,
        output: Optional[OutputSpec] = None,
    ):
        self.spec = spec  # how rows become requests (plan.json's); None: the prompt column
        self.output = output  # the generated columns (plan.json's); None: one sample, no logprobs
        self.split = None  # output.reasoning_parser: text -> (reasoning, answer), vLLM's parser
        if cfg.output.reasoning_parser is not None:
            from hpcinfer.rank.engine import reasoning_split

            self.split = reasoning_split(cfg.output.reasoning_parser, engine.tokenizer)
        self.rd, self.cfg, self.work, self.schema, self.engine, self.state, self.rank = (
            rd,
            cfg,
            work,
            schema,
            engine,
            state,
            rank,
        )
        self.open: Dict[int, OpenShard] = {}
        self.room = work.room_batches * engine.max_num_seqs
        self.base_tokens, self.finished_rows = state.record.output_tokens, rows_before
        self.placement = load_placement(str(rd.manifest))  # prefix placement: slot -> input row, else None

    def input_row(self, slot: int) -> int:
        """The input row at `slot` of the run's shards (the same number without placement): what
        a row's seed and ids derive from, so they do not depend on where it was placed."""
        return slot if self.placement is None else int(self.placement[slot])

    def run(self) -> None:
        """Until `work` is exhausted and every open shard is done; on the way out (stopped,
        failed) what is finished becomes durable."""
        try:
            while True:
                while self.engine.pending < self.room:
                    shard = self.work.next()
                    if shard is None:
                        break
                    self.open_next(shard)
                if not self.open:
                    if self.work.exhausted():
                        break
                    time.sleep(self.work.poll_s)  # others hold the rest: stay to take over if they die
                    continue
                if not self.engine.pending:
                    raise RuntimeError(f"shard(s) {sorted(self.open)} wait for rows the engine does not have")
                self.step()
        except BaseException:
            for o in self.open.values():  # keep what is finished; a second error (a full disk) must
                with contextlib.suppress(ClaimLost, OSError):  # not hide the first
                    o.ck.flush()
            with contextlib.suppress(OSError):
                self.progress(force=True)
            raise
        self.progress(force=True)

    def open_next(self, shard: Shard) -> None:
        """Read `shard`'s rows, open its parts, and add the rows not yet durable to the engine
        (rows that cannot be generated are delivered at once, with their error)."""
        table = read_shard(shard, self.schema)

        def before_write() -> None:
            self.state.check_owner()
            self.work.check(shard.shard)

        ck = ShardCheckpoint(
            self.rd,
            shard,
            table,
            self.cfg.checkpoint.rows,
            self.cfg.checkpoint.seconds,
            before_write,
            by=f"rank {self.rank} ({self.state.token})",
            spec=self.output,
        )
        todo = ck.todo()
        o = self.open[shard.shard] = OpenShard(shard, ck, todo, len(todo), time.time())
        if not todo:  # every row already durable in parts: assemble it
            self.close(o)
            return
        requests = build_requests(
            table,
            todo,
            [self.input_row(shard.global_start + p) for p in todo],
            self.cfg,
            self.engine.tokenizer,
            self.engine.max_model_len,
            self.spec,
            self.engine if self.spec is not None and self.spec.renders_chat else None,
        )
        failed = []
        # prefix placement: the shard's rows start alike, and vLLM's prefix cache serves a start only
        # once it is computed; requests prefilled in one step would each compute it. So the first
        # row goes ahead by one engine step (which decodes the other open shards' rows meanwhile).
        lead = self.placement is not None and len(requests) > 1
        for i, request in enumerate(requests):
            if isinstance(request, RowResult):
                failed.append((i, request))
            else:
                self.engine.add(shard.shard, i, request)
                if lead:
                    lead = False
                    self.step()
        for i, result in failed:
            self.deliver(shard.shard, i, result)

    def step(self) -> None:
        """One engine step; the rows it finished are delivered."""
        finished = self.engine.step()
        if finished:  # the window raw vLLM is compared with ends here (bench/overhead.py)
            self.state.record.last_output_at = time.time()
        for tag, i, result in finished:
            self.deliver(tag, i, result)

    def deliver(self, tag: int, i: int, result: RowResult) -> None:
        """Row `i` of open shard `tag` is finished: into its parts; the shard closes with its last row."""
        o = self.open.get(tag)
        if o is None:  # its shard was dropped (taken over) while the row was in flight
            return
        result = split_reasoning(result, self.split)
        try:
            o.ck.add(o.todo[i], result)
        except ClaimLost as e:
            return self.drop(o, e)
        o.tokens += result.output_tokens
        o.left -= 1
        self.state.record.rows_generated += 1
        if o.left == 0:
            self.close(o)
        self.progress(force=not o.ck.buffer)

    def drop(self, o: OpenShard, why: Exception) -> None:
        """Give up an open shard another rank took over: its rows leave the engine."""
        say(f"rank {self.rank}: {why}; dropping it")
        self.engine.abort(o.shard.shard)
        del self.open[o.shard.shard]
        self.work.release(o.shard.shard)

    def close(self, o: OpenShard) -> None:
        """All of `o`'s rows are in: flush, write the shard output and its done marker (finish_shard)."""
        try:
            o.ck.flush()
            self.work.check(o.shard.shard)
        except ClaimLost as e:
            return self.drop(o, e)
        self.state.check_owner()
        done = finish_shard(self.rd, o.shard, o.ck, self.rank, time.time() - o.started, o.shard.rows - len(o.todo))
        del self.open[o.shard.shard]
        self.work.release(o.shard.shard, done=True)
        self.state.record.output_tokens = self.base_tokens  # drop what was streamed: the done totals count it
        self.state.add_shard(done)
        self.finished_rows += o.shard.rows
        self.base_tokens = self.state.record.output_tokens
        self.state.write(generation_ended_at=time.time())

    def progress(self, force: bool = False) -> None:
        """Write the record's progress: rows done (durable or buffered), buffered rows, output tokens."""
        opened = self.open.values()
        self.state.write(
            force=force,
            rows_done=self.finished_rows + sum(len(o.ck.durable) + len(o.ck.buffer) for o in opened),
            buffered=sum(len(o.ck.buffer) for o in opened),
            output_tokens=self.base_tokens + sum(o.tokens for o in opened),
            cached_tokens=int(getattr(self.engine, "cached_tokens", 0)),
        )


def finish_shard(rd: RunDir, shard: Shard, ck: ShardCheckpoint, rank: int, seconds: float, resumed: int) -> DoneRecord:
    """Assemble a shard from its parts, write its output, then its done marker, then drop the parts."""
    out = ck.complete()
    with atomic_path(rd.shard_output(shard.shard)) as tmp:
        pq.write_table(out, tmp)
    done = DoneRecord(
        shard=shard.shard,
        rank=rank,
        host=socket.gethostname(),
        rows=shard.rows,
        rows_failed=out.num_rows - out.column("error").null_count,
        prompt_tokens=int(pc.sum(out.column("prompt_tokens")).as_py() or 0),
        output_tokens=token_sum(out.column("output_tokens")),
        generation_seconds=seconds,
        rows_resumed=resumed,
        finished_at=time.time(),
    )
    rd.mark_done(done)
    remove_parts(rd, shard.shard)
    return done


def superseded_by(rd: RunDir, rank: int, pids: Collection[int], host: Optional[str] = None) -> Optional[str]:
    """The attempt that owns `rank` now (ranks/<r>.owner) when it is none of the processes `pids`
    this launcher started on this host: another launcher started the rank again (Slurm requeued
    the job elsewhere while this node was cut off but its processes ran on). None when the owner
    is one of them, or none has said so yet. Its record and its claims are not this launcher's to
    touch, and the rank not its to restart (that would supersede the attempt that now runs it)."""
    try:
        owner = rd.rank_owner(rank).read_text()
    except FileNotFoundError:
        return None
    owner_host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if owner_host == (host or socket.gethostname()) and pid.isdigit() and int(pid) in pids:
        return None
    return owner


def should_restart(rd: RunDir, rank: int, returncode: int, retries_left: int) -> bool:
    """After a rank process ended: record a silent death (record_exit), and say whether to start
    it again: it failed (not stopped by a signal: then its launcher is going down too) and the
    retry budget is not spent. A restart continues from its durable parts."""
    record_exit(rd, rank, returncode)
    record = rd.read_rank(rank)
    return returncode != 0 and record is not None and record.state == FAILED and retries_left > 0


def record_exit(rd: RunDir, rank: int, returncode: int) -> None:
    """Called by a launcher once a rank process has ended. A rank killed before it could say so
    (kill -9, the OOM killer, a lost node) still shows as running; record it as failed."""
    record = rd.read_rank(rank) or RankRecord(rank)
    if returncode == 0 or record.state in TERMINAL:
        return
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
    now = time.time()
    rd.write_rank(
        dataclasses.replace(
            record,
            state=FAILED,
            finished_at=now,
            updated_at=now,
            error=f"the rank process {how} without recording an error (see its log)",
        )
    )
    if record.token:
        end_beat(rd, rank, record.token)  # its claims are taken over at once, not after 3/8 of a lease


# Set by main(), which ends the process with os._exit: an engine that was shut down is kept here
# until then, never freed. Freeing it as `_run` returned (vLLM's LLM: the model, KV cache,
# tokenizer) cost ~1.2 s on CPU between the rank's record saying done and its exit, in every run's
# wall. (A failed attempt's engine is still dropped: its destructor stops its engine processes.)
KEEP_UNTIL_EXIT: Optional[List[Engine]] = None


def main() -> None:
    global KEEP_UNTIL_EXIT
    KEEP_UNTIL_EXIT = []
    # SIGTERM (scancel, a stopping launcher) and SIGUSR2 (Slurm's warning before a time limit or
    # preemption): flush the finished rows, record "stopped", exit; a restart continues from there.
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGUSR2, exit_on_signal)
    if len(sys.argv) != 2:
        print("usage: python -m hpcinfer.rank.worker <run_dir>", file=sys.stderr)
        raise SystemExit(2)
    code = run(sys.argv[1])
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a log on a full disk
            stream.flush()
    os._exit(code)  # skip interpreter teardown: vLLM's engine threads can hang it


if __name__ == "__main__":
    main()
