"""Dynamic work distribution: ranks claim shards from the run directory, largest first.

The contract, under the run directory:

    claims/<shard>.<gen>   a claim of a shard, created with O_CREAT|O_EXCL (atomic, on NFS v3+ as
                           well): {"rank", "token", "host"}. The holder is the highest generation;
                           taking a claim over creates gen+1, so of two ranks taking over the same
                           claim exactly one wins, and a shard never has two live holders.
    ranks/<r>.beat         "<attempt token> <counter>", rewritten every lease_s/4 by each attempt.

A claim is *dead*, and may be taken over, when the attempt that made it
  - was superseded (`ranks/<r>.owner` names a newer attempt of that rank: it restarted),
  - recorded that it ended (`ranks/<r>.json` carries its token and says failed, stopped or done),
  - or has not advanced its heartbeat for `lease_s` seconds, timed on the observer's own clock
    (hosts' clocks are never compared).
A shard is done only by its done marker, never by a claim. A rank that finds its claim taken
over stops writing that shard (`ClaimLost`); rows two attempts both produced are kept once by
the shard's assembly. `pick` is the pure decision, `Claims` does the I/O, `Heartbeat` the beat.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

from .rundir import RunDir, atomic_write, shard_name


class ClaimLost(Exception):
    """Another rank took this rank's claim of a shard over (it looked dead)."""


@dataclass(frozen=True)
class Claim:
    shard: int
    gen: int
    rank: int
    token: str  # the attempt that made it (worker.RankState.token)


def pick(order: Sequence[int], done: Set[int], holders: Dict[int, Claim], dead: Callable[[Claim], bool],
         rank: int, token: str) -> Optional[Tuple[int, int]]:
    """The next (shard, generation to create) for attempt `token` of `rank`, or None. Pure.

    A shard an earlier attempt of this rank held comes first (its durable parts are here); then
    the first shard of `order` (largest first) that is unclaimed or whose holder is dead."""
    first = None
    for s in order:
        if s in done:
            continue
        c = holders.get(s)
        if c is None:
            first = first or (s, 0)
        elif c.token != token and dead(c):
            if c.rank == rank:
                return s, c.gen + 1
            first = first or (s, c.gen + 1)
    return first


def parse_claim_name(name: str) -> Optional[Tuple[int, int]]:
    """(shard, gen) of a claim file name '<shard>.<gen>', None for anything else (temp files)."""
    stem, _, gen = name.partition(".")
    return (int(stem), int(gen)) if stem.isdigit() and gen.isdigit() else None


