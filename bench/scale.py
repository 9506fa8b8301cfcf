"""Scale of the claim protocol: R ranks claiming shards from one run directory, counting the
metadata operations they make and how long claiming blocks their engine loops.

    .venv/bin/python bench/scale.py [--ranks 16] [--shards-per-rank 8] [--op-latency-ms 0]
        [--shard-s 2.0] [--lease-s 120] [--repeats 1] [--sides instant,claims]

Each rank is a thread running the REAL protocol (rank/work.py ClaimedWork over rundir/claims.py,
its heartbeat and, when the protocol has one, its background claimer) against a real run
directory in a temp dir, with a FAKE engine (named so: it runs no model) that "generates" a
shard in `shard-s x tokens / mean tokens` seconds and holds at most 2 shards open, as a rank
with one batch of room does. A finished shard gets its done marker; every call the engine loop
makes into the protocol (next, check, release, exhausted) is timed.

Metadata operations are counted by wrapping, inside this process only, os.open, os.stat,
os.lstat, os.listdir, os.scandir, os.link, os.rename, os.replace, os.unlink, os.mkdir and
open() (io.open); `--op-latency-ms` sleeps that long in each (the GIL is released, as it is
around a real filesystem call), to model a shared filesystem's metadata server (Lustre, GPFS,
NFS: 0.5-2 ms). Production code is untouched.

Sides, interleaved when repeated: `instant` (the same fake ranks taking shards from an
in-memory pool under a lock, in claim order: claims that cost nothing, the makespan floor) and
`claims` (the protocol). Reported: metadata ops per claim (mean over the job; p99 over ranks of
a rank's ops per claim; every operation from the ranks' start-up on), the engine loop's time in
claiming calls (next, release, exhausted) per loop iteration (p50, p99, max ms), `check` apart,
the job's metadata ops per second, makespans and the overhead against `instant`; and where the
operations per claim were made: in which protocol call (the claimer's full and claim looks,
claiming, publishing `.done` names, the heartbeat, start-up, the run's end) and, inside it, by
what (listing beats/ or a holders/ bucket, reading owner and record files, creating a claim).
The last line: `ranks=R ops_per_claim=X claim_block_ms_p99=Y job_ops_per_s=Z`.

`--cheap` (thousands of ranks): no thread per rank. Each process steps its ranks round-robin in
one loop, a rank's heartbeat and claimer rounds inside its engine loop iteration
(ClaimedWork(background=False).tick), on a SIMULATED clock that advances one engine step
(`--step-s`) per round, the processes in lockstep; metadata operations cost no time there
(`--op-latency-ms` is not slept), so makespans and ops/s are in simulated seconds, and the wall
time is reported beside them.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import functools
import io
import multiprocessing
import os
import pickle
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import machine_lines, print_table, work_dir  # noqa: E402

from hpcinfer.rank.schedule import by_mix, claim_order  # noqa: E402
from hpcinfer.rank.work import ClaimedWork, Claimer  # noqa: E402
from hpcinfer.rundir.claims import Claims, Heartbeat  # noqa: E402
from hpcinfer.rundir.files import atomic_write_json  # noqa: E402
from hpcinfer.rundir.manifest import Shard  # noqa: E402
from hpcinfer.rundir.paths import RunDir  # noqa: E402

OPEN_SHARDS = 2  # shards a fake rank holds open at once (one batch of room, the next joining)
STEP_S = 0.05  # the fake engine's step


# ---- counting metadata operations -----------------------------------------------------------
class Counter:
    """Counts (and delays) metadata operations, per rank: a thread is attributed to the rank
    that registered it (its engine loop, its heartbeat, its claimer)."""

    NAMES = ("open", "stat", "lstat", "listdir", "scandir", "link", "rename", "replace", "unlink", "mkdir")

    def __init__(self) -> None:
        self.latency_s = 0.0
        self.by_thread: Dict[int, int] = {}  # thread ident -> rank
        self.counts: Dict[int, int] = {}  # rank (-1: unattributed) -> operations
        self.by_name: Dict[str, int] = {}  # operation -> count
        self.by_where: Dict[str, Dict[str, int]] = {}  # where (the calls it was made in) -> operation -> count
        self.lock = threading.Lock()
        self.saved: Dict[str, object] = {}

    def install(self) -> None:
        for name in self.NAMES:
            self.saved[name] = getattr(os, name)
            setattr(os, name, self._wrap(getattr(os, name), name))
        self.saved["io.open"] = io.open
        wrapped = self._wrap(io.open, "open()", skip_fd=True)
        io.open = builtins.open = wrapped

    def uninstall(self) -> None:
        if not self.saved:
            return
        for name in self.NAMES:
            setattr(os, name, self.saved[name])
        io.open = builtins.open = self.saved["io.open"]
        self.saved = {}

    def _wrap(self, fn, name: str, skip_fd: bool = False):
        def counted(*args, **kw):
            if not (skip_fd and args and isinstance(args[0], int)):
                rank = getattr(WHERE, "rank", None)
                if rank is None:
                    rank = self.by_thread.get(threading.get_ident(), -1)
                where = " > ".join(getattr(WHERE, "stack", None) or ["other"])
                with self.lock:
                    self.counts[rank] = self.counts.get(rank, 0) + 1
                    self.by_name[name] = self.by_name.get(name, 0) + 1
                    kinds = self.by_where.setdefault(where, {})
                    kinds[name] = kinds.get(name, 0) + 1
                if self.latency_s:
                    time.sleep(self.latency_s)
            return fn(*args, **kw)

        return counted

    def attribute(self, thread: Optional[threading.Thread], rank: int) -> None:
        if thread is not None and thread.ident is not None:
            self.by_thread[thread.ident] = rank

    def reset(self) -> None:
        with self.lock:
            self.counts, self.by_thread, self.by_name, self.by_where = {}, {}, {}, {}


COUNTER = Counter()
WHERE = threading.local()  # .stack: the protocol calls the thread is in (traced), outermost first


@contextlib.contextmanager
def where(label: str) -> Iterator[None]:
    """Count the metadata operations made inside under `label` (nested: "outer > inner")."""
    stack = WHERE.__dict__.setdefault("stack", [])
    stack.append(label)
    try:
        yield
    finally:
        stack.pop()


def traced(owner: type, method: str, label: Union[str, Callable[..., str]]) -> None:
    """Wrap `owner.method` (in this process only) so that its metadata operations are counted
    under `label` (or `label(*args, **kw)`)."""
    fn = getattr(owner, method)

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with where(label if isinstance(label, str) else label(*args, **kw)):
            return fn(*args, **kw)

    setattr(owner, method, wrapper)


def trace_protocol() -> None:
    """Where the protocol's metadata operations come from: its calls (the claimer's looks, by
    kind; claiming; publishing; the heartbeat) and, inside them, what reads the run directory."""

    def look_kind(self, full: bool = True, claiming: bool = True) -> str:
        return "claim look" if not full else "full look" if claiming else "full look (watching)"

    for owner, method, label in [
        (ClaimedWork, "__init__", "start-up"),
        (ClaimedWork, "close", "end"),
        (Claimer, "over", "over (the run's end)"),
        (Claims, "look", look_kind),
        (Claims, "next", "next (claiming)"),
        (Claims, "take_turn", "take_turn (claiming)"),
        (Claims, "flush", "flush (.done names)"),
        (Claims, "check", "check"),
        (Heartbeat, "_beat", "heartbeat"),
        (Claims, "beats", "beats/ listing"),
        (Claims, "_list_bucket", "bucket listing"),
        (Claims, "_read", "claim file read"),
        (Claims, "_files_say_ended", "owner+record read"),
        (Claims, "dead", "dead() from files"),
        (Claims, "_create", "claim create"),
        (Claims, "confirm_done", "done/ listing"),
        (Claims, "gone_ranks", "gone ranks"),
        (RunDir, "is_done", "done marker stat"),
    ]:
        traced(owner, method, label)


STOP = threading.Event()  # --time-limit-s ran out: the ranks stop where they are


# ---- the work: real claims, or an in-memory pool ---------------------------------------------
class InstantPool:
    """Claims that cost nothing: one in-memory pool in claim order, under a lock, handed out by
    the same balancing policy (schedule.by_mix) as the claims."""

    def __init__(self, shards: List[Shard], world: int):
        self.todo, self.lock, self.world = [s.shard for s in claim_order(shards)], threading.Lock(), world
        self.by_id = {s.shard: s for s in shards}
        self.tokens, self.rows = {s.shard: s.tokens for s in shards}, {s.shard: s.rows for s in shards}
        self.unfinished = set(self.by_id)

    def work(self, rank: int):
        pool, held = self, set()

        class Instant:
            poll_s = 0.05

            def next(self):
                with pool.lock:
                    s = by_mix(pool.todo, pool.unfinished, pool.tokens, pool.rows, held, pool.world)
                    if s is None:
                        return None
                    pool.todo.remove(s)
                    held.add(s)
                    return pool.by_id[s]

            def exhausted(self):
                with pool.lock:
                    return not pool.todo

            def check(self, shard):
                pass

            def release(self, shard, done=None):
                with pool.lock:
                    held.discard(shard)
                    pool.unfinished.discard(shard)

            def close(self):
                pass

        return Instant()


def protocol_threads(work) -> List[threading.Thread]:
    """The background threads a ClaimedWork runs (heartbeat; claimer, where the protocol has one)."""
    found = []
    for obj in (work, getattr(work, "claims", None)):
        for value in vars(obj).values() if obj is not None else ():
            thread = getattr(value, "_thread", None)
            if isinstance(thread, threading.Thread):
                found.append(thread)
    return found


class SimClock:
    """--cheap: the simulated time of a process's ranks, advanced a step per round (all processes
    in lockstep), so that thousands of ranks stepped in one thread keep the protocol's timing."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@contextlib.contextmanager
