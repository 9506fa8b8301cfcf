"""[from worker] The in-job worker: one rank's loop. `python -m hpcinfer.worker <run_dir>`

Started by a backend with the environment of `ranks.rank_env`. It builds one vLLM engine and
streams shards through it: with the dynamic schedule it claims them from the run directory as the
batch has room, each rank its share of the longest requests first (`ClaimedWork`, claims.py, schedule.py); with the static one it takes its own
(`StaticWork`). For each shard it writes finished rows in durable parts, then the shard output
atomically, and only then the done marker; a restarted rank skips done shards and rows already in
parts, so no row is written twice. Its state and counters go to `ranks/<rank>.json`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Collection, List, Optional

import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcinfer.config import engine_args, load_run_config
from hpcinfer.errors import exit_on_signal
from hpcinfer.rank import schedule
from hpcinfer.rank.context import RankContext, context_from_env, pin_to_cores
from hpcinfer.rank.schedule import claim_order
from hpcinfer.rundir.claims import ClaimLost, Claims, Heartbeat
from hpcinfer.rundir.files import atomic_path, atomic_write
from hpcinfer.rundir.manifest import Shard, read_manifest, read_shard
from hpcinfer.rundir.parts import ShardCheckpoint, remove_parts
from hpcinfer.rundir.paths import RunDir


class Superseded(Exception):
    """A newer attempt of this rank has started (this one is an orphan, e.g. on a lost node)."""


class RankState:
    """This rank's `ranks/<rank>.json`: state, counters and timings, rewritten atomically.

    `buffered` is the number of finished rows not yet durable (lost if the rank dies now).
    `rows_generated` counts the rows this rank's engine finished, over all its attempts: the
    summary's `rows_recomputed` is their sum over the ranks less the rows of the run (rows lost
    with a dead attempt and generated again, by it or by the rank that took its shards over).
    `attempts` counts starts of this rank."""

    WRITE_INTERVAL_S = 0.5

    def __init__(self, rd: RunDir, ctx: RankContext, rows_total: int, shards_total: int):
        self.rd, self._last = rd, 0.0
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
        atomic_write(rd.rank_owner(ctx.rank), self.token)
        before = rd.read_optional(rd.rank_file(ctx.rank)) or {}
        self.s = dict(rank=ctx.rank, token=self.token, host=socket.gethostname(), pid=os.getpid(), device_kind=ctx.device_kind,
                      devices=ctx.devices, state="starting", rows_total=rows_total, rows_done=0, rows_failed=0,
                      prompt_tokens=0, output_tokens=0, shards_total=shards_total, shards_done=0, buffered=0,
                      attempts=before.get("attempts", 0) + 1,
                      rows_generated=before.get("rows_generated", 0),
                      started_at=time.time(), engine_seconds=0.0, generation_seconds=0.0,
                      generation_started_at=None, generation_ended_at=None, finished_at=None, error=None)

    def write(self, force: bool = True, **changes) -> None:
        self.s.update(changes)
        now = time.time()
        if force or now - self._last >= self.WRITE_INTERVAL_S:
            self._last = now
            self.check_owner()
            self.rd.write_rank(self.s["rank"], {**self.s, "updated_at": now})

    def check_owner(self) -> None:
        """Raise Superseded when a newer attempt of this rank owns it: stop writing at once."""
        try:
            owner = self.rd.rank_owner(self.s["rank"]).read_text()
        except FileNotFoundError:
            owner = self.token
        if owner != self.token:
            raise Superseded(f"rank {self.s['rank']} was started again elsewhere ({owner})")

    def add_shard(self, done: dict) -> None:
        for key in ("rows_failed", "prompt_tokens", "output_tokens", "generation_seconds"):
            self.s[key] += done[key]
        self.s["shards_done"] += 1


def run(run_dir: str, ctx: Optional[RankContext] = None) -> int:
    ctx = ctx or context_from_env(os.environ)
    if ctx.device_kind == "cpu":
        pin_to_cores(ctx.devices)
    rd = RunDir(run_dir)
    cfg = load_run_config(rd.config)
    plan = rd.read_plan()
    shards, schema = read_manifest(str(rd.manifest))
    expected = [s for s in shards if s.rank == ctx.rank]
    state = RankState(rd, ctx, sum(s.rows for s in expected), len(expected))
    finished_rows = 0
    for s in shards:  # shards this rank finished in an earlier attempt count as its own
        if rd.is_done(s.shard):
            done = rd.read_done(s.shard)
            if done.get("rank") == ctx.rank:
                state.add_shard(done)
                finished_rows += s.rows
    work = (ClaimedWork(rd, ctx.rank, ctx.world_size, state.token, shards, cfg.schedule.lease_s) if cfg.dynamic
            else StaticWork(rd, expected))
    state.write(rows_done=finished_rows)
    print(f"rank {ctx.rank}/{ctx.world_size} on {socket.gethostname()} ({ctx.device_kind} {ctx.devices}): "
          f"{work.describe()} (attempt {state.s['attempts']})", flush=True)
    try:
        if not work.exhausted() or cfg.lockstep:  # a lockstep rank steps with its group even when idle
            from hpcinfer.rank.context import replica_engine_args
            from hpcinfer.rank.engine import Engine

            t0 = time.time()
            # from config.yaml, whose secrets re-resolve from the environment (plan.json has them masked)
            engine = Engine({**engine_args(cfg, plan["engine_args"]["model"]), **replica_engine_args(os.environ)}, cfg.sampling)
            state.write(state="running", engine_seconds=time.time() - t0, generation_started_at=time.time())
            run_shards(rd, cfg, work, schema, engine, state, finished_rows, ctx.rank)
            if cfg.lockstep:
                while engine.group_busy():  # idle here, busy elsewhere: vLLM runs a dummy batch
                    engine.step()
            engine.shutdown()
        state.write(state="done", finished_at=time.time())
        print(f"rank {ctx.rank} done: {state.s['rows_done']} rows, {state.s['output_tokens']} output tokens",
              flush=True)
        return 0
    except Superseded as e:  # leave everything to the newer attempt
        print(f"{e}; this attempt stops without writing", flush=True)
        return 1
    except BaseException as e:
        stopped = isinstance(e, (SystemExit, KeyboardInterrupt))
        if not stopped:
            traceback.print_exc()
        with contextlib.suppress(Superseded):
            state.write(state="stopped" if stopped else "failed", finished_at=time.time(),
                        error=f"{type(e).__name__}: {e}"[:2000])
        return 1
    finally:
        work.close()


class StaticWork:
    """schedule.mode=static (and MoE lockstep): this rank's own shards, in order."""

    room_batches = 2  # keep this many batches' worth of rows in the engine

    def __init__(self, rd: RunDir, mine: List[Shard]):
        self.total = len(mine)
        self.queue = [s for s in mine if not rd.is_done(s.shard)]

    def describe(self) -> str:
        return f"{len(self.queue)} of {self.total} shard(s) to do"

    def next(self) -> Optional[Shard]:
        return self.queue.pop(0) if self.queue else None

    def exhausted(self) -> bool:
        return not self.queue

    def check(self, shard: int) -> None:
        pass

    def release(self, shard: int) -> None:
        pass

    def close(self) -> None:
        pass


