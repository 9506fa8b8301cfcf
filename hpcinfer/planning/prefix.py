"""Prefix-aware placement (schedule.prefix): rows whose prompts start alike are placed next to
each other, in shards that one rank takes in sequence, so that vLLM's prefix cache serves the
shared start once per rank instead of once per row. Results never depend on it: finalize writes
input order, and every row gets the same request wherever it runs.

**Keys are bytes of the rendered prompt, not tokens.** A row's key is the start of the prompt the
engine gets (the template filled in, the system and user message of a chat, a conversation's
messages, an OpenAI Batch body's messages or prompt), hashed at prefix lengths of 64, 128, ...,
16,384 UTF-8 bytes (`LEVELS`). Bytes rather than tokens because:

- the plan runs where the run is submitted (a login node), before any rank has the tokenizer
  loaded; tokenizing every prompt there would cost minutes at 10M rows, hashing bytes costs a
  few numpy passes over the first 16 KB of each prompt (vectorized: a polynomial hash from one
  cumulative sum per batch, no Python per row, `level_hashes`);
- equal text gives equal tokens: two prompts that share their first n bytes share their first
  tokens too, up to the last token or two before the point where they differ (a BPE merge
  may cross it). vLLM's prefix cache is per block of 16 tokens anyway, so what the key misses
  (a token at the boundary) is below its granularity;
- the key only decides where a row runs, never what it generates: a hash collision or a token
  boundary misjudged costs a cache miss, not a wrong result.

A chat template's text is the same for every row, so keying on the messages' contents (and roles)
groups what the rendered prompts would group. Token counts in the plan are bytes / 4
(`BYTES_PER_TOKEN`, as the work estimates count them).

**Placement.** Rows are sorted by their level hashes, coarsest first (a trie order: rows sharing
a longer start are closer), input order on ties. The sorted rows are cut into shards of about
equal estimated work, as `cut_by_tokens` does, but each cut is moved back, within the second
half of the shard, to where the neighbouring rows share the least (`cut_placed`): a group of rows
smaller than a shard stays whole, a larger one spans consecutive shards. Consecutive shards whose
boundary rows still share at least `LINK_BYTES` form a *chain* (`Shard.group`); the dynamic
schedule hands a rank the next shard of the chain it holds (rank/work.py), and splits a chain
over ranks only when the balancing policy will not let one rank hold more (its share).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcinfer.rundir.records import MESSAGES, OPENAI_BATCH, RequestSpec

LEVELS = tuple(int(64 * 2 ** (k / 2)) for k in range(17))  # 64 B .. 16 KiB in half octaves: ~16 .. ~4,096 tokens
LINK_BYTES = 256  # consecutive shards whose boundary rows share this much form a chain (~64 tokens)
BYTES_PER_TOKEN = 4
AUTO_MIN_SAVED = 0.10  # auto: placement on when it saves this fraction of the prompt tokens over input order
_P = np.uint64(0x100000001B3)  # odd: invertible modulo 2**64
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_MIX = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = pa.scalar("", pa.large_string())
_CHUNK_BYTES = 4 << 20  # hash at most this many prompt bytes at once (bounded memory)


# ---- the rendered prompt's start, per row ------------------------------------------------
def prompt_starts(batch: pa.RecordBatch, request: RequestSpec, limit: int = LEVELS[-1]) -> Tuple[pa.Array, np.ndarray]:
    """(the first `limit` bytes of each row's rendered prompt as large_binary, null where there
    is none; each prompt's full length in bytes). See the module docstring for what is keyed."""
    text = _prompt_text(batch, request)
    text = text.cast(pa.large_binary())
    full = pc.fill_null(pc.binary_length(text), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return pc.binary_slice(text, 0, limit), full


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(batch.schema.get_field_index(name))


def _as_text(col: pa.Array) -> pa.Array:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.large_string())
    try:
        return col.cast(pa.large_string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.large_string())


def _prompt_text(batch: pa.RecordBatch, request: RequestSpec) -> pa.Array:
    if request.kind == OPENAI_BATCH:
        return pa.array([_body_text(v) for v in _column(batch, "body").to_pylist()], pa.large_string())
    if request.kind == MESSAGES:
        return _messages_text(_column(batch, request.messages_column))
    if request.template is not None:
        import string

        pieces: List = []
        for literal, field_name, _spec, _conv in string.Formatter().parse(request.template):
            if literal:
                pieces.append(literal.replace("{{", "{").replace("}}", "}"))
            if field_name is not None:
                pieces.append(_as_text(_column(batch, field_name)))
        if not any(isinstance(p, pa.Array) for p in pieces):
            text = pa.array(["".join(pieces)] * batch.num_rows, pa.large_string())
        else:
            arrays = [
                p if isinstance(p, pa.Array) else pa.array([p] * batch.num_rows, pa.large_string()) for p in pieces
            ]
            text = pc.binary_join_element_wise(*arrays, _EMPTY, null_handling="emit_null")
    else:
        text = _as_text(_column(batch, request.prompt_column))
    if request.chat:  # the chat template's text is every row's: the system message, then the user's
        system = pa.array([(request.system or "") + "\x1e"] * batch.num_rows, pa.large_string())
        text = pc.binary_join_element_wise(system, text, _EMPTY, null_handling="emit_null")
    return text


def _messages_text(column: pa.Array) -> pa.Array:
    """Each conversation as 'role\\x1fcontent\\x1e...' (null for a null one)."""
    if not _flat_ok(column):  # JSON text, or another shape: row by row
        return pa.array([_conv_text(conv) for conv in column.to_pylist()], pa.large_string())
    flat = pc.list_flatten(column)
    role = _as_text(pc.struct_field(flat, "role"))
    content = _as_text(pc.struct_field(flat, "content"))
    sep = [pa.array([s] * len(flat), pa.large_string()) for s in ("\x1f", "\x1e")]
    pieces = pc.binary_join_element_wise(
        pc.fill_null(role, ""), sep[0], pc.fill_null(content, ""), sep[1], _EMPTY, null_handling="replace"
    )
    offsets = pc.subtract(column.offsets, column.offsets[0]).cast(pa.int64())
    lists = pa.LargeListArray.from_arrays(offsets, pieces, mask=column.is_null())
    return pc.binary_join(lists, _EMPTY).cast(pa.large_string())


def _flat_ok(column: pa.Array) -> bool:
    typ = column.type
    return (
        (pa.types.is_list(typ) or pa.types.is_large_list(typ))
        and pa.types.is_struct(typ.value_type)
        and typ.value_type.get_field_index("role") >= 0
        and typ.value_type.get_field_index("content") >= 0
    )


def _conv_text(conv) -> Optional[str]:
    if isinstance(conv, str):  # JSON text in a string column
        try:
            conv = json.loads(conv)
        except ValueError:
            return conv
    if not isinstance(conv, list):
        return None
    return "".join(
        f"{m.get('role', '')}\x1f{m.get('content', '')}\x1e" if isinstance(m, dict) else str(m) for m in conv
    )


def _body_text(body: Optional[str]) -> Optional[str]:
    try:
        d = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(d, dict):
        return None
    if isinstance(d.get("messages"), list):
        return _conv_text(d["messages"])
    return d.get("prompt") if isinstance(d.get("prompt"), str) else None


# ---- hashing: all levels from one cumulative sum ----------------------------------------
def level_hashes(starts: pa.Array, levels: Sequence[int] = LEVELS) -> np.ndarray:
    """[rows, len(levels)] uint64: row i's hash of its first min(level, length) bytes (equal
    starts, equal hashes; lengths differing, hashes differing). Nulls hash as the empty prompt
    with a mark of their own. Pure; a polynomial hash mod 2**64 over the bytes, normalized by the
    row's start, so one cumulative sum per chunk serves every level."""
    starts = starts.cast(pa.large_binary())
    n = len(starts)
    out = np.zeros((n, len(levels)), dtype=np.uint64)
    if n == 0:
        return out
    lengths = pc.fill_null(pc.binary_length(starts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    nulls = starts.is_null().to_numpy(zero_copy_only=False)
    i = 0
    cum = np.cumsum(lengths)
    while i < n:  # chunks of at most _CHUNK_BYTES bytes (one row at least)
        base = cum[i - 1] if i else 0
        j = max(i + 1, int(np.searchsorted(cum, base + _CHUNK_BYTES, side="right")))
        out[i:j] = _hash_chunk(starts.slice(i, j - i), lengths[i:j], levels)
        i = j
    with np.errstate(over="ignore"):
        out[nulls] = _MIX  # a null prompt groups with nothing but nulls
    return out


def _hash_chunk(chunk: pa.Array, lengths: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    chunk = pc.fill_null(chunk, b"")
    if not isinstance(chunk, pa.Array):
        chunk = pa.array([], pa.large_binary())
    offsets_buf, data_buf = chunk.buffers()[1], chunk.buffers()[2]
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
    lo = int(offsets[0])
    total = int(offsets[-1]) - lo
    data = (
        np.frombuffer(data_buf, dtype=np.uint8)[lo : lo + total]
        if data_buf is not None and total
        else np.zeros(0, np.uint8)
    )
    starts = offsets[:-1] - lo
    pw, inv = _powers(total + 1)
    with np.errstate(over="ignore"):
        cum = np.zeros(total + 1, dtype=np.uint64)
        if total:
            np.cumsum((data.astype(np.uint64) + np.uint64(1)) * pw[:total], out=cum[1:])
        out = np.empty((len(lengths), len(levels)), dtype=np.uint64)
        for k, level in enumerate(levels):
            used = np.minimum(lengths, level)
            h = (cum[starts + used] - cum[starts]) * inv[starts]
            out[:, k] = (h ^ (used.astype(np.uint64) * _MIX)) * _P
    return out


_POWERS: List[np.ndarray] = []


def _powers(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """P**j and P**-j mod 2**64 for j < n (made once, grown when a longer chunk comes: to twice
    the size at least, not to a whole chunk's at once, which cost a small input 0.3 s of planning)."""
    if not _POWERS or len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]) if _POWERS else 1 << 16)
        with np.errstate(over="ignore"):
            pw = np.empty(size, dtype=np.uint64)
            inv = np.empty(size, dtype=np.uint64)
            pw[0] = inv[0] = 1
            pw[1:] = np.cumprod(np.full(size - 1, _P, dtype=np.uint64))
            inv[1:] = np.cumprod(np.full(size - 1, _P_INV, dtype=np.uint64))
        _POWERS[:] = [pw, inv]
    return _POWERS[0], _POWERS[1]


# ---- placement -----------------------------------------------------------------------------
def placement_order(hashes: np.ndarray) -> np.ndarray:
    """The rows in placement order: sorted by their level hashes, coarsest level first (rows that
    share a longer start are closer), input order on ties. Pure."""
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.lexsort(hashes.T[::-1]).astype(np.int64)


def shared_depth(hashes: np.ndarray) -> np.ndarray:
    """For each row but the first (in the order of `hashes`), how many levels it shares with the
    row before it (0 .. len(levels)). Pure."""
    if len(hashes) < 2:
        return np.zeros(0, dtype=np.int64)
    eq = hashes[1:] == hashes[:-1]
    return np.cumprod(eq, axis=1).sum(axis=1).astype(np.int64)


def cut_placed(
    tokens: np.ndarray, depth: np.ndarray, target: int, max_rows: int, levels: Sequence[int] = LEVELS
) -> Tuple[List[Tuple[int, int]], List[int]]:
    """Cut rows (in placement order; `tokens` their work, `depth` as `shared_depth`) into shards of
    about `target` work and at most `max_rows` rows: each cut at the boundary, within the second
    half of the shard, where the rows on either side share the fewest levels (the latest such).
    Returns the shards' [start, end) and each shard's chain: the previous shard's when their
    boundary rows share >= LINK_BYTES, else a new one. Pure."""
    n = len(tokens)
    cum = np.concatenate(([0], np.cumsum(tokens, dtype=np.int64)))
    link = next((k + 1 for k, level in enumerate(levels) if level >= LINK_BYTES), len(levels) + 1)
    cuts: List[Tuple[int, int]] = []
    chains: List[int] = []
    start, chain = 0, -1
    while start < n:
        hi = int(np.searchsorted(cum, cum[start] + target, side="left"))
        hi = min(max(hi, start + 1), start + max_rows, n)
        end = hi
        if hi < n and hi - start > 1:
            lo = start + max(1, (hi - start) // 2)
            window = depth[lo - 1 : hi]  # depth[c - 1]: rows c-1 and c, for cuts c in lo..hi
            best = int(window.min())
            end = lo + int(np.flatnonzero(window == best)[-1])
        linked = start > 0 and depth[start - 1] >= link
        chain = chain if linked else chain + 1
        cuts.append((start, end))
        chains.append(chain)
        start = end
    return cuts, chains


@dataclass(frozen=True)
class Sharing:
    """What the plan found (plan.json's `prefix`): prompt tokens (bytes / 4) of all rows, and the
    prefill expected in input order and with placement."""

    mode: str  # the setting: auto | on | off
    placed: bool  # whether placement is on for this run
    prompt_tokens: int
    shared_tokens: int  # prompt tokens some other row starts with too (the most any order could save)
    prefill_input_order: int  # expected prefill, rows in input order (shared only within a shard)
    prefill_placed: int  # expected prefill, rows placed (shared within a chain of shards)

    @property
    def shared_fraction(self) -> float:
        return self.shared_tokens / max(1, self.prompt_tokens)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return dict(asdict(self), shared_fraction=round(self.shared_fraction, 4))


def expected_prefill(hashes: np.ndarray, lengths: np.ndarray, units: np.ndarray, levels: Sequence[int] = LEVELS) -> int:
    """Prompt bytes prefilled when each row's longest start that an earlier row of its unit (a
    shard, a chain: what runs on one rank, one after another) also has comes from the cache. Rows
    are in run order; a level counts only up to the row's length, and only from LINK_BYTES on
    (~64 tokens): vLLM caches whole blocks (16 tokens on GPU, 128 on CPU), and a shorter shared
    start (a template's first words) saves next to nothing, so it is no reason to place. Pure."""
    n = len(lengths)
    if n == 0:
        return 0
    saved = np.zeros(n, dtype=np.int64)
    with np.errstate(over="ignore"):
        salt = units.astype(np.uint64) * _MIX
        for k, level in enumerate(levels):
            if level < LINK_BYTES:
                continue
            key = hashes[:, k] ^ salt
            _, first = np.unique(key, return_index=True)
            repeat = np.ones(n, dtype=bool)
            repeat[first] = False
            saved = np.where(repeat, np.maximum(saved, np.minimum(lengths, level)), saved)
    return int(lengths.sum() - saved.sum())


def decide(mode: str, sharing_prompt: int, prefill_input: int, prefill_placed: int) -> bool:
    """Whether placement is on: `on`/`off` as set; `auto` when it saves at least AUTO_MIN_SAVED
    of the prompt tokens over input order. Pure."""
    if mode in ("on", "off"):
        return mode == "on"
    return prefill_input - prefill_placed >= AUTO_MIN_SAVED * max(1, sharing_prompt)


def iter_starts(
    files: Sequence[str], request: RequestSpec, batch_rows: int = 8192
) -> Iterator[Tuple[pa.Array, np.ndarray]]:
    """`prompt_starts` of every row of `files` (Parquet), in global order, a batch at a time."""
    columns = _needed_columns(request)
    for path in files:
        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows == 0:
            continue
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield prompt_starts(batch, request)


def _needed_columns(request: RequestSpec) -> List[str]:
    if request.kind == OPENAI_BATCH:
        return ["body"]
    if request.kind == MESSAGES:
        return [request.messages_column]
    if request.template is not None:
        return request.template_columns()
    return [request.prompt_column]
