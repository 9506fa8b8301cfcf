"""Prefix placement's pure pieces (planning/prefix.py, rank/schedule.py's chain preference,
rundir/permute.py): keys, grouping, cuts into shards and chains, the plan's estimate, the order
claims prefer, and writing rows back in another order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hpcinfer.planning import prefix as px
from hpcinfer.rank.schedule import by_mix, chain_links, prefer_chains
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.permute import OrderError, write_reordered
from hpcinfer.rundir.records import MESSAGES, OPENAI_BATCH, RequestSpec


def hashes_of(texts):
    return px.level_hashes(pa.array(texts, pa.large_string()).cast(pa.large_binary()))


def docs_questions(d=5, q=4, doc_bytes=3000):
    """Question-major prompts: q questions about each of d documents (row = qi * d + di)."""
    docs = [(chr(ord("a") + i) * 7 + " ") * (doc_bytes // 8) for i in range(d)]
    return [f"Doc: {docs[di]}\nQ{qi}: why?" for qi in range(q) for di in range(d)], docs


# ---- keys ----------------------------------------------------------------------------------
def test_equal_starts_hash_equal_at_the_levels_they_share_and_differ_after():
    a, b = "x" * 100 + "A" * 200, "x" * 100 + "B" * 200
    h = hashes_of([a, b, a])
    assert (h[0] == h[2]).all()  # the same text: every level
    assert (h[0, :2] == h[1, :2]).all()  # the first 64 and 90 bytes are equal
    assert (h[0, 2:] != h[1, 2:]).all()  # from 128 bytes on they differ


def test_a_hash_does_not_depend_on_where_the_row_is_in_its_batch():
    texts = ["p" * 500, "q" * 70, "p" * 500]
    alone = hashes_of(["p" * 500])
    assert (hashes_of(texts)[2] == alone[0]).all() and (hashes_of(texts)[0] == alone[0]).all()


def test_shorter_prompts_and_nulls_group_only_with_equals():
    h = hashes_of(["abc", "abcd", None, None, "abc"])
    assert (h[0] == h[4]).all() and not (h[0] == h[1]).all()
    assert (h[2] == h[3]).all() and not (h[2] == h[0]).any()


def test_hashing_in_chunks_gives_the_same_hashes(monkeypatch):
    texts = [("k" * (i % 7 + 1)) * 300 for i in range(50)]
    whole = hashes_of(texts)
    monkeypatch.setattr(px, "_CHUNK_BYTES", 1000)  # several chunks, one row at least each
    assert (hashes_of(texts) == whole).all()


def test_the_powers_table_grows_with_the_input_and_hashes_alike(monkeypatch):
    monkeypatch.setattr(px, "_POWERS", [])
    small = hashes_of(["ab" * 10])
    assert len(px._POWERS[0]) == 1 << 16  # a small input makes a small table (not a whole chunk's)
    rows = ["ab" * 10, "z" * 200_000, "zz" + "y" * 70_000]
    grown = hashes_of(rows)
    assert len(px._POWERS[0]) >= 270_000
    assert (grown[0] == small[0]).all()
    monkeypatch.setattr(px, "_POWERS", [])  # a table made at the full size at once
    assert (hashes_of(rows[::-1])[::-1] == grown).all()


@pytest.mark.parametrize(
    "spec, columns, want",
    [
        (RequestSpec(prompt_column="p"), {"p": ["hi", None]}, ["hi", None]),
        (
            RequestSpec(template="Doc {d}: {q}", prompt_column=None),
            {"d": ["D", "E"], "q": ["x", None]},
            ["Doc D: x", None],
        ),
        (RequestSpec(prompt_column="p", chat=True, system="S"), {"p": ["u", "v"]}, ["S\x1eu", "S\x1ev"]),
        (
            RequestSpec(kind=MESSAGES, messages_column="m", prompt_column=None),
            {"m": [[{"role": "user", "content": "c"}], None]},
            ["user\x1fc\x1e", None],
        ),
        (
            RequestSpec(kind=OPENAI_BATCH, prompt_column=None),
            {"body": ['{"messages": [{"role": "user", "content": "c"}]}', '{"prompt": "p"}']},
            ["user\x1fc\x1e", "p"],
        ),
    ],
)
def test_the_key_is_the_start_of_the_prompt_the_engine_gets(spec, columns, want):
    batch = pa.RecordBatch.from_pydict(columns)
    starts, full = px.prompt_starts(batch, spec)
    got = [None if v is None else v.decode() for v in starts.to_pylist()]
    assert got == want
    assert full.tolist() == [0 if w is None else len(w.encode()) for w in want]


def test_the_key_is_cut_at_the_longest_level():
    starts, full = px.prompt_starts(pa.RecordBatch.from_pydict({"p": ["z" * 40000]}), RequestSpec(prompt_column="p"))
    assert len(starts[0].as_py()) == px.LEVELS[-1] and full.tolist() == [40000]


# ---- placement, cuts, chains -----------------------------------------------------------------
def test_placement_puts_rows_of_one_document_together():
    prompts, docs = docs_questions(d=5, q=4)
    order = px.placement_order(hashes_of(prompts))
    assert sorted(order.tolist()) == list(range(20))  # every row once
    groups = [order[i : i + 4].tolist() for i in range(0, 20, 4)]
    for g in groups:  # one document per run of 4
        assert len({prompts[r][:100] for r in g}) == 1


def test_cuts_keep_groups_smaller_than_a_shard_whole_and_chain_larger_ones():
    prompts, _ = docs_questions(d=3, q=10)  # groups of 10 rows
    h = hashes_of(prompts)
    order = px.placement_order(h)
    depth = px.shared_depth(h[order])
    tokens = np.ones(30, dtype=np.int64)
    cuts, chains = px.cut_placed(tokens, depth, target=12, max_rows=12)  # a group fits: 3 shards
    assert cuts == [(0, 10), (10, 20), (20, 30)] and chains == [0, 1, 2]
    cuts, chains = px.cut_placed(tokens, depth, target=4, max_rows=100)  # a group spans shards
    assert [hi - lo for lo, hi in cuts] == [4, 4, 2] * 3 or sum(hi - lo for lo, hi in cuts) == 30
    assert all(lo < hi for lo, hi in cuts) and cuts[-1][1] == 30
    by_chain = {}
    for (lo, hi), c in zip(cuts, chains):
        by_chain.setdefault(c, set()).update(prompts[r][:50] for r in order[lo:hi])
    assert len(by_chain) == 3 and all(len(v) == 1 for v in by_chain.values())  # a chain: one document


def test_unrelated_rows_are_cut_as_by_tokens_and_form_no_chains():
    texts = [f"{i:05d} unique " * 10 for i in range(40)]
    h = hashes_of(texts)
    order = px.placement_order(h)
    cuts, chains = px.cut_placed(np.ones(40, dtype=np.int64), px.shared_depth(h[order]), 10, 100)
    assert len(set(chains)) == len(cuts) and sum(hi - lo for lo, hi in cuts) == 40


def test_expected_prefill_counts_a_shared_start_once_per_unit():
    prompts, _ = docs_questions(d=2, q=3, doc_bytes=1000)
    h = hashes_of(prompts)
    lengths = np.array([len(p) for p in prompts])
    one_unit = px.expected_prefill(h, lengths, np.zeros(6, dtype=np.int64))
    every_row_alone = px.expected_prefill(h, lengths, np.arange(6))
    assert every_row_alone == lengths.sum()
    assert one_unit < 0.6 * lengths.sum()  # 4 of 6 rows share >= 724 of their ~1,000 bytes


def test_auto_turns_placement_on_only_when_it_saves_enough():
    assert px.decide("auto", 1000, 900, 300) and not px.decide("auto", 1000, 900, 850)
    assert px.decide("on", 1000, 900, 900) and not px.decide("off", 1000, 900, 100)


# ---- claiming: a chain's next shard first ----------------------------------------------------
def chain_shards(groups):
    """Shards numbered in placement order with the given chain ids."""
    return [Shard(i, 0, "p", i, i + 1, i, 10, g) for i, g in enumerate(groups)]


def test_chain_links_join_consecutive_shards_of_one_group():
    assert chain_links(chain_shards([0, 0, 0, 1, 2, 2])) == {1: 0, 2: 1, 5: 4}
    assert chain_links(chain_shards([-1, -1])) == {}


def test_a_rank_goes_on_with_its_chain_then_starts_others_then_splits_the_longest():
    pred = chain_links(chain_shards([0, 0, 0, 0, 1, 1, 2]))
    cands = [1, 2, 3, 4, 5, 6]  # shard 0 held
    assert prefer_chains(cands, pred, {0, 1, 2, 3, 4, 5, 6}, mine={0})[0] == 1
    other = prefer_chains(cands, pred, {0, 1, 2, 3, 4, 5, 6}, mine=set())
    assert other[:2] == [4, 6]  # heads of chains nobody runs
    rest = prefer_chains([2, 3], pred, {0, 1, 2, 3}, mine=set())  # shards 0, 1 held by another rank
    assert rest[0] == 3 or rest[0] == 2
    assert prefer_chains([1, 2, 3], pred, {0, 1, 2, 3}, mine=set())[0] == 2  # the middle of 1..3


def test_without_chains_the_claim_order_is_unchanged():
    assert prefer_chains([5, 3, 9], {}, {3, 5, 9}, {1}) == [5, 3, 9]


def test_the_balancing_policy_still_decides_a_chains_next_shard():
    # this rank holds a lot already: its chain's next shard goes to whoever has room
    tokens = {i: 10 for i in range(6)}
    rows = {i: 1 for i in range(6)}
    pred = chain_links(chain_shards([0] * 6))
    held = [0, 1, 2]
    ordered = prefer_chains([3, 4, 5], pred, range(6), mine=set(held))
    assert ordered[0] == 3
    assert by_mix(ordered, list(range(6)), tokens, rows, held, world=2) is None  # 30 > (60 - 10) / 2
    assert by_mix(ordered, list(range(6)), tokens, rows, [2], world=2) == 3


# ---- writing in another order ----------------------------------------------------------------
@pytest.mark.parametrize("budget", [1 << 30, 2000])  # one bucket; many buckets, spilled
def test_write_reordered_writes_every_row_once_in_destination_order(tmp_path, budget):
    n = 5000
    rng = np.random.default_rng(0)
    dest = rng.permutation(n)
    src = pa.table({"v": pa.array(np.arange(n)), "s": pa.array([f"r{i}" for i in range(n)])})
    out = []
    batches = ((b, dest[i * 700 : i * 700 + b.num_rows]) for i, b in enumerate(src.to_batches(max_chunksize=700)))
    write_reordered(batches, n, out.append, str(tmp_path), budget=budget, out_rows=999)
    got = pa.concat_tables(out)
    want = np.empty(n, dtype=np.int64)
    want[dest] = np.arange(n)
    assert got.column("v").to_pylist() == want.tolist()
    assert max(t.num_rows for t in out) <= 999
    assert not list(tmp_path.iterdir())  # the spill is gone


@pytest.mark.parametrize("dest", [[0, 1, 1, 3], [0, 1, 2], [0, 1, 2, 9]])
def test_write_reordered_refuses_missing_duplicated_or_foreign_rows(tmp_path, dest):
    batch = pa.RecordBatch.from_pydict({"v": list(range(len(dest)))})
    with pytest.raises(OrderError):
        write_reordered([(batch, np.array(dest))], 4, lambda t: None, str(tmp_path))


def test_the_plan_prints_the_shared_fraction_and_the_prefill_it_expects_to_save():
    from types import SimpleNamespace

    from hpcinfer.planning.render import _prefix_lines

    sharing = px.Sharing(
        "auto", True, prompt_tokens=1000, shared_tokens=800, prefill_input_order=900, prefill_placed=300
    )
    (line,) = _prefix_lines(SimpleNamespace(prefix=sharing.to_json()))
    assert "80% of ~1,000 prompt tokens" in line and "~900 tokens in input order, ~300 placed" in line
    assert "saves ~600, 3.00x less" in line and "placement on (auto" in line
    assert _prefix_lines(SimpleNamespace(prefix=None)) == []


def test_by_chain_goes_on_within_the_share_and_leaves_the_rest_to_the_others():
    from hpcinfer.rank.schedule import by_chain

    shards = chain_shards([0, 0, 0, 0, 1, 1, 1, 1])
    pred = chain_links(shards)
    tokens = {s.shard: 10 for s in shards}
    rows = {s.shard: 1 for s in shards}
    left = list(range(8))
    # holding shard 0 of 80 tokens left at 2 ranks: its chain's next shard, not chain 1's head
    assert by_chain(range(1, 8), pred, left, tokens, rows, [0], {0}, world=2) == 1
    # holding 40 of 80: more would exceed its share; the policy gives it nothing now
    assert by_chain([4, 5, 6, 7], pred, left, tokens, rows, [0, 1, 2, 3], {0, 1, 2, 3}, world=2) is None
    # another rank, idle: chain 1's head
    assert by_chain([4, 5, 6, 7], pred, left, tokens, rows, [], set(), world=2) == 4
