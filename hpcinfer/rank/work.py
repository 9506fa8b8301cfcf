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

import time
from typing import Collection, List, Optional, Protocol, Set, runtime_checkable

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

    def release(self, shard: int) -> None:
        """This attempt is through with `shard` (finished, or dropped)."""
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
        verified = verify_done(rd, shards, f"rank {rank} ({token})")  # any rank may claim any shard
        self.done, self.repairs = verified.done, verified.repairs
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
            lambda candidates, unfinished, gone: schedule.by_mix(
                candidates, unfinished, self.tokens, self.rows, self.held, max(1, self.world - gone)
            )
        )
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
