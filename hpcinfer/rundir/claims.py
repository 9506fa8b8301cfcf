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
At scale (thousands of ranks on a shared filesystem, where each metadata operation costs about a
millisecond at a metadata server the whole cluster shares) a rank learns all of this from four
listings per look, not from reading files per claim:

    holders/<shard>.<gen>.<rank>.<tag>  the claim's file itself, created there and hard-linked to
                           claims/<shard>.<gen> (the link decides the claim; a lost race removes
                           it): its name says who holds the claim without opening it. <tag>:
                           `attempt_tag(token)`.
    beats/<r>.<tag>.<n>    the attempt's heartbeat as a name, renamed to <n+1> each beat; to `fin`
                           when the attempt ends holding no claim that is not done (a clean end:
                           nothing of it to take over), else to `end` (it failed, stopped, or a
                           newer attempt of the rank started).
    holders/<bucket>.full  markers: a rank whose listing found every shard of a bucket claimed
    holders/<bucket>.done  (.full) or done (.done) says so, and the others read one listing of
                           holders/ instead of listing a bucket they never listed (`Claims.look`).
Ranks take turns (`Claims.take_turn`): rank r of R claims the shards at positions r, r+R, r+2R,
... of the claim order without any look, the link deciding as for any claim; looks claim what the
turns leave (a gone rank's, the tail's), and take over the claims of the dead first.
A holder whose beat name changed since the look before is alive; `end` (or `fin`) is dead at once; one
unchanged for `lease_s` is dead; one unchanged for 3/8 of the lease has its owner and record read
(once per rank, kept `cache_s`) to see whether it was superseded or ended. Claims without an
index name, or holders without a beat name (an older hpcinfer, a lost node's leftovers), are
read and judged from the files, as above, once per rank and look. Every change only ever
delays a takeover (a beat is timed from when the listing saw it), never hastens one; exclusivity
is the link's alone.

A shard is done only by its done marker, never by a claim. A rank that finds its claim taken
over stops writing that shard (`ClaimLost`); rows two attempts both produced are kept once by
the shard's assembly. `claimable` is the pure protocol, rank/schedule.py the balancing policy,
`Claims` does the I/O, `Heartbeat` the beat.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from hpcinfer.errors import one_line
from hpcinfer.rundir.integrity import READ_ERRORS, record, relative
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import TERMINAL, Repair

UNREADABLE = "<unreadable>"  # the token of a claim whose file cannot be read: dead
UNKNOWN = -2  # the rank of a claim whose holder is not known yet (a race just lost): live


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


@functools.lru_cache(maxsize=1 << 16)
def attempt_tag(token: str) -> str:
    """A short name-safe tag of an attempt's token, for file names (48 bits of its SHA-1)."""
    if token.startswith("#"):  # already a tag (a Claim known from its index name)
        return token[1:]
    return hashlib.sha1(token.encode()).hexdigest()[:12]


def parse_holder_name(name: str) -> Optional[Tuple[int, int, int, str, bool]]:
    """(shard, gen, rank, tag, done) of a holders/ name '<shard>.<gen>.<rank>.<tag>[.done]', None
    otherwise."""
    parts = name.split(".")
    done = len(parts) == 5 and parts[4] == "done"
    if len(parts) != 4 + done or not (parts[0].isdigit() and parts[1].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2]), parts[3], done


ENDED = "end"  # a beat name's last part: the attempt ended, and may have left claims to take over
FINISHED = "fin"  # the attempt ended with every claim it made done: nothing of it to take over
TERMINAL_BEATS = (ENDED, FINISHED)