class ClaimedWork:
    """schedule.mode=dynamic: shards claimed from the run directory (claims.py) as the balancing
    policy (`schedule.by_mix`) allows: every rank its share of the longest requests first, all
    started at once, short ones beside them. It keeps one batch of rows in its engine. An idle rank
    stays while other ranks hold unfinished shards, to take them over if they die."""

    room_batches = 1
    poll_s = 1.0  # how often an idle rank looks for claimable shards
    retry_s = 0.25  # how soon a rank with work in hand looks again after finding nothing to claim

    def __init__(self, rd: RunDir, rank: int, world: int, token: str, shards: List[Shard], lease_s: float):
        self.by_id, self.world = {s.shard: s for s in shards}, world
        self.tokens = {s.shard: s.tokens for s in shards}
        self.rows = {s.shard: s.rows for s in shards}
        self.claims = Claims(rd, rank, token, [s.shard for s in claim_order(shards)], lease_s)
        self.heartbeat = Heartbeat(rd, rank, token, max(0.2, lease_s / 4)).start()
        self._next_look = 0.0

    def describe(self) -> str:
        return f"claims from {self.claims.unfinished()} unfinished of {len(self.by_id)} shard(s), longest rows first"

    def next(self) -> Optional[Shard]:
        if time.monotonic() < self._next_look:
            return None
        shard = self.claims.next(  # a rank that is gone leaves its share to the others
            lambda candidates, unfinished, gone: schedule.by_mix(candidates, unfinished, self.tokens, self.rows,
                                                                 self.held, max(1, self.world - gone)))
        if shard is None:
            self._next_look = time.monotonic() + (self.retry_s if self.held else self.poll_s)
            return None
        return self.by_id[shard]

    @property
    def held(self) -> Collection[int]:
        """The shards this attempt holds open (claimed, not yet released)."""
        return self.claims.mine.keys()

    def exhausted(self) -> bool:
        return self.claims.unfinished() == 0

    def check(self, shard: int) -> None:
        self.claims.check(shard)

    def release(self, shard: int) -> None:
        self.claims.release(shard)

    def close(self) -> None:
        self.heartbeat.stop()