def as_rank(rank: int) -> Iterator[None]:
    """Count the metadata operations made inside for `rank` (--cheap: one thread steps them all)."""
    WHERE.rank = rank
    try:
        yield
    finally:
        WHERE.rank = None


class FakeRank:
    """One rank: its work (ClaimedWork, or the instant pool) and a fake engine holding at most
    OPEN_SHARDS shards, each finishing `shard_s x tokens / mean` seconds after it opened. `step`
    is one iteration of its engine loop; with --cheap, the heartbeat's and the claimer's rounds
    run there too (no threads), on `clock`."""

    def __init__(self, rank: int, rd: Optional[RunDir], shards, args, pool, clock: Callable[[], float]):
        self.rank, self.rd, self.args, self.clock = rank, rd, args, clock
        self.mean_tokens = statistics.mean(s.tokens for s in shards)
        self.inline = args.cheap and pool is None
        if pool is None:
            self.work = ClaimedWork(
                rd,
                rank,
                args.ranks,
                f"rank{rank}-attempt",
                shards,
                args.lease_s,
                background=not args.cheap,
                clock=clock,
            )
            for t in protocol_threads(self.work):
                COUNTER.attribute(t, rank)
        else:
            self.work = pool.work(rank)
        self.open: Dict[int, float] = {}
        self.blocks: List[float] = []
        self.checks: List[float] = []
        self.ticks: List[float] = []
        self.got: List[int] = []
        self.start = self.end = clock()
        self.finished = False

    def step(self) -> bool:
        """One engine loop iteration; True when the rank is through (its work exhausted)."""
        work, spent = self.work, 0.0
        if self.inline:  # the heartbeat and the claimer's round, in this thread
            a = time.perf_counter()
            work.tick()
            self.ticks.append(time.perf_counter() - a)
        while len(self.open) < OPEN_SHARDS:
            a = time.perf_counter()
            shard = work.next()
            spent += time.perf_counter() - a
            if shard is None:
                break
            self.got.append(shard.shard)
            self.open[shard.shard] = self.clock() + self.args.shard_s * shard.tokens / self.mean_tokens
        now = self.clock()
        for s in [s for s, end in self.open.items() if end <= now]:
            a = time.perf_counter()
            work.check(s)  # before the shard's last write: not claiming, timed apart
            self.checks.append(time.perf_counter() - a)
            if self.rd is not None:
                with where("done marker (the engine)"):
                    atomic_write_json(self.rd.done_marker(s), {"shard": s, "rank": self.rank}, durable=False)
            a = time.perf_counter()
            work.release(s, done=True)
            spent += time.perf_counter() - a
            del self.open[s]
        if not self.open:
            a = time.perf_counter()
            self.finished = work.exhausted()
            spent += time.perf_counter() - a
        self.blocks.append(spent)
        self.end = self.clock()
        return self.finished

    def close(self) -> None:
        self.work.close()
        self.end = self.clock()

    def result(self) -> Dict:
        return dict(
            end=self.end,
            start=self.start,
            claimed=len(self.got),
            blocks=self.blocks,
            checks=self.checks,
            got=self.got,
            ticks=self.ticks,
        )