class Claims:
    """One attempt's view of the claims: claim, check, take over."""

    def __init__(self, rd: RunDir, rank: int, token: str, order: Sequence[int], lease_s: float,
                 clock: Callable[[], float] = time.monotonic, sizes: Optional[Dict[int, int]] = None):
        self.rd, self.rank, self.token, self.order, self.lease_s, self.clock = rd, rank, token, list(order), lease_s, clock
        self.sizes = sizes or {}  # shard -> estimated tokens
        self.dir = rd.path / "claims"
        self.dir.mkdir(exist_ok=True, mode=0o700)
        self.mine: Dict[int, int] = {}  # shard -> generation this attempt holds
        self._beats: Dict[int, Tuple[Optional[str], float]] = {}  # rank -> (last beat seen, when it changed)
        self._seen: Dict[Tuple[int, int], Claim] = {}

    # ---- reading ----------------------------------------------------------------------
    def holders(self) -> Dict[int, Claim]:
        latest: Dict[int, int] = {}
        for name in os.listdir(self.dir):
            parsed = parse_claim_name(name)
            if parsed and parsed[1] >= latest.get(parsed[0], -1):
                latest[parsed[0]] = parsed[1]
        return {shard: self._read(shard, gen) for shard, gen in latest.items()}

    def _read(self, shard: int, gen: int) -> Claim:
        """A claim file's content (write-once, so read once)."""
        key = (shard, gen)
        if key not in self._seen:
            with open(self.dir / f"{shard_name(shard)}.{gen}") as f:
                info = json.load(f)
            self._seen[key] = Claim(shard, gen, info["rank"], info["token"])
        return self._seen[key]

    def dead(self, c: Claim) -> bool:
        """Whether the attempt behind `c` is gone (see the module docstring)."""
        try:
            owner = self.rd.rank_owner(c.rank).read_text()
        except FileNotFoundError:
            owner = None
        if owner is not None and owner != c.token:
            return True
        record = self.rd.read_optional(self.rd.rank_file(c.rank)) or {}
        if record.get("token") == c.token and record.get("state") in ("failed", "stopped", "done"):
            return True
        try:
            beat = self.rd.rank_beat(c.rank).read_text()
        except FileNotFoundError:
            beat = None
        now = self.clock()
        seen, since = self._beats.get(c.rank, (None, now))
        if beat != seen or c.rank not in self._beats:
            self._beats[c.rank] = (beat, now)
            return False
        return now - since >= self.lease_s

    # ---- claiming ---------------------------------------------------------------------
    def next(self, allow: Optional[Callable[[int, int], bool]] = None, fill: bool = True) -> Optional[int]:
        """Claim the next shard (see `pick`) and return it, or None when nothing is claimable now.
        When `allow(shard, tokens of all shards not done)` (if given) refuses the largest, the smallest
        is claimed instead if `fill` (the batch is not full): the batch stays full while the
        large shards spread over the ranks.
        Losing a race for one shard just moves on to the next."""
        for _ in range(len(self.order) + 1):
            done, holders = self.rd.done_shards(), self.holders()
            choice = pick(self.order, done, holders, self.dead, self.rank, self.token)
            if choice is None:
                return None
            if allow is not None and not allow(
                    choice[0], sum(self.sizes.get(s, 0) for s in self.order if s not in done)):
                if not fill:
                    return None
                choice = pick(self.order[::-1], done, holders, self.dead, self.rank, self.token)
            if self._create(*choice):
                self.mine[choice[0]] = choice[1]
                return choice[0]
        return None

    def _create(self, shard: int, gen: int) -> bool:
        """Write the claim to a temp file, then hard-link it to its name: the link fails if the
        name exists (atomic on local filesystems and NFS alike), and readers never see it half
        written."""
        fd, tmp = tempfile.mkstemp(prefix=".claim.", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"rank": self.rank, "token": self.token, "host": socket.gethostname()}, f)
            os.link(tmp, self.dir / f"{shard_name(shard)}.{gen}")
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def check(self, shard: int) -> None:
        """Raise ClaimLost when this attempt no longer holds `shard` (a newer claim exists)."""
        gen = self.mine.get(shard)
        if gen is None or (self.dir / f"{shard_name(shard)}.{gen + 1}").exists():
            raise ClaimLost(f"shard {shard} was taken over by another rank")

    def release(self, shard: int) -> None:
        self.mine.pop(shard, None)

    def unfinished(self) -> int:
        """Shards not done and not held by this attempt: while any, an idle rank stays to take
        over the claims of ranks that die."""
        done = self.rd.done_shards()
        return sum(1 for s in self.order if s not in done and s not in self.mine)


class Heartbeat:
    """Rewrites `ranks/<rank>.beat` every `interval` seconds from a daemon thread, so other ranks
    can tell this attempt is alive whatever the engine is doing."""

    def __init__(self, rd: RunDir, rank: int, token: str, interval: float):
        self.path, self.token, self.interval = rd.rank_beat(rank), token, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcinfer-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._beat(0)
        self._thread.start()
        return self

    def _beat(self, n: int) -> None:
        atomic_write(self.path, f"{self.token} {n}", durable=False)

    def _run(self) -> None:
        n = 1
        while not self._stop.wait(self.interval):
            try:
                self._beat(n)
            except OSError:  # a full or flaky filesystem: the next beat may work
                pass
            n += 1

    def stop(self) -> None:
        self._stop.set()