@dataclass
class _Open:
    """A shard whose rows are in the engine."""

    shard: Shard
    ck: ShardCheckpoint
    todo: List[int]  # positions generated in this attempt (index = the engine's index)
    left: int
    started: float
    tokens: int = 0  # output tokens streamed so far (progress)


def run_shards(rd: RunDir, cfg, work, schema, engine, state: RankState, rows_before: int, rank: int) -> None:
    """Generate the missing rows of the shards `work` hands out through one engine, durably in
    parts. The next shard's rows join the engine while the current one's still run (below
    `work.room_batches` batches' worth pending), so the batch never drains at a shard boundary.
    Each shard is assembled and marked done as soon as its last row is durable."""
    open_ = {}
    room = work.room_batches * engine.max_num_seqs
    base_tokens, finished_rows = state.s["output_tokens"], rows_before

    def progress(force: bool = False) -> None:
        state.write(force=force, rows_done=finished_rows + sum(len(o.ck.durable) + len(o.ck.buffer)
                                                               for o in open_.values()),
                    buffered=sum(len(o.ck.buffer) for o in open_.values()),
                    output_tokens=base_tokens + sum(o.tokens for o in open_.values()))

    def deliver(tag: int, i: int, result) -> None:
        o = open_.get(tag)
        if o is None:  # its shard was dropped (taken over) while the row was in flight
            return
        try:
            o.ck.add(o.todo[i], result)
        except ClaimLost as e:
            return drop(o, e)
        o.tokens += result.output_tokens
        o.left -= 1
        state.s["rows_generated"] += 1
        if o.left == 0:
            close(o)
        progress(force=not o.ck.buffer)

    def drop(o: _Open, why: Exception) -> None:
        print(f"rank {rank}: {why}; dropping it", flush=True)
        engine.abort(o.shard.shard)
        del open_[o.shard.shard]
        work.release(o.shard.shard)

    def close(o: _Open) -> None:
        nonlocal finished_rows, base_tokens
        try:
            o.ck.flush()
            work.check(o.shard.shard)
        except ClaimLost as e:
            return drop(o, e)
        state.check_owner()
        done = finish_shard(rd, o.shard, o.ck, rank, time.time() - o.started, o.shard.rows - len(o.todo))
        del open_[o.shard.shard]
        work.release(o.shard.shard)
        state.s["output_tokens"] = base_tokens  # drop what was streamed: the done totals count it
        state.add_shard(done)
        finished_rows += o.shard.rows
        base_tokens = state.s["output_tokens"]
        state.write(generation_ended_at=time.time())

    def open_next(shard: Shard) -> None:
        table = read_shard(shard, schema)

        def before_write() -> None:
            state.check_owner()
            work.check(shard.shard)

        ck = ShardCheckpoint(rd, shard, table, cfg.checkpoint.rows, cfg.checkpoint.seconds, before_write)
        todo = ck.todo()
        o = open_[shard.shard] = _Open(shard, ck, todo, len(todo), time.time())
        if not todo:  # every row already durable in parts: assemble it
            close(o)
            return
        prompts = table.column(cfg.data.prompt_column).take(todo).to_pylist()
        caps = (table.column(cfg.data.max_tokens_column).take(todo).to_pylist()
                if cfg.data.max_tokens_column else None)
        for tag, i, result in engine.add(shard.shard, prompts, [shard.global_start + p for p in todo], caps):
            deliver(tag, i, result)

    try:
        while True:
            while engine.pending < room:
                shard = work.next()
                if shard is None:
                    break
                open_next(shard)
            if not open_:
                if work.exhausted():
                    break
                time.sleep(ClaimedWork.poll_s)  # others hold the rest: stay to take over if they die
                continue
            if not engine.pending:
                raise RuntimeError(f"shard(s) {sorted(open_)} wait for rows the engine does not have")
            for tag, i, result in engine.step():
                deliver(tag, i, result)
    finally:  # stopped (SIGTERM, preemption) or failed: what is finished becomes durable
        for o in open_.values():
            with contextlib.suppress(ClaimLost):
                o.ck.flush()
        progress(force=True)


