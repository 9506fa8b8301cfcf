"""Which shard a rank of the dynamic schedule claims next: the balancing policies. Pure.

`claims.Claims.next` hands a policy the shards this rank could claim now (in claim order:
densest first, see `data.claim_order`) and the shards not done yet; the policy returns the one to
claim, or None to leave them to the other ranks for now. A rank's finish time depends on its
device, so there are two policies:

- GPU (`by_mix`): a decode step costs about the same for one sequence or a full batch, so a rank
  finishes when its longest requests do, after as many steps as they have tokens. What must be
  even is the *mix*: every rank gets its share of the long requests, all started at once, and its
  share of the short ones beside them. For a candidate shard, take the shards at least as dense
  (estimated tokens per row) that are not done; a rank may claim it while what it holds of them is
  at most its share of the rest (`share_allows`).
- CPU (`by_tokens`): time grows with tokens, batch or not. The rank may claim the largest shard
  while it holds at most half its share of the work left (`fair_share`, the chunk rule of
  factoring), else, when its running batch has room, the smallest: the batch stays full, the
  large shards spread over the ranks and start early, small ones even out the end.
"""
from __future__ import annotations

from typing import Collection, Dict, Optional, Sequence


def share_allows(held: int, candidate: int, pool: int, world: int) -> bool:
    """Whether a rank holding `held` estimated tokens of a pool of `pool` (not done, the
    candidate's `candidate` included) may claim the candidate: `held <= (pool - candidate) / world`,
    i.e. after it, what this rank holds is at most its share of what the others may still claim.
    Some rank always qualifies (the least loaded holds at most (pool - candidate) / world), so a
    shard is never left unclaimed while the ranks still have room."""
    return held * max(1, world) <= pool - candidate


def by_mix(candidates: Sequence[int], unfinished: Collection[int], tokens: Dict[int, int], rows: Dict[int, int],
           held: Collection[int], world: int) -> Optional[int]:
    """GPU: the first candidate (densest first) for which `share_allows`, counting only the shards
    at least as dense as it (in tokens per row): long requests spread over the ranks first, short
    ones beside them. `held`: the unfinished shards this rank holds."""
    def density(s: int) -> float:
        return tokens[s] / max(1, rows[s])

    for c in candidates:
        d = density(c)
        pool = sum(tokens[s] for s in unfinished if density(s) >= d)
        mine = sum(tokens[s] for s in held if density(s) >= d)
        if share_allows(mine, tokens[c], pool, world):
            return c
    return None


def fair_share(outstanding: int, candidate: int, left: int, world: int) -> bool:
    """Whether a rank holding `outstanding` estimated tokens may take a shard of `candidate` more
    when `left` tokens of the run are not done, among `world` ranks: at most half of its share of
    what is left (the chunk rule of *factoring*, Hummel et al. 1992), so the large shards spread
    over the ranks and all start early. A rank with nothing in hand may always take one."""
    return outstanding == 0 or outstanding + candidate <= left / (2 * max(1, world))


def by_tokens(candidates: Sequence[int], unfinished: Collection[int], tokens: Dict[int, int],
              held: Collection[int], world: int, fill: bool) -> Optional[int]:
    """CPU: the largest candidate while `fair_share` allows it; else the smallest if `fill` (the
    running batch has room), else none."""
    if not candidates:
        return None
    largest = max(candidates, key=lambda s: tokens[s])
    if fair_share(sum(tokens[s] for s in held), tokens[largest], sum(tokens[s] for s in unfinished), world):
        return largest
    return min(candidates, key=lambda s: tokens[s]) if fill else None
