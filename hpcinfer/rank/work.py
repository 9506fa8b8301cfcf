"""Where a rank's shards come from: the `Work` protocol the shard loop asks for its next shard,
and its two schedules. `StaticWork` (schedule.mode=static, and MoE lockstep) hands out the
rank's own shards of the manifest in order; `ClaimedWork` (schedule.mode=dynamic) claims shards
from the run directory at run time (rundir/claims.py), as the balancing policy (schedule.py)
allows, and keeps the attempt's heartbeat going while it lives.

Both decide what is done when the attempt starts by checking it (rundir/integrity.py): a done
shard whose marker or output is torn, missing or unreadable is set aside and recorded, and its
rows are generated again; `done` is what passed, `repairs` what was set aside.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Protocol, Set, Tuple, runtime_checkable

from hpcinfer.rank import schedule
from hpcinfer.rank.schedule import claim_order
from hpcinfer.rundir.claims import Claims, Heartbeat
from hpcinfer.rundir.integrity import verify_done
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import Repair


@runtime_checkable
class Work(Protocol):
    """The shards one attempt of a rank generates, as the shard loop (worker.py) takes them."""

    room_batches: int  # keep this many batches' worth of rows in the engine
    poll_s: float  # how long a rank with nothing open waits before asking `next` again
    done: Set[int]  # shards found done, and provably complete, when the attempt started
    repairs: List[Repair]  # what the attempt set aside then (torn or unreadable)

    def describe(self) -> str:
        """What there is to do, in a few words (the rank's log)."""
        ...

    def next(self) -> Optional[Shard]:
        """The next shard to open, or None: none now (ask again later, unless `exhausted`)."""
        ...

    def exhausted(self) -> bool:
        """Nothing is left that this rank may still have to do."""
        ...

    def check(self, shard: int) -> None:
        """Raise rundir.claims.ClaimLost when this attempt may no longer write `shard`."""
        ...

    def release(self, shard: int, done: Optional[bool] = None) -> None:
        """This attempt is through with `shard`: finished (`done`), or dropped."""
        ...

    def close(self) -> None:
        """The attempt ends: stop what runs in the background."""
        ...


class StaticWork:
    """schedule.mode=static (and MoE lockstep): this rank's own shards, in order."""

    room_batches = 2  # keep this many batches' worth of rows in the engine
    poll_s = 1.0  # unused: static work is exhausted once `next` finds nothing

    def __init__(self, rd: RunDir, mine: List[Shard], by: str = "a rank"):
        self.total = len(mine)
        verified = verify_done(rd, mine, by)
        self.done, self.repairs = verified.done, verified.repairs
        self.queue = [s for s in mine if s.shard not in self.done]

    def describe(self) -> str:
        return f"{len(self.queue)} of {self.total} shard(s) to do"

    def next(self) -> Optional[Shard]:
        return self.queue.pop(0) if self.queue else None

    def exhausted(self) -> bool:
        return not self.queue

    def check(self, shard: int) -> None:
        pass

    def release(self, shard: int, done: Optional[bool] = None) -> None:
        pass

    def close(self) -> None:
        pass


class Claimer:
    """ClaimedWork's background thread: it claims (rundir/claims.py) and keeps the next shard
    ready, so that the engine loop never waits on the filesystem. When the ready slot is empty
    and the loop has asked for a shard, or at once after the loop releases one (this rank's share
    grew), it takes the rank's turn (`Claims.take_turn`: no look), else makes a claim look (the
    holders/ bucket with unclaimed shards: one listing); a full look (beats/: dead ranks' claims
    to take over, their share to spread; the open buckets when some attempt ended or stalled, or
    when it claims from the look) at least every `sweep_s`; and while the rank is idle, a full
    look every `idle_s` (whether the run is over). A policy that declined, or found nothing, stays declined until one of these:
    what the others hold only ever shrinks the pool, so looking sooner cannot change its answer.
    Both intervals grow with the ranks of the run (ClaimedWork), so the job's metadata operations
    per second stay bounded however many ranks wait."""

    def __init__(
        self,
        claims: Claims,
        choose: Callable,
        sweep_s: float,
        idle_s: float,
        first: Optional[Callable] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.claims, self.choose, self.sweep_s, self.idle_s, self.clock = claims, choose, sweep_s, idle_s, clock
        self.first = first  # candidates only this rank wants, tried before any spreading (Claims.next)
        self.ready: Optional[int] = None  # a claimed shard not yet handed to the loop
        self.wanted = True  # the loop has room (it asked, or has not started)
        self.finished = False  # the latest look found nothing unfinished that this rank does not hold
        self.error: Optional[BaseException] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_full = self._last_idle = -float("inf")
        if claims.turns and not claims.has_turn:  # more ranks than shards: the turns' ranks claim them
            self._last_full = self._last_idle = clock()  # first, this one from its first idle look on
        self._thread = threading.Thread(target=self._run, name="hpcinfer-claimer", daemon=True)

    def start(self) -> Claimer:
        self._thread.start()
        return self

    # ---- the engine loop's side: memory only ------------------------------------------
    def take(self) -> Optional[int]:
        """The ready shard, or None at once (the claimer is told the loop has room)."""
        if self.error is not None:
            raise self.error
        with self._lock:
            shard, self.ready = self.ready, None
            news = shard is not None or not self.wanted  # asking again for nothing new is no news
            self.wanted = True
        if news:
            self._wake.set()
        return shard

    def changed(self) -> None:
        """The loop released a shard: look again now."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # ---- the claimer's thread ---------------------------------------------------------
    def over(self) -> bool:
        """Nothing unfinished, this rank holding nothing either, and every done marker there (a
        shard whose marker was set aside since is claimable again: look at once). While the rank
        still holds shards the run is not over for it, and there is nothing to look at again:
        waking here then made the claimer spin through the rank's last shards, a look and a done/
        listing per round (half the engine's speed on CPU, a metadata storm at the tail)."""
        if self.ready is not None or self.claims.mine or self.claims.unfinished() > 0:
            return False
        if self.claims.confirm_done():
            return True
        self._wake.set()
        return False

    def step(self) -> None:
        """One round of the claimer: claim if the loop wants a shard and was woken, or a look is
        due: its turn first (no look, `Claims.take_turn`), else from a claim look; and a full look
        when due (one that only watches the others, beats/ alone, unless the rank is idle)."""
        woken = self._wake.is_set()
        self._wake.clear()
        now = self.clock()
        self.claims.flush()
        with self._lock:
            need = self.wanted and self.ready is None
        full = now - self._last_full >= self.sweep_s or (not self.claims.mine and now - self._last_idle >= self.idle_s)
        if not ((need and woken) or full):
            return
        shard = self.claims.take_turn(self.choose) if need else None
        idle = not self.claims.mine
        look = self.claims.look(full=True, claiming=idle or (need and shard is None)) if full else None
        if need and shard is None:
            if look is None or not look.claiming:
                look = self.claims.look(full=False)  # a full one when this attempt never looked
                full = full or look.full
            shard = self.claims.next(self.choose, look, own_first=self.first)
        if shard is not None:
            with self._lock:
                self.ready, self.wanted = shard, False
        if look is not None:
            self._last_full, self._last_idle = (now if full else self._last_full), now
            self.finished = self.over()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as e:  # the loop raises it on its next take()
                self.error = e
                return
            self._wake.wait(min(self.sweep_s, self.idle_s))


class Tables:
    """A run's shards as ClaimedWork needs them: by id, tokens, rows, claim order, and where the
    shards at least as dense as a density end in it (the balancing policy's pool). The same for
    every rank of a run; ranks in one process (a simulation: bench/scale.py) share one."""

    _cache: Dict[int, Tuple[List[Shard], Tables]] = {}
    _lock = threading.Lock()

    def __init__(self, shards: List[Shard]):
        self.by_id = {s.shard: s for s in shards}
        self.tokens = {s.shard: s.tokens for s in shards}
        self.rows = {s.shard: s.rows for s in shards}
        self.order = [s.shard for s in claim_order(shards)]
        self.pred = schedule.chain_links(shards)  # prefix placement: a chain's previous shard
        # densities along the claim order only fall (it is densest first): negated, they rise
        self._neg = [-self.tokens[s] / max(1, self.rows[s]) for s in self.order]

    @classmethod
    def of(cls, shards: List[Shard]) -> Tables:
        with cls._lock:
            cached = cls._cache.get(id(shards))
            if cached is None or cached[0] is not shards:
                cls._cache.clear()
                cached = cls._cache[id(shards)] = (shards, cls(shards))
            return cached[1]

    def end_at_least(self, density: float) -> int:
        """Where in the claim order the shards at least as dense as `density` end."""
        return bisect.bisect_right(self._neg, -density)


class ClaimedWork:
    """schedule.mode=dynamic: shards claimed from the run directory (claims.py) as the balancing
    policy (`schedule.by_mix`) allows: every rank its share of the longest requests first, all
    started at once, short ones beside them. It keeps one batch of rows in its engine. An idle rank
    stays while other ranks hold unfinished shards, to take them over if they die. Claiming runs
    in a background thread (`Claimer`): `next` and `exhausted` never touch the filesystem.

    How often it looks grows with the ranks (`world`): a full look at least every
    max(min(15 s, lease/8), world/50 s), at most lease/2 (a dead rank's claims are taken over
    within 1.5 leases); an idle rank's every max(1 s, world/100 s), at most that. At 1,000 ranks:
    20 s and 10 s."""

    room_batches = 1
    poll_s = 0.05  # how often an idle engine loop asks again (memory only: the claimer looks)

    def __init__(
        self,
        rd: RunDir,
        rank: int,
        world: int,
        token: str,
        shards: List[Shard],
        lease_s: float,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        verified = verify_done(rd, shards, f"rank {rank} ({token})")  # any rank may claim any shard
        self.done, self.repairs = verified.done, verified.repairs
        self.tables = Tables.of(shards)
        self.by_id, self.world = self.tables.by_id, world
        self.tokens, self.rows = self.tables.tokens, self.tables.rows
        set_aside = {s for s in map(repaired_shard, self.repairs) if s is not None}
        beat_s = max(0.2, lease_s / 4)
        self.sweep_s = min(lease_s / 2, max(min(15.0, lease_s / 8), world / 50))
        self.idle_s = min(self.sweep_s, max(1.0, world / 100))
        # a live attempt's beat name, seen by looks sweep_s apart, stays unchanged up to beat_s +
        # sweep_s: only beyond that (with a margin) is it suspect (its files read, the buckets listed)
        suspect_s = min(0.9 * lease_s, max(3 * lease_s / 8, 1.1 * (beat_s + self.sweep_s)))
        self.claims = Claims(
            rd,
            rank,
            token,
            self.tables.order,
            lease_s,
            spread=world,
            notdone=sorted(set_aside),
            weights=self.tokens,
            suspect_s=suspect_s,
            clock=clock,
            turns=0 if self.tables.pred else world,  # prefix placement: chains decide, not turns
            done=self.done,
        )
        self.heartbeat = Heartbeat(rd, rank, token, beat_s, clock).start(thread=background)
        self.taken: Set[int] = set()  # shards this attempt claimed (a chain goes on after them)
        first = self._going_on if self.tables.pred else None
        self.claimer = Claimer(self.claims, self._choose, self.sweep_s, self.idle_s, first, clock)
        if background:
            self.claimer.start()

    def tick(self) -> None:
        """Without background threads (`background=False`: a simulation of thousands of ranks,
        bench/scale.py --cheap, on a simulated `clock`): the heartbeat and the claimer's round, in
        the caller's thread."""
        self.heartbeat.tick()
        self.claimer.step()

    def _choose(self, candidates: List[int], unfinished: List[int], gone: int) -> Optional[int]:
        # a rank that is gone leaves its share to the others
        world = max(1, self.world - gone)
        pool = lambda d: self.claims.weight_before(self.tables.end_at_least(d))  # noqa: E731
        if self.tables.pred:  # prefix placement: this rank's chains first (schedule.by_chain)
            mine = set(self.held) | self.taken
            return schedule.by_chain(
                candidates, self.tables.pred, unfinished, self.tokens, self.rows, self.held, mine, world, pool
            )
        return schedule.by_mix(candidates, unfinished, self.tokens, self.rows, self.held, world, pool=pool)

    def _going_on(self, candidates: List[int]) -> List[int]:
        """The candidates that continue a chain this rank runs (prefix placement)."""
        mine = set(self.held) | self.taken
        return [c for c in candidates if self.tables.pred.get(c) in mine]

    def describe(self) -> str:
        return f"claims from {self.claims.unfinished()} unfinished of {len(self.by_id)} shard(s), longest rows first"

    def next(self) -> Optional[Shard]:
        shard = self.claimer.take()
        if shard is None:
            return None
        self.taken.add(shard)
        return self.by_id[shard]

    @property
    def held(self) -> Collection[int]:
        """The shards this attempt holds (claimed, not yet released; the ready one included)."""
        with self.claims._lock:
            return list(self.claims.mine)

    def exhausted(self) -> bool:
        if self.claimer.error is not None:
            raise self.claimer.error
        return self.claimer.finished and self.claimer.ready is None and not self.claims.mine

    def check(self, shard: int) -> None:
        self.claims.check(shard)

    def release(self, shard: int, done: Optional[bool] = None) -> None:
        self.claims.release(shard, done)
        self.claimer.changed()

    def close(self) -> None:
        self.claimer.stop()
        clean = False
        with contextlib.suppress(OSError):
            self.claims.flush()  # done names before the beat name ends
            clean = self.claims.clean
        self.heartbeat.stop(clean=clean)


def repaired_shard(repair: Repair) -> Optional[int]:
    """The shard whose done marker or output a repair set aside (its path's stem), else None."""
    stem = Path(repair.path).name.split(".")[0]
    return int(stem) if repair.what in ("done marker", "shard output") and stem.isdigit() else None
