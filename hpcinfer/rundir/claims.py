"""Dynamic work distribution: the ranks of the dynamic schedule claim shards from the run directory.

The contract, under the run directory:

    claims/<shard>.<gen>   a claim of a shard: {"rank", "token", "host"}, a temp file hard-linked to
                           that name (the link fails if it exists: atomic on local disks and NFS
                           alike). The holder is the highest generation; taking a claim over
                           creates gen+1, so of two ranks taking over the same claim exactly one
                           wins, and a shard never has two live holders.
    ranks/<r>.beat         "<attempt token> <counter>", rewritten every lease_s/4 by each attempt.

A claim is *dead*, and may be taken over, when the attempt that made it
  - was superseded (`ranks/<r>.owner` names a newer attempt of that rank: it restarted),
  - recorded that it ended (`ranks/<r>.json` carries its token and a state in records.TERMINAL),
  - or has not advanced its heartbeat for `lease_s` seconds, timed on the observer's own clock
    (hosts' clocks are never compared).
  - or cannot be read (torn by a crash: claim files are not fsynced): the claim is recorded as a
    repair (integrity.py), left in place (generations are write-once) and taken over.
A shard is done only by its done marker, never by a claim. A rank that finds its claim taken
over stops writing that shard (`ClaimLost`); rows two attempts both produced are kept once by
the shard's assembly. `claimable` is the pure protocol, rank/schedule.py the balancing policy,
`Claims` does the I/O, `Heartbeat` the beat.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from hpcinfer.errors import one_line
from hpcinfer.rundir.files import atomic_write
from hpcinfer.rundir.integrity import READ_ERRORS, record, relative
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import TERMINAL, Repair

UNREADABLE = "<unreadable>"  # the token of a claim whose file cannot be read: dead


class ClaimLost(Exception):
    """Another rank took this rank's claim of a shard over (it looked dead)."""


@dataclass(frozen=True)
class Claim:
    shard: int
    gen: int
    rank: int
    token: str  # the attempt that made it (its RankRecord.token)


def claimable(
    order: Sequence[int],
    done: Set[int],
    holders: Dict[int, Claim],
    dead: Callable[[Claim], bool],
    rank: int,
    token: str,
) -> List[Tuple[int, int, bool]]:
    """What attempt `token` of `rank` may claim now, in priority order: (shard, generation to
    create, whether an earlier attempt of this rank held it). Pure.

    Shards an earlier attempt of this rank held come first (their durable parts are here); then the
    shards of `order` that are unclaimed or whose holder is dead. Live claims, done shards and this
    attempt's own claims never appear."""
    own, rest = [], []
    for s in order:
        if s in done:
            continue
        c = holders.get(s)
        if c is None:
            rest.append((s, 0, False))
        elif c.token != token and dead(c):
            (own if c.rank == rank else rest).append((s, c.gen + 1, c.rank == rank))
    return own + rest


def parse_claim_name(name: str) -> Optional[Tuple[int, int]]:
    """(shard, gen) of a claim file name '<shard>.<gen>', None for anything else (temp files)."""
    stem, _, gen = name.partition(".")
    return (int(stem), int(gen)) if stem.isdigit() and gen.isdigit() else None


class Claims:
    """One attempt's view of the claims: claim, check, take over."""

    def __init__(
        self,
        rd: RunDir,
        rank: int,
        token: str,
        order: Sequence[int],
        lease_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rd, self.rank, self.token, self.order = rd, rank, token, list(order)
        self.lease_s, self.clock = lease_s, clock
        self.dir = rd.claims_dir
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
        """A claim file's content (write-once, so read once); an unreadable one is a dead claim
        of no rank, recorded as a repair (once per claim: the record's name is the claim's)."""
        key = (shard, gen)
        if key not in self._seen:
            path = self.rd.claim(shard, gen)
            try:
                with open(path) as f:
                    info = json.load(f)
                self._seen[key] = Claim(shard, gen, int(info["rank"]), str(info["token"]))
            except READ_ERRORS as e:
                self._seen[key] = Claim(shard, gen, -1, UNREADABLE)
                why = f"unreadable: {one_line(str(e))}"
                then = f"kept in place and taken over as a dead claim (shard {shard} goes on from its durable parts)"
                repair = Repair(
                    "claim", relative(self.rd, path), why, then, f"rank {self.rank} ({self.token})", time.time()
                )
                record(self.rd, repair, name=f"claim-{path.name}.json")
        return self._seen[key]

    def dead(self, c: Claim) -> bool:
        """Whether the attempt behind `c` is gone (see the module docstring)."""
        if c.token == UNREADABLE:
            return True
        try:
            owner = self.rd.rank_owner(c.rank).read_text()
        except FileNotFoundError:
            owner = None
        if owner is not None and owner != c.token:
            return True
        record = self.rd.read_rank(c.rank)
        if record is not None and record.token == c.token and record.state in TERMINAL:
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
    def next(self, choose: Optional[Callable[[List[int], List[int], int], Optional[int]]] = None) -> Optional[int]:
        """Claim a shard and return it, or None when nothing is claimable now. `choose(candidates,
        unfinished, gone)` (rank/schedule.py's policy; default: the first candidate) picks among the
        claimable shards in priority order, given the shards not done and how many other ranks
        are gone (see `gone_ranks`); a shard an earlier attempt of this rank held is taken first
        whatever the policy. Losing a race for one shard just moves on to the next."""
        for _ in range(len(self.order) + 1):
            done, holders = self.rd.done_shards(), self.holders()
            dead = {c for s, c in holders.items() if s not in done and c.token != self.token and self.dead(c)}
            found = claimable(self.order, done, holders, dead.__contains__, self.rank, self.token)
            if not found:
                return None
            if found[0][2] or choose is None:
                shard, gen, _ = found[0]
            else:
                shard = choose(
                    [s for s, _, _ in found], [s for s in self.order if s not in done], len(self.gone_ranks(dead))
                )
                if shard is None:
                    return None
                gen = next(g for s, g, _ in found if s == shard)
            if self._create(shard, gen):
                self.mine[shard] = gen
                return shard
        return None

    def gone_ranks(self, dead: Set[Claim]) -> Set[int]:
        """Other ranks whose latest attempt holds one of the `dead` claims: they will not come back
        for their share (a superseded attempt's rank has restarted and will)."""
        gone = set()
        for rank, token in {(c.rank, c.token) for c in dead if c.rank not in (self.rank, -1)}:
            try:
                latest = self.rd.rank_owner(rank).read_text()
            except FileNotFoundError:
                latest = token
            if latest == token:
                gone.add(rank)
        return gone

    def _create(self, shard: int, gen: int) -> bool:
        """Write the claim to a temp file, then hard-link it to its name: the link fails if the
        name exists (atomic on local filesystems and NFS alike), and readers never see it half
        written."""
        fd, tmp = tempfile.mkstemp(prefix=".claim.", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"rank": self.rank, "token": self.token, "host": socket.gethostname()}, f)
            os.link(tmp, self.rd.claim(shard, gen))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def check(self, shard: int) -> None:
        """Raise ClaimLost when this attempt no longer holds `shard` (a newer claim exists)."""
        gen = self.mine.get(shard)
        if gen is None or self.rd.claim(shard, gen + 1).exists():
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

    def start(self) -> Heartbeat:
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
