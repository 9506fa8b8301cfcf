"""Which shard a rank of the dynamic schedule claims next: the balancing policy. Pure.

`rundir.claims.Claims.next` hands the policy the shards this rank could claim now (in claim
order: densest first, `claim_order`) and the shards not done yet; the policy returns the one to
claim, or None to leave them to the other ranks for now.

A rank finishes when its longest requests do: they decode one token per step, however many other
sequences share the batch (on a GPU a step costs about the same for one sequence or a full batch).
So what must be even across ranks is the *mix*: every rank gets its share of the long requests,
all started at once, and its share of the short ones beside them. For a candidate shard, take the
shards at least as dense (estimated tokens per row) that are not done; a rank may claim it while
what it holds of them is at most its share of the rest (`share_allows`). Measured against vLLM's
static split on a skewed workload (docs/benchmarks.md): 1.67x on 2 H200s, tail 0.9%; on 2 CPU
cores tail under 1%, where the *factoring* rule (half a share of the tokens left, else the
smallest shard) left 6-8%.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Callable, Collection, Dict, List, Optional, Sequence

from hpcinfer.rundir.manifest import Shard


def share_allows(held: int, candidate: int, pool: int, world: int) -> bool:
    """Whether a rank holding `held` estimated tokens of a pool of `pool` (not done, the
    candidate's `candidate` included) may claim the candidate: `held <= (pool - candidate) / world`,
    i.e. after it, what this rank holds is at most its share of what the others may still claim.
    Some rank always qualifies (the least loaded holds at most (pool - candidate) / world), so a
    shard is never left unclaimed while the ranks still have room."""
    return held * max(1, world) <= pool - candidate


def by_mix(
    candidates: Sequence[int],
    unfinished: Collection[int],
    tokens: Dict[int, int],
    rows: Dict[int, int],
    held: Collection[int],
    world: int,
    pool: Optional[Callable[[float], int]] = None,
) -> Optional[int]:
    """The first candidate (densest first) for which `share_allows`, counting only the shards
    at least as dense as it (in tokens per row): long requests spread over the ranks first, short
    ones beside them. `held`: the unfinished shards this rank holds. Sorted prefix sums make each
    candidate's pool a binary search, so a rank with thousands of shards to look through stays
    off its engine's hot path. `pool(d)`, when given, is the tokens of the unfinished shards at
    least as dense as d, in place of `unfinished` (a rank keeps it as it learns what is done:
    rundir/claims.py)."""

    def density(s: int) -> float:
        return tokens[s] / max(1, rows[s])

    def at_least_as_dense(shards: Collection[int]):
        """`tokens_from(d)`: the tokens of `shards` with density >= d."""
        ordered = sorted(shards, key=density, reverse=True)
        keys = [-density(s) for s in ordered]  # ascending
        sums = list(itertools.accumulate((tokens[s] for s in ordered), initial=0))
        return lambda d: sums[bisect.bisect_right(keys, -d)]

    pool = pool or at_least_as_dense(unfinished)
    mine = at_least_as_dense(held)
    for c in candidates:
        d = density(c)
        if share_allows(mine(d), tokens[c], pool(d), world):
            return c
    return None


def claim_order(shards: Sequence[Shard]) -> List[Shard]:
    """The order ranks claim shards in: densest first (estimated tokens per row: the longest
    requests start early, on every rank), then largest, then input order."""
    return sorted(shards, key=lambda s: (-s.tokens / max(1, s.rows), -s.tokens, s.shard))


def chain_links(shards: Sequence[Shard]) -> Dict[int, int]:
    """Prefix placement (planning/prefix.py): each shard's predecessor in its chain (the shard
    before it in placement order, when both have the same `group` >= 0). Pure."""
    ordered = sorted(shards, key=lambda s: s.shard)
    return {b.shard: a.shard for a, b in zip(ordered, ordered[1:]) if a.group >= 0 and a.group == b.group}


def prefer_chains(
    candidates: Sequence[int], pred: Dict[int, int], unfinished: Collection[int], mine: Collection[int]
) -> List[int]:
    """The candidates (in claim order) reordered so that a rank goes on with the chains it runs,
    for vLLM's prefix cache: first the next shard of a chain whose previous shard this rank holds
    or held; then shards that start something (outside any chain, a chain's first shard, or one
    whose predecessor is done); then, to split a chain another rank runs, the middle of the
    longest run of unclaimed shards after the shard it holds (that rank goes on up to it, this
    one from it); the rest last. The balancing policy then takes the first it allows (`by_mix`),
    so its tail guarantee holds: a chain is split over ranks only when one rank may not hold
    more of it. Pure; without chains (no `pred`) the order is unchanged."""
    if not pred:
        return list(candidates)
    free, left = set(candidates), set(unfinished)
    succ = {p: s for s, p in pred.items()}
    go_on, start, middle, rest = [], [], [], []
    for c in candidates:
        p = pred.get(c)
        if p is None or (p not in free and p not in left):
            start.append(c)
        elif p in mine:
            go_on.append(c)
        elif p in free:
            rest.append(c)
        else:  # after a shard another rank holds: split what follows it
            run = [c]
            while succ.get(run[-1]) in free:
                run.append(succ[run[-1]])
            middle.append((-len(run), run[len(run) // 2]))
    picked = [m for _, m in sorted(middle, key=lambda t: t[0])]
    seen = set(go_on) | set(start) | set(picked)
    return go_on + start + picked + [c for c in rest if c not in seen]


def by_chain(
    candidates: Sequence[int],
    pred: Dict[int, int],
    unfinished: Collection[int],
    tokens: Dict[int, int],
    rows: Dict[int, int],
    held: Collection[int],
    mine: Collection[int],
    world: int,
    pool: Optional[Callable[[float], int]] = None,
) -> Optional[int]:
    """The balancing policy with prefix placement: the next shard of a chain this rank runs
    (`prefer_chains`) while what it holds is at most its share of all that is left (`share_allows`
    over every unfinished shard: a chain's shards are of one kind of row, so its next shard is
    measured against the whole pool rather than the shards at least as dense), else `by_mix` over
    the candidates in `prefer_chains`' order. So no rank holds more than its share, and a chain
    is split over ranks only when it is larger than that."""
    ordered = prefer_chains(candidates, pred, unfinished, mine)
    total = pool(0.0) if pool is not None else sum(tokens[s] for s in unfinished)
    mine_tokens = sum(tokens[s] for s in held)
    for c in ordered:
        if pred.get(c) not in mine:
            break
        if share_allows(mine_tokens, tokens[c], total, world):
            return c
    return by_mix(ordered, unfinished, tokens, rows, held, world, pool)
