"""The dynamic schedule's policy (rank/schedule.py): claim order, share_allows, by_mix against its
definition and in a simulation of GPU ranks claiming.
"""

from __future__ import annotations

import numpy as np

from hpcinfer.planning.inputs import InputFile
from hpcinfer.planning.sharding import cut_by_tokens
from hpcinfer.rank import schedule
from hpcinfer.rank.schedule import claim_order
from hpcinfer.rundir.manifest import Shard


def test_claim_order_is_densest_then_largest_then_input_order():
    shards = [Shard(i, 0, "/f", i, i + 1, i, tok) for i, tok in enumerate([5, 9, 5, 1, 9])]  # one row each
    assert [s.shard for s in claim_order(shards)] == [1, 4, 0, 2, 3]
    # 2 rows of 50 tokens come before 10 rows of 12 tokens, though they are less work
    mixed = [Shard(0, 0, "/f", 0, 10, 0, 120), Shard(1, 0, "/f", 10, 12, 10, 100)]
    assert [s.shard for s in claim_order(mixed)] == [1, 0]


# ---- balancing policies (schedule.py) --------------------------------------------------------
def test_share_allows_never_leaves_a_shard_unclaimable():
    rng = np.random.default_rng(7)
    for _ in range(2000):
        world, candidate = int(rng.integers(1, 9)), int(rng.integers(1, 100))
        held = rng.integers(0, 100, size=world)
        pool = int(held.sum()) + candidate + int(rng.integers(0, 50))  # what the ranks hold + the candidate + free
        assert any(schedule.share_allows(int(h), candidate, pool, world) for h in held)
    assert schedule.share_allows(0, 10, 10, 4)  # the only shard left: an empty-handed rank takes it
    assert schedule.share_allows(30, 10, 70, 2)  # 30 <= (70 - 10) / 2
    assert not schedule.share_allows(31, 10, 70, 2)


def test_by_mix_is_its_definition(seed=3):
    """by_mix's prefix sums give what its definition says: the first candidate whose rank holds,
    of the unfinished shards at least as dense, at most its share of the rest."""
    rng = np.random.default_rng(seed)

    def definition(candidates, unfinished, tokens, rows, held, world):
        def density(s):
            return tokens[s] / max(1, rows[s])

        for c in candidates:
            pool = sum(tokens[s] for s in unfinished if density(s) >= density(c))
            mine = sum(tokens[s] for s in held if density(s) >= density(c))
            if schedule.share_allows(mine, tokens[c], pool, world):
                return c
        return None

    for _ in range(2000):
        n = int(rng.integers(1, 40))
        rows = {s: int(rng.choice([1, 2, 3, 8])) for s in range(n)}
        tokens = {s: rows[s] * int(rng.choice([1, 2, 5, 100])) for s in range(n)}
        order = sorted(range(n), key=lambda s: (-tokens[s] / rows[s], -tokens[s], s))
        unfinished = [s for s in order if rng.random() < 0.8]
        held = {s for s in unfinished if rng.random() < 0.3}
        candidates = [s for s in unfinished if s not in held]
        world = int(rng.integers(1, 6))
        args = (candidates, unfinished, tokens, rows, held, world)
        assert schedule.by_mix(*args) == definition(*args), args


def simulate_claims(shards, world, room_rows, policy):
    """Ranks claiming one after the other (claims take milliseconds, engine start-ups differ by
    seconds), each while fewer than `room_rows` rows are pending, nothing finishing: what each rank
    holds once no rank claims any more (the start of a run)."""
    tokens = {s.shard: s.tokens for s in shards}
    rows = {s.shard: s.rows for s in shards}
    order = [s.shard for s in claim_order(shards)]
    held = [set() for _ in range(world)]
    progress = True
    while progress:
        progress = False
        for r in range(world):
            while sum(rows[s] for s in held[r]) < room_rows:
                free = [s for s in order if not any(s in h for h in held)]
                got = policy(free, order, tokens, rows, held[r], world) if free else None
                if got is None:
                    break
                held[r].add(got)
                progress = True
    return held


def test_by_mix_gives_every_gpu_its_share_of_the_long_requests_at_once():
    """The GPU benchmark's workload: 4,096 rows, the first 10% asking for 1,024 tokens, the rest
    for 32, cut into 16 shards of equal work. Claiming densest first while less than a batch is
    pending (the old GPU rule) gave one GPU every long request; by_mix splits them evenly."""
    caps = [1024] * 410 + [32] * 3686
    files = [InputFile("/data/skewed.parquet", len(caps))]
    shards = cut_by_tokens(files, [caps], 2, 8, 4096)
    long_rows = {s.shard: sum(c == 1024 for c in caps[s.global_start : s.global_start + s.rows]) for s in shards}

    def greedy(free, order, tokens, rows, held, world):
        return free[0]

    def mix(free, order, tokens, rows, held, world):
        return schedule.by_mix(free, order, tokens, rows, held, world)

    def long_per_rank(held):
        return sorted(sum(long_rows[s] for s in h) for h in held)

    assert long_per_rank(simulate_claims(shards, 2, 1024, greedy)) == [0, 410]
    lo, hi = long_per_rank(simulate_claims(shards, 2, 1024, mix))
    assert lo + hi == 410 and hi - lo <= max(long_rows.values())  # even, to one shard
    for world in (3, 4):
        shards = cut_by_tokens(files, [caps], world, 8, 4096)
        long_rows = {s.shard: sum(c == 1024 for c in caps[s.global_start : s.global_start + s.rows]) for s in shards}
        per = long_per_rank(simulate_claims(shards, world, 1024, mix))
        assert sum(per) == 410 and per[-1] - per[0] <= max(long_rows.values()), per