def parse_beat_name(name: str) -> Optional[Tuple[int, str, str]]:
    """(rank, tag, counter or 'end' or 'fin') of a beats/ name '<rank>.<tag>.<n|end|fin>', None
    otherwise."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not (parts[2].isdigit() or parts[2] in TERMINAL_BEATS):
        return None
    return int(parts[0]), parts[1], parts[2]


def list_names(path: Path) -> List[str]:
    """A folder's names (one listing); none when it does not exist."""
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def make_dir(path: Path) -> None:
    """Create a folder (0700) unless it exists: one metadata operation either way (Path.mkdir's
    exist_ok costs a stat more when it exists, as it does for every rank but the first)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


BUCKET = 256  # shards per holders/ folder, in claim order


@dataclass(frozen=True)
class Layout:
    """The claim order cut into buckets of `size` shards (holders/<bucket>/). The same for every
    rank of a run (the order comes from the manifest); shared by the ranks of one process."""

    order: Tuple[int, ...]
    size: int
    pos: Dict[int, int]  # shard -> position in the order

    @property
    def count(self) -> int:
        return -(-len(self.order) // self.size)

    def bucket(self, shard: int) -> int:
        return self.pos[shard] // self.size

    def shards(self, b: int) -> Tuple[int, ...]:
        return self.order[b * self.size : (b + 1) * self.size]


@functools.lru_cache(maxsize=8)
def layout(order: Tuple[int, ...], size: int = BUCKET) -> Layout:
    return Layout(order, size, {s: i for i, s in enumerate(order)})


@dataclass
class Look:
    """One look at the run directory: the beats/ listing (a full look's; a claim look reuses the
    latest) and the holders/ buckets up to the first with unclaimed shards."""

    at: float  # the observer's clock when the beats were listed
    done: Set[int]  # shards known done, of the open buckets
    holders: Dict[int, Claim]  # the latest claim of the claimed shards of the open buckets
    beats: Dict[Tuple[int, str], str]  # (rank, tag) -> counter, or "end" / "fin"
    judged: Dict[Tuple[int, str], bool]  # (rank, tag) -> dead, filled as the look goes
    order: List[int]  # the shards of the open buckets up to the first with unclaimed shards
    tail: int  # where in the claim order the buckets after those start
    full: bool = True
    claiming: bool = True  # the buckets were listed up to the first with unclaimed shards (else: `order` is
    # only the dead claims known, as a full look that only watches the others leaves it)
    late: Optional[Dict[Tuple[int, str], str]] = None  # beats/ listed again (`Claims.dead_in`)


class Claims:
    """One attempt's view of the claims: claim, check, take over. `next` may run in a thread of
    its own (ClaimedWork's claimer) while `check` and `release` run in the engine loop.

    Partitioned: the claim order is cut into buckets of `bucket` shards, holders/<bucket>/; a
    bucket whose shards are all done is closed and never listed again; a look lists the open
    buckets up to the first with an unclaimed shard (a claim look: only that one), so what it
    reads does not grow with the run, nor does what an attempt keeps in memory."""

    RELOOK_AFTER = 2  # races lost on one look before looking again (the view is stale)

    def __init__(
        self,
        rd: RunDir,
        rank: int,
        token: str,
        order: Sequence[int],
        lease_s: float,
        clock: Callable[[], float] = time.monotonic,
        cache_s: Optional[float] = None,
        spread: int = 1,
        bucket: int = BUCKET,
        notdone: Sequence[int] = (),
        weights: Optional[Dict[int, int]] = None,
        suspect_s: Optional[float] = None,
        turns: int = 0,
        done: Collection[int] = (),
    ):
        self.rd, self.rank, self.token = rd, rank, token
        self.layout = layout(tuple(order), bucket)
        self.tag = attempt_tag(token)
        self.lease_s, self.clock = lease_s, clock
        self.cache_s = lease_s / 8 if cache_s is None else cache_s  # how long a file check is kept
        # a beat name unchanged this long: read the files (ClaimedWork sets it above its beat
        # interval plus its look interval, so that a live attempt seen between beats never is)
        self.suspect_s = 3 * lease_s / 8 if suspect_s is None else suspect_s
        self.spread = max(1, spread)  # after a lost race, try again this far down the candidates
        self.dir = rd.claims_dir
        make_dir(self.dir)
        make_dir(rd.holders_dir)
        self.mine: Dict[int, int] = {}  # shard -> generation this attempt holds
        self._lock = threading.Lock()  # guards `mine`, `_pending` (release runs in the engine loop)
        self._pending: List[Tuple[int, int, Optional[bool]]] = []  # released: (shard, gen, done or unknown)
        self._beats: Dict[int, Tuple[Optional[str], float]] = {}  # rank -> (last beat seen, when it changed)
        self.board = beat_board(str(rd.beats_dir), clock)  # the listings of beats/ (shared in a process)
        self._ended_seen: Set[Tuple[int, str]] = set()  # attempts whose `end` a full look saw
        self._files: Dict[Tuple[int, str], Tuple[bool, float]] = {}  # (rank, tag) -> (ended, checked at)
        self._seen: Dict[Tuple[int, int], Claim] = {}  # claim files read (write-once)
        # what the listings of the open buckets showed so far: names are parsed once
        self._names: Dict[int, Set[str]] = {}  # bucket -> its names at its latest listing
        self._latest: Dict[int, int] = {}  # shard -> latest generation
        self._index: Dict[Tuple[int, int], Dict[Tuple[int, str], bool]] = {}  # (shard, gen) -> {(rank, tag): done}
        self._holders: Dict[int, Claim] = {}
        self._unsure: Dict[int, float] = {}  # shard -> since when its index names disagree
        self._claimed = False  # whether `next` ran before
        self._lost: Set[int] = set()  # shards whose race was lost: judged at their bucket's next listing
        self.done_in: Dict[int, Set[int]] = {}  # open bucket -> its shards known done
        self._done: Set[int] = set()  # the same, all open buckets together
        self.closed: Set[int] = set()  # buckets all of whose shards are done
        self._full: Set[int] = set()  # buckets all of whose shards are claimed or done
        self._marks: Set[str] = set()  # holders/<bucket>.full and .done markers known to exist
        self.notdone: Dict[int, int] = {s: -1 for s in notdone}  # shard -> a gen whose done name is stale
        self.weights = weights or {}  # shard -> its weight (tokens), for `weight_before`
        self._left = [sum(self.weights.get(x, 0) for x in self.layout.shards(b)) for b in range(self.layout.count)]
        self._dead: Dict[int, Claim] = {}  # the dead claims the latest full look found
        self._by_attempt: Dict[Tuple[int, str], Set[int]] = {}  # (rank, tag) -> shards it held when seen
        self._raw: Dict[int, Set[str]] = {}  # bucket -> claim names listed but not parsed yet
        self._fulls = 0  # full looks so far
        self._open: Set[Tuple[int, int]] = set()  # (shard, gen) claimed by this attempt and not done yet
        self.last: Optional[Look] = None  # the latest look
        # taking turns (`take_turn`): this rank's next position in the claim order, every `turns`-th
        self.turns = max(0, turns)
        self._turn = rank if self.turns else len(self.layout.order)
        for s in done:  # done markers checked when the attempt started
            if s in self.layout.pos and s not in self.notdone:
                self._mark_done(s)

    @property
    def order(self) -> Tuple[int, ...]:
        return self.layout.order

    # ---- reading ----------------------------------------------------------------------
    def _bdir(self, b: int) -> Path:
        return self.rd.holders_dir / f"{b:06d}"

    def _list_bucket(self, b: int, lazy: bool = False) -> None:
        """One listing of bucket `b`: only names not seen before are parsed (holders names are
        write-once but for a lost race's, which is removed, and `.done`, which a rename adds), and
        only the shards they touch are looked at again. `lazy`: a claim's name only says its shard
        is claimed (a live holder, unknown); who holds it is parsed when a look needs to know
        (`_parse_raw`: some attempt ended or stalled)."""
        names = set(list_names(self._bdir(b)))
        old = self._names.get(b, set())
        raw = self._raw.setdefault(b, set())
        touched = set()
        for name, add in [(n, False) for n in old - names] + [(n, True) for n in names - old]:
            stem = name.partition(".")[0]
            named_shard = int(stem) if stem.isdigit() else None  # the shard the name is of
            live = named_shard is not None and named_shard not in self.notdone
            if (live and named_shard in self._done) or (not add and name.endswith(".done")):
                raw.discard(name)
                continue  # a shard known done: its names say nothing new
            if add and name.endswith(".done") and live:
                self._mark_done(named_shard)  # done: who held it does not matter any more
                if b in self.closed:
                    return
                continue
            if not add and name in raw:  # a name never parsed is gone: who holds its shard is
                raw.discard(name)  # not known any more (judged again: its claim file read if need be)
                if live:
                    touched.add(named_shard)
                continue
            if (
                add
                and lazy
                and named_shard is not None
                and named_shard not in self._lost
                and named_shard not in self._unsure
            ):
                gen = name.split(".", 2)[1]
                if gen.isdigit() and live:
                    shard, gen_ = named_shard, int(gen)
                    raw.add(name)
                    if gen_ > self._latest.get(shard, -1):
                        self._latest[shard] = gen_
                        self._holders[shard] = Claim(shard, gen_, UNKNOWN, "<not parsed>")
                    continue
            parsed = parse_holder_name(name)
            if parsed is None:
                continue
            shard, gen, rank, tag, done = parsed
            named = self._index.setdefault((shard, gen), {})
            if add:
                named[(rank, tag)] = done or named.get((rank, tag), False)
                if gen > self._latest.get(shard, -1):
                    self._latest[shard] = gen
            elif not done and not named.get((rank, tag), False):
                named.pop((rank, tag), None)  # a lost race's name, removed (not one renamed .done)
            touched.add(shard)
        self._names[b] = names
        self._judge(b, touched)

    def _parse_raw(self) -> None:
        """Parse the claim names `_list_bucket` left unparsed (lazy): who holds what."""
        for b, raw in list(self._raw.items()):
            if not raw or b in self.closed:
                continue
            touched = set()
            for name in raw:
                parsed = parse_holder_name(name)
                if parsed is None:
                    continue
                shard, gen, rank, tag, done = parsed
                self._index.setdefault((shard, gen), {})[(rank, tag)] = done
                if gen > self._latest.get(shard, -1):
                    self._latest[shard] = gen
                touched.add(shard)
            raw.clear()
            self._judge(b, touched)

    def _judge(self, b: int, touched: Set[int]) -> None:
        again = {s for s in set(self._unsure) | self._lost if self.layout.bucket(s) == b and s not in self._done}
        self._lost -= again
        for shard in touched | again:
            if shard not in self._done or shard in self.notdone:
                self._judge_holder(shard)

    def _judge_holder(self, shard: int) -> None:
        gen = self._latest.get(shard)
        if gen is None:
            return
        named = self._index.get((shard, gen), {})
        if self.notdone.get(shard) == -1:  # set aside before this attempt: stale at what is there now
            self.notdone[shard] = gen if any(named.values()) else gen - 1
        if named and any(named.values()) and gen > self.notdone.get(shard, -2):
            self._mark_done(shard)
        if len(named) == 1:
            rank, tag = next(iter(named))
            self._holders[shard] = Claim(shard, gen, rank, self.token if tag == self.tag else f"#{tag}")
            self._unsure.pop(shard, None)
        elif named and self.clock() - self._unsure.setdefault(shard, self.clock()) < self.cache_s:
            # a lost race's name not removed yet: held by someone, live (never taken over on
            # this); looked at again on the next listing, when the name is gone
            self._holders[shard] = Claim(shard, gen, UNKNOWN, "<unsure>")
        else:  # an older hpcinfer's, or a crash left a lost race's name beside it: read it
            self._unsure.pop(shard, None)
            self._holders[shard] = self._read(shard, gen)
        c = self._holders[shard]
        if c.rank != UNKNOWN:
            self._by_attempt.setdefault(
                (c.rank, c.token if c.token == UNREADABLE else attempt_tag(c.token)), set()
            ).add(shard)

    def _mark_done(self, shard: int) -> None:
        b = self.layout.bucket(shard)
        if b in self.closed:
            return
        done = self.done_in.setdefault(b, set())
        if shard not in done:
            done.add(shard)
            self._left[b] -= self.weights.get(shard, 0)
        self._done.add(shard)
        if len(done) == len(self.layout.shards(b)):
            self._close(b)

    def _close(self, b: int) -> None:
        """Every shard of `b` is done: forget it, never list it again (and say so: `_mark`)."""
        self.closed.add(b)
        self._mark(b, "done")
        for s in self.layout.shards(b):
            self._done.discard(s)
            self._holders.pop(s, None)
            self._unsure.pop(s, None)
            for g in range(self._latest.pop(s, -1) + 1):
                self._index.pop((s, g), None)
        self.done_in.pop(b, None)
        self._names.pop(b, None)
        self._raw.pop(b, None)
        self._left[b] = 0

    def reopen(self, shards: Set[int]) -> None:
        """These shards are not done after all (their done markers were set aside): their buckets
        are listed again, and their done names disregarded."""
        for s in shards:
            self.notdone[s] = max(self.notdone.get(s, -1), self._latest.get(s, 0))
            b = self.layout.bucket(s)
            if b in self.closed:
                self.closed.discard(b)
                self.done_in[b] = set(self.layout.shards(b))
                self._left[b] = 0
            self._full.discard(b)
            self._names.pop(b, None)  # parse all of it again
            self._raw.pop(b, None)
            if s in self.done_in.get(b, ()):
                self.done_in[b].discard(s)
                self._left[b] += self.weights.get(s, 0)
            self._done.discard(s)

    def holders(self) -> Dict[int, Claim]:
        """The latest claim of every claimed shard of the open buckets: one listing of each (a
        claim file is read only when its index name is missing or ambiguous)."""
        for b in range(self.layout.count):
            if b not in self.closed:
                self._list_bucket(b)
        self._parse_raw()
        return dict(self._holders)

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
            except FileNotFoundError:  # its name was made, its link not yet: live, look later
                return Claim(shard, gen, UNKNOWN, "<unsure>")
            except READ_ERRORS as e:
                self._seen[key] = Claim(shard, gen, -1, UNREADABLE)
                why = f"unreadable: {one_line(str(e))}"
                then = f"kept in place and taken over as a dead claim (shard {shard} goes on from its durable parts)"
                repair = Repair(
                    "claim", relative(self.rd, path), why, then, f"rank {self.rank} ({self.token})", time.time()
                )
                record(self.rd, repair, name=f"claim-{path.name}.json")
        return self._seen[key]

    def beats(self) -> Dict[Tuple[int, str], str]:
        """Every attempt's beat name: (rank, tag) -> counter, or "end" / "fin". One listing (see
        `BeatBoard`)."""
        return self.board.update(list_names(self.rd.beats_dir), self.clock())

    def _free(self, b: int) -> bool:
        """Whether bucket `b` may hold an unclaimed shard (unlisted: it may). Claims are never
        undone, so a bucket seen full stays full (until `reopen`)."""
        if b in self._full:
            return False
        if b not in self._names:
            return True
        done = self.done_in.get(b, ())
        if any(s not in self._latest and s not in done for s in self.layout.shards(b)):
            return True
        self._full.add(b)
        return False

    MARKS = ("full", "done")  # holders/<bucket>.full: all its shards claimed; .done: all done

    def _mark(self, b: int, kind: str) -> None:
        """Leave holders/<bucket>.<kind> (once): what this rank's listing of the bucket showed, so that
        the others need not list it to know. Both only ever become true (until a done marker is
        set aside: `reopen`, which the rank that set it aside does, and which the markers
        of its buckets do not override for it)."""
        name = f"{b:06d}.{kind}"
        if name in self._marks or any(self.layout.bucket(s) == b for s in self.notdone):
            return
        self._marks.add(name)
        with contextlib.suppress(FileExistsError):
            open(self.rd.holders_dir / name, "x").close()

    def _read_marks(self) -> None:
        """One listing of holders/: the buckets the others found full or all done (a bucket
        holding a shard this attempt set aside or reopened is left to its own listings)."""
        mine = {self.layout.bucket(s) for s in self.notdone}
        for name in list_names(self.rd.holders_dir):
            stem, _, kind = name.partition(".")
            if kind not in self.MARKS or not stem.isdigit() or int(stem) >= self.layout.count:
                continue
            self._marks.add(name)
            b = int(stem)
            if b in mine or b in self.closed:
                continue
            if kind == "done":
                self._close(b)
            else:
                self._full.add(b)

    def look(self, full: bool = True, claiming: bool = True) -> Look:
        """A full look lists beats/, then the open buckets in claim order up to the first with an
        unclaimed shard; a claim look (`full=False`) only the buckets that may have one, up to the
        first that does, and judges liveness from the latest full look's beats (an attempt not in
        them started since: alive). Beats are listed before the buckets: an attempt whose beat name
        the look saw `end` had renamed its done names before (it ends after them), so a shard it
        finished is never taken for one left by a dead rank. A full look not `claiming` (a rank
        that only watches the others: it has its next shard, or takes turns) lists the buckets
        only when some attempt ended or stalled (or at its first look): to find their claims."""
        self.flush()
        if full or self.last is None:
            at, beats, judged, full = self.clock(), self.beats(), {}, True
        else:
            at, beats, judged = self.last.at, self.last.beats, self.last.judged
        tail = len(self.layout.order)
        frontier: List[int] = []
        # who holds what is parsed, and every open bucket listed (scan), only when some attempt
        # ended or stalled (its claims may have to be taken over), or without beat names at all (an
        # older hpcinfer's run directory: claims are judged from their files); a first look needs
        # no more, as every attempt that holds a holders/ name has a beat name, made before it
        lazy = bool(beats)
        scan = False
        if full:
            self._fulls += 1
            scan = (self._fulls == 1 and not beats) or bool(self._dead)
            for key, beat in beats.items():  # an attempt ended or stalled: who holds what matters
                stalled = beat not in TERMINAL_BEATS and at - self.board.since(key, beat, at) >= self.suspect_s
                if beat == ENDED or stalled:
                    lazy = False
                if stalled or (beat == ENDED and key not in self._ended_seen):
                    scan = True  # stalled, or newly ended (not `fin`)
                    if beat == ENDED:
                        self._ended_seen.add(key)
        listed: Set[int] = set()
        claiming = claiming or not full or scan
        marks = [scan]  # whether the markers were listed (a scan lists every open bucket anyway)

        def settle(b: int) -> None:
            """Before listing bucket `b` for the first time: the others' markers may say it is
            full or all done (one listing of holders/ per look)."""
            if not marks[0] and b not in self._names:
                marks[0] = True
                self._read_marks()

        for b in range(self.layout.count) if claiming else ():
            if b in self.closed:
                continue
            if b not in self._full:
                settle(b)
                if b in self.closed:
                    continue
            if scan or self._free(b):
                self._list_bucket(b, lazy=lazy or not full)
                listed.add(b)
                if b in self.closed:
                    continue
            if self._free(b):
                tail = min(tail, (b + 1) * self.layout.size)
                frontier = list(self.layout.shards(b))
                break
        if claiming and full and not scan and not frontier:
            # nothing to claim and no attempt to look after: follow the run to its end, listing the
            # open buckets in claim order only up to the first that is not all done
            for b in range(self.layout.count):
                if b in self.closed:
                    continue
                if b not in listed:
                    settle(b)
                    if b in self.closed:
                        continue
                    self._list_bucket(b, lazy=lazy)
                    listed.add(b)
                if b not in self.closed:
                    break
        for b in listed:  # what this look learned, for the others' looks (all done: `_close`)
            if b in self._full and b not in self.closed:
                self._mark(b, "full")
        self.last = look = Look(at, self._done, self._holders, beats, judged, [], tail, full, claiming)
        if scan and not lazy:
            self._parse_raw()
        if full:  # judge every attempt holding a claim once: the claims of the dead are candidates
            self._dead = {}
            for key, shards in list(self._by_attempt.items()):
                live = {s for s in shards if s not in self._done and self._holder_key(s) == key}
                if not live:
                    del self._by_attempt[key]
                    continue
                self._by_attempt[key] = live
                c = self._holders[next(iter(live))]
                if c.token != self.token and self.dead_in(look, c):
                    self._dead.update({s: self._holders[s] for s in live})
            for s in self.notdone:  # finished, but the done marker was set aside since
                c = self._holders.get(s)
                if c is not None and self._stale_done(c):
                    self._dead[s] = c
        dead = [s for s, c in self._dead.items() if self._holders.get(s) == c and s not in self._done]
        look.order = sorted(dead, key=self.layout.pos.__getitem__) + [s for s in frontier if s not in dead]
        return look

    def _holder_key(self, shard: int) -> Optional[Tuple[int, str]]:
        c = self._holders.get(shard)
        if c is None or c.rank == UNKNOWN:
            return None
        return c.rank, c.token if c.token == UNREADABLE else attempt_tag(c.token)

    def dead(self, c: Claim) -> bool:
        """Whether the attempt behind `c` is gone (see the module docstring), from its rank's
        files, read now."""
        if c.token == UNREADABLE:
            return True
        if self._files_say_ended(c.rank, attempt_tag(c.token)):
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

    def _ended(self, rank: int, tag: str) -> bool:
        """Whether attempt `tag` of `rank` was superseded or recorded that it ended: its owner and
        record, read at most once per `cache_s`."""
        now = self.clock()
        ended, at = self._files.get((rank, tag), (False, -float("inf")))
        if now - at >= self.cache_s:
            ended = self._files_say_ended(rank, tag)
            self._files[(rank, tag)] = (ended, now)
        return ended

    def _files_say_ended(self, rank: int, tag: str) -> bool:
        """Whether attempt `tag` of `rank` was superseded (its owner file names another attempt) or
        recorded that it ended (its record, terminal), read now: the owner first, the record only
        when the owner does not tell."""
        try:
            owner = self.rd.rank_owner(rank).read_text()
        except FileNotFoundError:
            owner = None
        if owner is not None and attempt_tag(owner) != tag:
            return True
        record = self.rd.read_rank(rank)
        return record is not None and attempt_tag(record.token) == tag and record.state in TERMINAL

    def dead_in(self, look: Look, c: Claim) -> bool:
        """Whether `c`'s attempt is gone, judged once per attempt and look: from its beat name when
        it has one (see the module docstring), else (full looks only) from its rank's files. An
        attempt without a beat name in the look's listing of beats/ lists beats/ again first (once
        per look): one that started after that listing has one now, and is not read from files."""
        if c.token == UNREADABLE or self._stale_done(c):
            return True  # unreadable, or finished by an attempt whose done marker was set aside
        if c.rank == self.rank:  # this rank's earlier attempt: this one superseded it
            return c.token != self.token
        if c.rank == UNKNOWN:
            return False
        key = (c.rank, attempt_tag(c.token))
        if key not in look.judged:
            beat = look.beats.get(key)
            if beat is None and look.full:  # it may have started after beats/ was listed: list it again
                if look.late is None:
                    look.late = self.beats()
                late = look.late.get(key)
                if late is not None:  # it did (a beat name is made before any claim): alive unless it ended
                    look.judged[key] = late in TERMINAL_BEATS
                    return look.judged[key]
            if beat is None:
                look.judged[key] = self.dead(c) if look.full else False
            elif beat in TERMINAL_BEATS:
                look.judged[key] = True
            else:
                stalled = look.at - self.board.since(key, beat, look.at)
                look.judged[key] = stalled >= self.lease_s or (stalled >= self.suspect_s and self._ended(*key))
        return look.judged[key]

    def _stale_done(self, c: Claim) -> bool:
        """Whether `c` finished its shard but the done marker was set aside since (a repair)."""
        return c.shard in self.notdone and 0 <= c.gen <= self.notdone[c.shard]

    # ---- claiming ---------------------------------------------------------------------
    def next(
        self,
        choose: Optional[Callable[[List[int], List[int], int], Optional[int]]] = None,
        look: Optional[Look] = None,
        own_first: Optional[Callable[[List[int]], List[int]]] = None,
    ) -> Optional[int]:
        """Claim a shard and return it, or None when nothing is claimable now. `choose(candidates,
        unfinished, gone)` (rank/schedule.py's policy; default: the first candidate) picks among the
        claimable shards in priority order, given the shards not done of the look's buckets (those
        after `look.tail` in the claim order are not done either) and how many other ranks are gone
        (see `gone_ranks`); a shard an earlier attempt of this rank held is taken first whatever
        the policy. One look (`look`, or a fresh full one) serves the tries until RELOOK_AFTER races
        are lost on it: a lost race marks its shard taken and, with `spread` > 1, the next try
        starts a pseudo-random way down the candidates, so that ranks starting together do not
        all race for the same ones. `own_first(candidates)`, when given, names candidates only this
        rank wants (a chain it runs: rank/schedule.py `prefer_chains`): `choose` sees them alone
        first, before any spreading."""
        look = look or self.look()
        with self._lock:
            mine = dict(self.mine)
        first, self._claimed = not self._claimed, True  # ranks starting together: spread at once
        stale = 0  # races lost since the look
        for attempt in range(len(self.order) + 1):
            if attempt == 0 or stale >= self.RELOOK_AFTER:  # others are claiming fast: look again
                if attempt:
                    look = self.look(full=look.full)
                done, stale = look.done, 0
                holders = {s: look.holders[s] for s in look.order if s in look.holders}
                unfinished = [s for s in look.order if s not in done]
                dead = {
                    c
                    for s, c in holders.items()
                    if s not in done and s not in mine and c.token != self.token and self.dead_in(look, c)
                }
                dead |= {c for s, c in holders.items() if c.token == self.token and self._stale_done(c)}
            found = claimable(look.order, done, holders, dead.__contains__, self.rank, self.token)
            found += [(s, c.gen + 1, False) for s, c in holders.items() if c.token == self.token and c in dead]
            found = [f for f in found if f[0] not in mine]
            if not found:
                return None
            if found[0][2]:
                shard, gen, _ = found[0]
            elif choose is None:
                shard, gen, _ = found[self._skip(attempt, found) if attempt or first else 0]
            else:
                candidates = [s for s, _, _ in found]
                gone = len(self.gone_ranks(dead, look))
                shard = None
                own = own_first(candidates) if own_first is not None else []
                if own:
                    shard = choose(own, unfinished, gone)
                if shard is None and self.spread > 1:  # ranks that look together take different shards
                    shard = choose(candidates[self._skip(attempt, found) :], unfinished, gone)
                if shard is None:
                    shard = choose(candidates, unfinished, gone)
                if shard is None:
                    return None
                gen = next(g for s, g, _ in found if s == shard)
            if gen > 0 and self.rd.is_done(shard):  # finished since the look: nothing to take over
                self.notdone.pop(shard, None)
                self._mark_done(shard)
                unfinished = [s for s in unfinished if s != shard]
                holders.pop(shard, None)
                look.order = [s for s in look.order if s != shard]
                continue
            if self._claim(shard, gen):
                return shard
            holders[shard] = self._holders[shard]
            stale += 1
        return None

    def _claim(self, shard: int, gen: int) -> bool:
        """Create the claim (`_create`): this attempt holds it, or the race for it was lost: taken,
        by whom is not needed now (its bucket's next listing says, or its file)."""
        if self._create(shard, gen):
            with self._lock:
                self.mine[shard] = gen
            return True
        self._holders[shard] = Claim(shard, gen, UNKNOWN, "<lost race>")
        if gen >= self._latest.get(shard, -1):
            self._latest[shard] = gen
        self._lost.add(shard)
        return False

    TURN_TRIES = 2  # turns taken by others in a row before a look decides

    @property
    def has_turn(self) -> bool:
        """Whether this rank may have a turn left (`take_turn`)."""
        return self._turn < len(self.layout.order)

    def _known_taken(self, shard: int) -> bool:
        """Whether `shard` is known claimed or done (or set aside: claimed before) without a look.
        A claim this attempt made since its bucket's last listing is known from `_open` (every
        claim it holds is there), not from the listing."""
        return (
            shard in self._latest
            or any(s == shard for s, _ in self._open)
            or shard in self._done
            or shard in self.notdone
            or self.layout.bucket(shard) in self.closed
        )

    def take_turn(self, choose: Optional[Callable[[List[int], List[int], int], Optional[int]]] = None) -> Optional[int]:
        """Claim this rank's next turn without looking, or None: ranks taking turns (`turns`: the
        ranks of the run) start at their rank's position in the claim order and go on every
        `turns` positions, so that ranks claiming together (at the start, or shards of one size
        ending together) never race and list nothing. A turn is a shard's first claim (gen 0):
        the link decides it as any claim, so one that a rank looking took first is a lost race,
        and the rank goes on to its next turn (TURN_TRIES in a row, then None: `next` looks).
        Turns known taken or done (this attempt's listings, the done shards it started with) are
        passed over without a try. None at once, writing nothing, when the rank takes no turns,
        has none left, the latest full look found claims to take over (`next` takes them first),
        or the policy `choose` (as in `next`) declines the turn: the turn waits."""
        with self._lock:
            mine = set(self.mine)
        if any(self._holders.get(s) == c and s not in self._done and s not in mine for s, c in self._dead.items()):
            return None
        order, tries = self.layout.order, 0
        while self._turn < len(order) and tries < self.TURN_TRIES:
            shard = order[self._turn]
            if self._known_taken(shard):
                self._turn += self.turns
                continue
            if choose is not None:
                b = self.layout.bucket(shard)
                unfinished = [s for s in self.layout.shards(b) if s not in self._done]
                if choose([shard], unfinished, 0) is None:  # no claim to take over: no rank known gone
                    return None
            self._turn += self.turns
            if self._claim(shard, 0):
                return shard
            tries += 1
        return None

    def _skip(self, attempt: int, found: list) -> int:
        """How far down the candidates a try starts: a first try at its rank's place (ranks that
        look together, as at the start, or as shards of one size end together, see the same
        candidates), a try after a lost race pseudo-randomly per rank."""
        if not attempt:
            return self.rank % min(self.spread, len(found))
        return (self.rank * 2654435761 + attempt * 40503) % min(self.spread, len(found))

    def gone_ranks(self, dead: Set[Claim], look: Optional[Look] = None) -> Set[int]:
        """Other ranks whose latest attempt holds one of the `dead` claims: they will not come back
        for their share (a superseded attempt's rank has restarted and will). A newer attempt's
        live beat name says the rank restarted; without beat names the owner file says it."""
        gone = set()
        for rank, token in {(c.rank, c.token) for c in dead if c.rank not in (self.rank, -1, UNKNOWN)}:
            tag = attempt_tag(token)
            if look is not None and any(r == rank for r, _ in look.beats):
                restarted = any(r == rank and t != tag and n not in TERMINAL_BEATS for (r, t), n in look.beats.items())
                if not restarted:
                    gone.add(rank)
                continue
            try:
                latest = attempt_tag(self.rd.rank_owner(rank).read_text())
            except FileNotFoundError:
                latest = tag
            if latest == tag:
                gone.add(rank)
        return gone

    def _index_name(self, shard: int, gen: int, rank: int, tag: str) -> Path:
        return self._bdir(self.layout.bucket(shard)) / f"{self.rd.claim(shard, gen).name}.{rank}.{tag}"

    def _create(self, shard: int, gen: int) -> bool:
        """Write the claim to its holders/<bucket>/ name, then hard-link it to claims/<shard>.<gen>:
        the link fails if the name exists (atomic on local filesystems and NFS alike), and readers
        never see it half written. A lost race removes the holders/ name."""
        index = self._index_name(shard, gen, self.rank, self.tag)
        try:
            f = open(index, "x")
        except FileNotFoundError:  # the first claim of its bucket: its folder is made now
            make_dir(index.parent)
            f = open(index, "x")
        except FileExistsError:
            if (shard, gen) in self._open:  # this attempt's own claim: never make it again (the
                return False  # name removed would hide the claim from every listing)
            os.unlink(index)  # left by a crash of this very attempt: never, but harmless
            f = open(index, "x")
        with f:
            json.dump({"rank": self.rank, "token": self.token, "host": socket.gethostname()}, f)
        try:
            os.link(index, self.rd.claim(shard, gen))
            self._open.add((shard, gen))
            return True
        except FileExistsError:
            os.unlink(index)
            return False
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(index)
            raise

    def check(self, shard: int) -> None:
        """Raise ClaimLost when this attempt no longer holds `shard` (a newer claim exists)."""
        gen = self.mine.get(shard)
        if gen is None or self.rd.claim(shard, gen + 1).exists():
            raise ClaimLost(f"shard {shard} was taken over by another rank")

    def release(self, shard: int, done: Optional[bool] = None) -> None:
        """This attempt is through with `shard`: finished (`done`: its done marker is written), or
        dropped, or None: not known here (`flush` looks). Memory only: `flush` publishes it."""
        with self._lock:
            gen = self.mine.pop(shard, None)
            if gen is not None:
                self._pending.append((shard, gen, done))

    def flush(self) -> None:
        """Publish the released shards that are done: rename their holders/ names `.done` (after
        their done markers: every look sees the marker of a shard it sees done)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for shard, gen, done in pending:
            if done is None:
                done = self.rd.is_done(shard)
            if done:
                index = self._index_name(shard, gen, self.rank, self.tag)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(index, f"{index}.done")
                self._open.discard((shard, gen))
                self.notdone.pop(shard, None)
                self._mark_done(shard)

    @property
    def clean(self) -> bool:
        """Whether every claim this attempt made is done (published `.done`): it leaves nothing to
        take over."""
        with self._lock:
            return not self.mine and not self._pending and not self._open

    def unfinished(self, look: Optional[Look] = None) -> int:
        """Shards not done and not held by this attempt, as far as the open buckets' latest
        listings tell (`look` is not needed: kept for callers). While any, an idle rank stays to
        take over the claims of ranks that die."""
        with self._lock:
            mine = set(self.mine)
        n = sum(len(self.layout.shards(b)) - len(self.done_in.get(b, ())) for b in range(self.layout.count))
        n -= sum(len(self.layout.shards(b)) for b in self.closed)
        return n - sum(1 for s in mine if s not in self._done)

    def weight_before(self, position: int) -> int:
        """The weight of the shards not known done at claim-order positions before `position`."""
        b = min(position // self.layout.size, self.layout.count)
        total = sum(self._left[:b])
        if b < self.layout.count and b not in self.closed:
            done = self.done_in.get(b, ())
            total += sum(
                self.weights.get(s, 0) for s in self.layout.order[b * self.layout.size : position] if s not in done
            )
        return total

    def confirm_done(self) -> bool:
        """Whether every shard has its done marker: one listing of done/, when the holders/ names
        say the run is over. A shard whose marker was set aside since (a repair) reopens its
        bucket: it is claimed again."""
        markers = self.rd.done_shards()
        missing = {s for s in self.layout.order if s not in markers}
        if missing:
            self.reopen(missing)
        return not missing


def end_beat(rd: RunDir, rank: int, token: str) -> None:
    """Mark attempt `token`'s beat name `end`: its claims are dead at once. For a launcher that
    records a rank's silent death (rank/worker.py record_exit); a missing name is no error."""
    tag = attempt_tag(token)
    for name in list_names(rd.beats_dir):
        parsed = parse_beat_name(name)
        if parsed and parsed[:2] == (rank, tag) and parsed[2] not in TERMINAL_BEATS:
            with contextlib.suppress(OSError):
                os.rename(rd.beats_dir / name, rd.beats_dir / f"{rank}.{tag}.end")


class BeatBoard:
    """What the listings of a run's beats/ showed: every attempt's beat name, and since when a
    listing has seen it unchanged (on one clock). Shared by the Claims of one process on one
    clock (`beat_board`): one rank in a job; thousands in a simulation (bench/scale.py --cheap),
    which then keep one map, not one each. A beat is timed from the first listing in the process
    that saw it: never before the attempt beat, so a live attempt is no sooner suspect than when
    each rank timed its own listings."""

    def __init__(self) -> None:
        self.names: FrozenSet[str] = frozenset()  # the latest listing's names
        self.at = -float("inf")  # when it was listed
        self.map: Dict[Tuple[int, str], str] = {}  # what they say (replaced, never changed in place)
        self._since: Dict[Tuple[int, str], Tuple[str, float]] = {}  # (rank, tag) -> (beat name, seen since)
        self._lock = threading.Lock()

    def update(self, names: Sequence[str], at: float) -> Dict[Tuple[int, str], str]:
        """A listing made at `at`: only names not seen at the latest are parsed (an attempt has
        one name, renamed as it beats). One older than the latest changes nothing."""
        listed = frozenset(names)
        with self._lock:
            if at < self.at or listed == self.names:
                self.at = max(self.at, at)
                return self.map
            out = dict(self.map)
            for name in self.names - listed:
                parsed = parse_beat_name(name)
                if parsed and out.get(parsed[:2]) == parsed[2]:
                    del out[parsed[:2]]
            for name in listed - self.names:
                parsed = parse_beat_name(name)
                if parsed and (parsed[2] in TERMINAL_BEATS or out.get(parsed[:2]) not in TERMINAL_BEATS):
                    out[parsed[:2]] = parsed[2]
                    if self._since.get(parsed[:2], ("",))[0] != parsed[2]:
                        self._since[parsed[:2]] = (parsed[2], at)
            self.names, self.at, self.map = listed, at, out
            return out

    def since(self, key: Tuple[int, str], beat: str, at: float) -> float:
        """Since when `key`'s beat name has been `beat` (`at`: a look's time, when not known)."""
        seen = self._since.get(key)
        return seen[1] if seen is not None and seen[0] == beat else at


_boards: Dict[Tuple[str, Callable[[], float]], BeatBoard] = {}
_boards_lock = threading.Lock()


def beat_board(beats_dir: str, clock: Callable[[], float]) -> BeatBoard:
    """The BeatBoard of `beats_dir` on `clock` in this process (a few kept)."""
    with _boards_lock:
        board = _boards.get((beats_dir, clock))
        if board is None:
            if len(_boards) >= 16:
                del _boards[next(iter(_boards))]
            board = _boards[(beats_dir, clock)] = BeatBoard()
        return board


class Heartbeat:
    """Rewrites `ranks/<rank>.beat` every `interval` seconds from a daemon thread, so other ranks
    can tell this attempt is alive whatever the engine is doing; and renames its beat name
    `beats/<rank>.<tag>.<n>` to <n+1> (one metadata operation), which every rank sees in one
    listing of beats/. At start it marks the beat names of the rank's earlier attempts `end`
    (this attempt supersedes them); `stop` marks its own."""

    def __init__(self, rd: RunDir, rank: int, token: str, interval: float, clock: Callable[[], float] = time.monotonic):
        self.path, self.token, self.interval, self.clock = rd.rank_beat(rank), token, interval, clock
        self.beats_dir, self.rank, self.tag = rd.beats_dir, rank, attempt_tag(token)
        self.n = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hpcinfer-heartbeat", daemon=True)

    def _name(self, n: object) -> Path:
        return self.beats_dir / f"{self.rank}.{self.tag}.{n}"

    def start(self, thread: bool = True) -> Heartbeat:
        """Mark the earlier attempts' names `end`, beat once, and beat every `interval` from a
        thread (`thread=False`: when `tick` is called, on `clock`)."""
        make_dir(self.beats_dir)
        mine = f"{self.rank}."
        for name in list_names(self.beats_dir):
            parsed = parse_beat_name(name) if name.startswith(mine) else None
            if parsed and parsed[0] == self.rank and parsed[1] != self.tag and parsed[2] not in TERMINAL_BEATS:
                with contextlib.suppress(OSError):  # an earlier attempt of this rank: superseded
                    os.rename(self.beats_dir / name, self._name_of(parsed[1], ENDED))
        self._name(0).touch()
        self._write(0)
        self._next = self.clock() + self.interval
        if thread:
            self._thread.start()
        return self

    def tick(self) -> None:
        """Beat if `interval` passed since the last beat (without the thread)."""
        if self.clock() >= self._next and not self._stop.is_set():
            self._next = self.clock() + self.interval
            with contextlib.suppress(OSError):
                self._beat(self.n + 1)

    def _write(self, n: int) -> None:
        """Rewrite ranks/<rank>.beat in place: one metadata operation (a temp file and a rename
        would be three). Its only readers (`Claims.dead`, for attempts without a beat name) compare
        it with what they read before: a read in the middle of a rewrite differs from it, and is
        taken for a beat, as this is one."""
        with open(self.path, "w") as f:
            f.write(f"{self.token} {n}")

    def _name_of(self, tag: str, n: object) -> Path:
        return self.beats_dir / f"{self.rank}.{tag}.{n}"

    def _beat(self, n: int) -> None:
        self._write(n)
        with self._lock:
            if not self._stop.is_set():
                os.rename(self._name(self.n), self._name(n))
                self.n = n

    def _run(self) -> None:
        n = 1
        while not self._stop.wait(self.interval):
            try:
                self._beat(n)
            except OSError:  # a full or flaky filesystem: the next beat may work
                pass
            n += 1

    def stop(self, clean: bool = False) -> None:
        """Stop beating and mark this attempt's beat name `end`: its claims are dead at once; or,
        `clean` (every claim it made is done), `fin`: the others need not look for its claims."""
        self._stop.set()
        with self._lock, contextlib.suppress(OSError):
            os.rename(self._name(self.n), self._name(FINISHED if clean else ENDED))
