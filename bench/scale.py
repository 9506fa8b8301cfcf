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
claiming calls (next, release, exhausted) per loop iteration (p50, p99, max ms), `check` apart, the job's metadata ops per second, makespans and the overhead against `instant`.
The last line: `ranks=R ops_per_claim=X claim_block_ms_p99=Y job_ops_per_s=Z`.
"""

from __future__ import annotations

import argparse
import builtins
import io
import multiprocessing
import os
import pickle
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import machine_lines, print_table, work_dir  # noqa: E402

from hpcinfer.rank.schedule import by_mix, claim_order  # noqa: E402
from hpcinfer.rank.work import ClaimedWork  # noqa: E402
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
                rank = self.by_thread.get(threading.get_ident(), -1)
                with self.lock:
                    self.counts[rank] = self.counts.get(rank, 0) + 1
                    self.by_name[name] = self.by_name.get(name, 0) + 1
                if self.latency_s:
                    time.sleep(self.latency_s)
            return fn(*args, **kw)

        return counted

    def attribute(self, thread: Optional[threading.Thread], rank: int) -> None:
        if thread is not None and thread.ident is not None:
            self.by_thread[thread.ident] = rank

    def reset(self) -> None:
        with self.lock:
            self.counts, self.by_thread, self.by_name = {}, {}, {}


COUNTER = Counter()
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


def fake_rank(rank: int, rd: Optional[RunDir], shards, args, pool, start: threading.Barrier, out: Dict) -> None:
    """One rank: its work (ClaimedWork, or the instant pool) and a fake engine holding at most
    OPEN_SHARDS shards, each finishing `shard_s x tokens / mean` seconds after it opened."""
    COUNTER.attribute(threading.current_thread(), rank)
    mean_tokens = statistics.mean(s.tokens for s in shards)
    if pool is None:
        work = ClaimedWork(rd, rank, args.ranks, f"rank{rank}-attempt", shards, args.lease_s, background=not args.cheap)
        for t in protocol_threads(work):
            COUNTER.attribute(t, rank)
    else:
        work = pool.work(rank)
    start.wait()
    t0 = time.monotonic()
    open_: Dict[int, float] = {}
    blocks, checks, ticks, claimed, got = [], [], [], 0, []
    try:
        while not STOP.is_set():
            spent = 0.0
            if args.cheap and pool is None:  # the heartbeat and the claimer's round, in this thread
                a = time.perf_counter()
                work.tick()
                ticks.append(time.perf_counter() - a)
            while len(open_) < OPEN_SHARDS:
                a = time.perf_counter()
                shard = work.next()
                spent += time.perf_counter() - a
                if shard is None:
                    break
                claimed += 1
                got.append(shard.shard)
                open_[shard.shard] = time.monotonic() + args.shard_s * shard.tokens / mean_tokens
            now = time.monotonic()
            for s in [s for s, end in open_.items() if end <= now]:
                a = time.perf_counter()
                work.check(s)  # before the shard's last write: not claiming, timed apart
                checks.append(time.perf_counter() - a)
                if rd is not None:
                    atomic_write_json(rd.done_marker(s), {"shard": s, "rank": rank}, durable=False)
                a = time.perf_counter()
                work.release(s, done=True)
                spent += time.perf_counter() - a
                del open_[s]
            if not open_:
                a = time.perf_counter()
                exhausted = work.exhausted()
                spent += time.perf_counter() - a
                blocks.append(spent)
                if exhausted:
                    break
                time.sleep(max(work.poll_s, args.step_s))
                continue
            blocks.append(spent)
            time.sleep(args.step_s)  # an engine step
    finally:
        work.close()
    out[rank] = dict(
        end=time.monotonic(), start=t0, claimed=claimed, blocks=blocks, checks=checks, got=got, ticks=ticks
    )


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
    if procs == 1:
        gate = threading.Barrier(2)
        box: Dict = {}
        main = threading.Thread(
            target=lambda: box.update(run_ranks(range(args.ranks), rd, shards, args, pool, gate)), daemon=True
        )
        main.start()
        gate.wait()
        t0 = time.monotonic()
        main.join()
        results = [box]
    else:  # blocks of ranks in processes of their own (forked), each with its threads
        ctx = multiprocessing.get_context("fork")
        per = -(-args.ranks // procs)
        blocks_ = [range(i, min(args.ranks, i + per)) for i in range(0, args.ranks, per)]
        gate = ctx.Barrier(len(blocks_) + 1)
        files = [root / f"result-{time.monotonic_ns()}-{i}.pickle" for i in range(len(blocks_))]

        def child(b: range, path: Path) -> None:
            res = run_ranks(b, rd, shards, args, None, gate)
            path.write_bytes(pickle.dumps(res))
            os._exit(0)

        children = [ctx.Process(target=child, args=(b, f)) for b, f in zip(blocks_, files)]
        for c in children:
            c.start()
        gate.wait()
        t0 = time.monotonic()
        for c in children:
            c.join()
        if any(c.exitcode != 0 or not f.exists() for c, f in zip(children, files)):
            sys.exit(f"{side}: a process of ranks failed: exit codes {[c.exitcode for c in children]}")
        results = [pickle.loads(f.read_bytes()) for f in files]
    out: Dict[int, Dict] = {}
    ops: Dict[int, int] = {}
    by_name: Dict[str, int] = {}
    incomplete = False
    for res in results:
        out.update(res["out"])
        for r, n in res["counts"].items():
            ops[r] = ops.get(r, 0) + n
        for k, v in res["by_name"].items():
            by_name[k] = by_name.get(k, 0) + v
        incomplete |= res["incomplete"]
    makespan = max(o["end"] for o in out.values()) - t0
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
        incomplete=f"stopped after {args.time_limit_s:.0f} s: {claims} of {len(shards)} shards claimed"
        if incomplete
        else "",
        ops_per_claim=total / claims,
        ops_per_claim_p99=q(per_rank, 0.99),
        block_p50=q(blocks, 0.5),
        block_p99=q(blocks, 0.99),
        block_max=blocks[-1] if blocks else 0.0,
        check_p99=q(checks, 0.99),
        tick_p99=q(ticks, 0.99),
        job_ops_per_s=total / makespan,
        ops=total,
        by_name=dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
    )


def run_ranks(ranks: range, rd, shards, args, pool, gate) -> Dict:
    """Ranks `ranks` as threads of this process; they start when `gate` (shared with the caller)
    opens. Their results, operation counts (from their start-up on) and whether the time limit
    stopped them."""
    out: Dict[int, Dict] = {}
    start = threading.Barrier(len(ranks) + 1)
    COUNTER.reset()
    threads = [
        threading.Thread(target=fake_rank, args=(r, rd, shards, args, pool, start, out), daemon=True) for r in ranks
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
    return dict(out=out, counts=dict(COUNTER.counts), by_name=dict(COUNTER.by_name), incomplete=incomplete)


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
        help="thousands of ranks: one thread per rank (its heartbeat and claimer run in its loop, "
        "once per step), defaults 10,000 ranks x 0.5 shards, lease 600 s, 20 s shards, 2 s steps, 2 processes",
    )
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    if args.cheap:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for key, value in dict(
            ranks=10000, shards_per_rank=0.5, lease_s=600.0, shard_s=20.0, step_s=2.0, procs=2
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
    results: Dict[str, List[Dict]] = {s: [] for s in sides}
    try:
        with work_dir("hpcinfer-scale-", args.tmp, args.keep) as root:
            warm = argparse.Namespace(
                **{**vars(args), "ranks": 2, "shards_per_rank": 2, "shard_s": 0.05, "step_s": STEP_S}
            )
            for side in sides:  # warm-up: imports, first directory creation
                run_side(side, warm, root)
            COUNTER.latency_s = args.op_latency_ms / 1000
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
            (f"{side}: makespan s", spread(get("makespan"), ".2f")),
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