def rank_thread(rank: int, rd: Optional[RunDir], shards, args, pool, start: threading.Barrier, out: Dict) -> None:
    """A rank as a thread of its own (with its heartbeat and claimer threads), on the real clock."""
    COUNTER.attribute(threading.current_thread(), rank)
    fake = FakeRank(rank, rd, shards, args, pool, time.monotonic)
    start.wait()
    fake.start = time.monotonic()
    try:
        while not STOP.is_set() and not fake.step():
            time.sleep(max(getattr(fake.work, "poll_s", 0.0), args.step_s))
    finally:
        fake.close()
    out[rank] = fake.result()


def make_shards(n: float) -> List[Shard]:
    """`n` shards of skewed sizes (every 10th four times the rest), as a token-cut workload."""
    return [Shard(i, i % 1, "x", 0, 10, 0, 4000 if i % 10 == 0 else 1000) for i in range(int(n))]


def run_side(side: str, args, root: Path) -> Dict:
    shards = make_shards(args.ranks * args.shards_per_rank)
    rd = None
    if side == "claims":
        rd = RunDir(root / f"run-{time.monotonic_ns()}")
        rd.create()
    pool = InstantPool(shards, args.ranks) if side == "instant" else None
    procs = args.procs if side == "claims" else 1
    wall = time.monotonic()
    if procs == 1 and not args.cheap:
        gate = threading.Barrier(2)
        box: Dict = {}
        main = threading.Thread(
            target=lambda: box.update(run_ranks(range(args.ranks), rd, shards, args, pool, gate)), daemon=True
        )
        main.start()
        gate.wait()
        main.join()
        results = [box]
    else:  # blocks of ranks in processes of their own (forked), each with its threads (or its round)
        ctx = multiprocessing.get_context("fork")
        per = -(-args.ranks // procs)
        blocks_ = [range(i, min(args.ranks, i + per)) for i in range(0, args.ranks, per)]
        gate = ctx.Barrier(len(blocks_) + 1)
        lockstep = Lockstep(ctx, len(blocks_), args.ranks)
        files = [root / f"result-{time.monotonic_ns()}-{i}.pickle" for i in range(len(blocks_))]

        def child(b: range, path: Path) -> None:
            if args.cheap:
                res = run_cheap(b, rd, shards, args, pool, gate, lockstep)
            else:
                res = run_ranks(b, rd, shards, args, pool, gate)
            path.write_bytes(pickle.dumps(res))
            os._exit(0)

        children = [ctx.Process(target=child, args=(b, f)) for b, f in zip(blocks_, files)]
        for c in children:
            c.start()
        gate.wait()
        for c in children:
            c.join()
        if any(c.exitcode != 0 or not f.exists() for c, f in zip(children, files)):
            sys.exit(f"{side}: a process of ranks failed: exit codes {[c.exitcode for c in children]}")
        results = [pickle.loads(f.read_bytes()) for f in files]
    wall = time.monotonic() - wall
    out: Dict[int, Dict] = {}
    ops: Dict[int, int] = {}
    by_name: Dict[str, int] = {}
    by_where: Dict[str, Dict[str, int]] = {}
    incomplete = False
    for res in results:
        out.update(res["out"])
        for r, n in res["counts"].items():
            ops[r] = ops.get(r, 0) + n
        for k, v in res["by_name"].items():
            by_name[k] = by_name.get(k, 0) + v
        for w, kinds in res["by_where"].items():
            for k, v in kinds.items():
                by_where.setdefault(w, {})[k] = by_where.get(w, {}).get(k, 0) + v
        incomplete |= res["incomplete"]
    makespan = max(o["end"] for o in out.values()) - min(o["start"] for o in out.values())
    claims = sum(o["claimed"] for o in out.values())
    if not incomplete and (claims != len(shards) or (rd is not None and len(rd.done_shards()) != len(shards))):
        seen: Dict[int, List[int]] = {}
        for r, o in out.items():
            for s in o["got"]:
                seen.setdefault(s, []).append(r)
        twice = {s: rs for s, rs in seen.items() if len(rs) > 1}
        gens = sorted(p.name for p in rd.claims_dir.iterdir() if not p.name.endswith(".0")) if rd else []
        sys.exit(f"{side}: {claims} claims of {len(shards)} shards: twice {twice}; takeovers {gens[:20]}")
    per_rank = sorted(ops.get(r, 0) / max(1, out[r]["claimed"]) for r in range(args.ranks))
    blocks = sorted(b * 1000 for o in out.values() for b in o["blocks"])
    checks = sorted(b * 1000 for o in out.values() for b in o["checks"])
    ticks = sorted(b * 1000 for o in out.values() for b in o["ticks"])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0.0  # noqa: E731
    total = sum(ops.values())
    return dict(
        makespan=makespan,
        wall=wall,
        incomplete=f"stopped after {args.time_limit_s:.0f} s: {claims} of {len(shards)} shards claimed"
        if incomplete
        else "",
        ops_per_claim=total / max(1, claims),
        ops_per_claim_p99=q(per_rank, 0.99),
        block_p50=q(blocks, 0.5),
        block_p99=q(blocks, 0.99),
        block_max=blocks[-1] if blocks else 0.0,
        check_p99=q(checks, 0.99),
        tick_p99=q(ticks, 0.99),
        job_ops_per_s=total / makespan,
        ops=total,
        by_name=dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
        by_where=by_where,
    )


def counted(out: Dict[int, Dict], incomplete: bool) -> Dict:
    """A process's results, with its operation counts."""
    return dict(
        out=out,
        counts=dict(COUNTER.counts),
        by_name=dict(COUNTER.by_name),
        by_where={w: dict(k) for w, k in COUNTER.by_where.items()},
        incomplete=incomplete,
    )


def run_ranks(ranks: range, rd, shards, args, pool, gate) -> Dict:
    """Ranks `ranks` as threads of this process; they start when `gate` (shared with the caller)
    opens. Their results, operation counts (from their start-up on) and whether the time limit
    stopped them."""
    out: Dict[int, Dict] = {}
    start = threading.Barrier(len(ranks) + 1)
    COUNTER.reset()
    threads = [
        threading.Thread(target=rank_thread, args=(r, rd, shards, args, pool, start, out), daemon=True) for r in ranks
    ]
    for t in threads:
        t.start()
    gate.wait()
    start.wait()
    t0 = time.monotonic()
    STOP.clear()
    for t in threads:
        t.join(max(0.0, t0 + args.time_limit_s - time.monotonic()))
    incomplete = any(t.is_alive() for t in threads)
    STOP.set()
    for t in threads:
        t.join()
    STOP.clear()
    return counted(out, incomplete)


class Lockstep:
    """--cheap: the processes' rounds in step. Each round every process steps its ranks once; then
    all agree whether any rank is left (and whether the time limit passed) and advance their
    simulated clocks by one engine step together, so that no process's ranks run ahead of
    another's (a beat would look stalled to them)."""

    def __init__(self, ctx, parties: int, ranks: int):
        self.stepped, self.agreed = ctx.Barrier(parties), ctx.Barrier(parties)
        self.left, self.stop = ctx.Value("i", ranks), ctx.Value("b", 0)

    def round_over(self, finished: int, out_of_time: bool) -> bool:
        """This process's ranks that finished this round; whether every process is through."""
        with self.left.get_lock():
            self.left.value -= finished
        if out_of_time:
            self.stop.value = 1
        self.stepped.wait()
        over = self.left.value <= 0 or bool(self.stop.value)
        self.agreed.wait()  # every process has read them before any process changes them again
        return over


def run_cheap(ranks: range, rd, shards, args, pool, gate, lockstep: Lockstep) -> Dict:
    """--cheap: ranks `ranks` stepped round-robin in this one thread on a simulated clock (an
    engine step per round), the processes in lockstep. Results as `run_ranks`'."""
    COUNTER.reset()
    clock = SimClock()
    fakes = []
    for r in ranks:
        with as_rank(r):
            fakes.append(FakeRank(r, rd, shards, args, pool, clock))
    gate.wait()
    deadline = time.monotonic() + args.time_limit_s
    active = list(fakes)
    while True:
        for fake in active:
            with as_rank(fake.rank):
                fake.step()
        through = [f for f in active if f.finished]
        for fake in through:
            with as_rank(fake.rank):
                fake.close()
        active = [f for f in active if not f.finished]
        if lockstep.round_over(len(through), time.monotonic() > deadline):
            break
        clock.t += args.step_s
    for fake in active:  # stopped by the time limit
        with as_rank(fake.rank):
            fake.close()
    return counted({f.rank: f.result() for f in fakes}, bool(active))


def breakdown(side: str, by_where: Dict[str, Dict[str, int]], shards: float, floor: float = 0.05) -> List:
    """Rows: ops per claim by where they were made (the protocol call, and what inside it), each
    with its kinds; those under `floor` per claim together in one row."""
    rows, rest = [], 0.0
    for w, kinds in sorted(by_where.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(kinds.values()) / shards
        if total < floor:
            rest += total
            continue
        each = ", ".join(f"{k} {v / shards:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        rows.append((f"{side}: per claim in {w}", f"{total:.2f} ({each})"))
    if rest:
        rows.append((f"{side}: per claim elsewhere (each under {floor})", f"{rest:.2f}"))
    return rows


def spread(xs: List[float], fmt: str) -> str:
    mid = statistics.median(xs)
    return format(mid, fmt) if len(xs) == 1 else f"{format(mid, fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--shards-per-rank", type=float, default=8)
    ap.add_argument("--op-latency-ms", type=float, default=0.0)
    ap.add_argument("--shard-s", type=float, default=2.0, help="a mean shard's fake generation time")
    ap.add_argument("--step-s", type=float, default=None, help="the fake engine's step (default: shard-s / 40)")
    ap.add_argument("--lease-s", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--time-limit-s", type=float, default=170.0, help="stop a side here and report so far")
    ap.add_argument("--sides", default="instant,claims")
    ap.add_argument("--procs", type=int, default=1, help="claims side: the ranks in this many processes")
    ap.add_argument(
        "--cheap",
        action="store_true",
        help="thousands of ranks: each process steps its ranks round-robin in one loop on a simulated "
        "clock (a rank's heartbeat and claimer run in its loop, once per step; ops cost no time), "
        "defaults 10,000 ranks x 0.5 shards, lease 600 s, 20 s shards, 2 s steps, 2 processes, time limit 900 s",
    )
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    if args.cheap:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for key, value in dict(
            ranks=10000, shards_per_rank=0.5, lease_s=600.0, shard_s=20.0, step_s=2.0, procs=2, time_limit_s=900.0
        ).items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
        if "--sides" not in given:
            args.sides = "claims"
    if args.step_s is None:
        args.step_s = max(STEP_S, args.shard_s / 40)
    sides = args.sides.split(",")
    threading.stack_size(256 * 1024)
    COUNTER.install()
    trace_protocol()
    results: Dict[str, List[Dict]] = {s: [] for s in sides}
    try:
        with work_dir("hpcinfer-scale-", args.tmp, args.keep) as root:
            warm = argparse.Namespace(
                **{**vars(args), "ranks": 2, "shards_per_rank": 2, "shard_s": 0.05, "step_s": STEP_S}
            )
            for side in sides:  # warm-up: imports, first directory creation
                run_side(side, warm, root)
            COUNTER.latency_s = 0.0 if args.cheap else args.op_latency_ms / 1000  # simulated: ops take no time
            try:
                for _ in range(args.repeats):
                    for side in sides:  # interleaved
                        results[side].append(run_side(side, args, root))
            finally:  # cleaning up is no metadata server's business (and 1 ms per file is slow)
                COUNTER.latency_s = 0.0
                COUNTER.uninstall()
    finally:
        COUNTER.uninstall()
    rows = machine_lines() + [
        (
            "workload",
            f"{args.ranks} ranks x {args.shards_per_rank} shards, mean shard {args.shard_s} s (every 10th 4x), "
            f"{OPEN_SHARDS} open per rank, lease {args.lease_s} s, op latency {args.op_latency_ms} ms, "
            f"{args.repeats} repeat(s): median (min-max)",
        )
    ]
    for side, rs in results.items():
        get = lambda k, rs=rs: [r[k] for r in rs]  # noqa: E731
        rows += [
            (f"{side}: makespan s" + (" (simulated)" if args.cheap else ""), spread(get("makespan"), ".2f")),
            (f"{side}: wall time s", spread(get("wall"), ".1f")),
            (
                f"{side}: metadata ops per claim, mean / p99 over ranks",
                f"{spread(get('ops_per_claim'), '.1f')} / {spread(get('ops_per_claim_p99'), '.1f')}",
            ),
            (
                f"{side}: engine loop blocked per iteration ms p50 / p99 / max",
                f"{spread(get('block_p50'), '.3f')} / {spread(get('block_p99'), '.3f')} / {spread(get('block_max'), '.1f')}",
            ),
            (f"{side}: job metadata ops/s", spread(get("job_ops_per_s"), ",.0f")),
        ]
        if any(r["incomplete"] for r in rs):
            rows.append((f"{side}: INCOMPLETE", "; ".join(r["incomplete"] for r in rs if r["incomplete"])))
        if side != "instant":
            by = rs[-1]["by_name"]
            per = ", ".join(f"{k} {v / (args.ranks * args.shards_per_rank):.1f}" for k, v in by.items())
            if args.cheap:
                rows.append(
                    (f"{side}: the rank's heartbeat + claimer round in its loop ms p99", spread(get("tick_p99"), ".3f"))
                )
            rows += [
                (f"{side}: check before a write ms p99", spread(get("check_p99"), ".3f")),
                (f"{side}: ops per claim by kind (last repeat)", per),
            ]
            rows += breakdown(side, rs[-1]["by_where"], args.ranks * args.shards_per_rank)
    proto = next((s for s in reversed(sides) if s != "instant"), sides[-1])  # the last line's side
    last = results[proto]
    if "instant" in results and proto != "instant":
        base = statistics.median(r["makespan"] for r in results["instant"])
        rows.append(
            (
                f"{proto}: job metadata ops/s over the instant makespan (upper bound)",
                spread([r["ops"] / base for r in last], ",.0f"),
            )
        )
        rows.append(
            (f"{proto}: makespan overhead vs instant", spread([r["makespan"] / base - 1 for r in last], "+.1%"))
        )
    print_table(f"Claim protocol at scale: {args.ranks} ranks", rows)
    med = lambda k: statistics.median(r[k] for r in last)  # noqa: E731
    print(
        f"ranks={args.ranks} ops_per_claim={med('ops_per_claim'):.1f} "
        f"claim_block_ms_p99={med('block_p99'):.3f} job_ops_per_s={med('job_ops_per_s'):.0f}"
    )


if __name__ == "__main__":
    main()