def finish_shard(rd: RunDir, shard: Shard, ck: ShardCheckpoint, rank: int, seconds: float, resumed: int) -> dict:
    """Assemble a shard from its parts, write its output, then its done marker, then drop the parts."""
    out = ck.complete()
    with atomic_path(rd.shard_output(shard.shard)) as tmp:
        pq.write_table(out, tmp)
    done = dict(shard=shard.shard, rank=rank, host=socket.gethostname(), rows=shard.rows,
                rows_failed=out.num_rows - out.column("error").null_count,
                prompt_tokens=int(pc.sum(out.column("prompt_tokens")).as_py() or 0),
                output_tokens=int(pc.sum(out.column("output_tokens")).as_py() or 0),
                generation_seconds=seconds, rows_resumed=resumed, finished_at=time.time())
    rd.mark_done(shard.shard, done)
    remove_parts(rd, shard.shard)
    return done


def should_restart(rd: RunDir, rank: int, returncode: int, retries_left: int) -> bool:
    """After a rank process ended: record a silent death (record_exit), and say whether to start
    it again: it failed (not stopped by a signal: then its launcher is going down too) and the
    retry budget is not spent. A restart continues from its durable parts."""
    record_exit(rd, rank, returncode)
    state = (rd.read_optional(rd.rank_file(rank)) or {}).get("state")
    return returncode != 0 and state == "failed" and retries_left > 0


def record_exit(rd: RunDir, rank: int, returncode: int) -> None:
    """Called by a launcher once a rank process has ended. A rank killed before it could say so
    (kill -9, the OOM killer, a lost node) still shows as running; record it as failed."""
    state = rd.read_optional(rd.rank_file(rank)) or {"rank": rank, "rows_done": 0}
    if returncode == 0 or state.get("state") in ("done", "failed", "stopped"):
        return
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
    rd.write_rank(rank, {**state, "state": "failed", "finished_at": time.time(), "updated_at": time.time(),
                         "error": f"the rank process {how} without recording an error (see its log)"})


def main() -> None:
    # SIGTERM (scancel, a stopping launcher) and SIGUSR2 (Slurm's warning before a time limit or
    # preemption): flush the finished rows, record "stopped", exit; a restart continues from there.
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGUSR2, exit_on_signal)
    if len(sys.argv) != 2:
        print("usage: python -m hpcinfer.worker <run_dir>", file=sys.stderr)
        raise SystemExit(2)
    code = run(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: vLLM's engine threads can hang it


if __name__ == "__main__":
    main()
