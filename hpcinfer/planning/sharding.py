"""Cutting the global row order into shards (pure), and the work estimates that size them.

- `make_shards` (schedule.mode=static): ranks get contiguous, near-equal ranges of the rows (the
  remainder spread over the first ranks), each cut at file boundaries and at `data.shard_rows`.
- `cut_by_tokens` (dynamic): shards of about equal *estimated work* (see `row_tokens`), cut at
  file boundaries and at `data.shard_rows`; ranks claim them at run time, densest first
  (rank/schedule.py). Each shard's `rank` is then only where greedy longest-first balancing
  expects it (`expected_ranks`), for the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcinfer.config import SamplingConfig, row_sampling
from hpcinfer.planning.inputs import InputFile
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.records import MESSAGES, OPENAI_BATCH, PROMPT, RequestSpec


# ---- pure: partitioning ----------------------------------------------------------------
def partition(n_rows: int, ranks: int) -> List[Tuple[int, int]]:
    """Contiguous [start, end) ranges for `ranks` ranks, sizes differing by at most one
    (the first n_rows % ranks ranks get one more row)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    base, extra = divmod(n_rows, ranks)
    out, start = [], 0
    for r in range(ranks):
        end = start + base + (1 if r < extra else 0)
        out.append((start, end))
        start = end
    return out


def active_ranks(n_rows: int, dp: int) -> int:
    """Ranks that get work: every rank gets at least one row, so at most n_rows ranks."""
    return max(1, min(dp, n_rows))


def make_shards(files: Sequence[InputFile], ranks: int, max_rows: int) -> List[Shard]:
    """Cut the global row order into shards: per rank (see `partition`), then at file boundaries
    and every `max_rows` rows. Shards are numbered in global order."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    bounds, offset = [], 0  # (global_start, global_end, file) for non-empty files
    for f in files:
        if f.rows:
            bounds.append((offset, offset + f.rows, f))
        offset += f.rows
    shards: List[Shard] = []
    for rank, (lo, hi) in enumerate(partition(offset, ranks)):
        for f_lo, f_hi, f in bounds:
            start, end = max(lo, f_lo), min(hi, f_hi)
            for s in range(start, end, max_rows):
                e = min(s + max_rows, end)
                shards.append(Shard(len(shards), rank, f.path, s - f_lo, e - f_lo, s))
    return shards


def cut_by_tokens(
    files: Sequence[InputFile], tokens: Sequence[Sequence[int]], ranks: int, shards_per_rank: int, max_rows: int
) -> List[Shard]:
    """Cut the global row order into shards of about total_tokens / (ranks x shards_per_rank)
    estimated tokens (`tokens[i][j]`: row j of file i), never across a file boundary and never
    over `max_rows` rows. Shards are numbered in global order; `rank` is `expected_ranks`'."""
    import numpy as np

    if max_rows < 1 or shards_per_rank < 1 or ranks < 1:
        raise ValueError(
            f"max_rows, shards_per_rank and ranks must be >= 1, got {max_rows}, {shards_per_rank}, {ranks}"
        )
    per_file = [np.asarray(t, dtype=np.int64) for t in tokens]
    total = int(sum(int(t.sum()) for t in per_file))
    target = max(1, -(-total // (ranks * shards_per_rank)))
    cuts: List[Tuple[int, int, int, int, int]] = []  # (file index, start, end, global start, tokens)
    offset = 0
    for i, (f, t) in enumerate(zip(files, per_file, strict=True)):
        if len(t) != f.rows:
            raise ValueError(f"{f.path}: {len(t)} token estimates for {f.rows} rows")
        cum = np.concatenate(([0], np.cumsum(t)))
        start = 0
        while start < f.rows:
            by_tokens = int(np.searchsorted(cum, cum[start] + target, side="left"))
            end = min(max(by_tokens, start + 1), start + max_rows, f.rows)
            cuts.append((i, start, end, offset + start, int(cum[end] - cum[start])))
            start = end
        offset += f.rows
    home = expected_ranks([c[4] for c in cuts], ranks)
    return [Shard(n, home[n], files[i].path, lo, hi, g, tok) for n, (i, lo, hi, g, tok) in enumerate(cuts)]


def expected_ranks(sizes: Sequence[int], ranks: int) -> List[int]:
    """For each item, the rank greedy longest-first assignment gives it (the least loaded rank
    when its turn comes, lowest rank on ties): what dynamic claiming approximates."""
    import heapq

    load = [(0, r) for r in range(ranks)]
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        used, r = heapq.heappop(load)
        out[i] = r
        heapq.heappush(load, (used + sizes[i], r))
    return out


# ---- token estimates -------------------------------------------------------------------
BYTES_PER_TOKEN = 4  # a rough rule for BPE tokenizers on text


PROMPT_TOKEN_COST = (
    0.25  # a prompt token (prefilled in parallel) costs about this many output tokens (decoded one per step)
)


def row_tokens(
    files: Sequence[InputFile],
    prompt_column: Optional[str],
    max_tokens_column: Optional[str],
    max_tokens: int,
    request: Optional[RequestSpec] = None,
    max_model_len: Optional[int] = None,
    sampling: Optional[SamplingConfig] = None,
) -> List[np.ndarray]:  # noqa: F821
    """Estimated work of every row, per file, in output-token equivalents: its prompt's tokens
    (UTF-8 bytes / BYTES_PER_TOKEN) weighted by PROMPT_TOKEN_COST, plus its output cap (its
    `max_tokens_column` value, else `max_tokens`). Only relative sizes matter: they cut shards
    of equal work and order the claims. Streams the columns batch by batch, so memory stays
    small whatever the prompt sizes.

    The prompt is what the engine gets (`request`, planning/prompts.py): the template's text with
    its columns filled in, a conversation's messages (and the chat template's few bytes per
    message), an OpenAI Batch line's body, whose max_tokens is then the row's cap (else
    `max_model_len`, as vLLM's server fills the context, else `max_tokens`).

    With `sampling` (the run's sampling.*), a row's output cap is its max_tokens times its n,
    each the row's own in `request.sampling_column` where it has them (config.row_sampling;
    an invalid value: the row's error, little work)."""
    import numpy as np

    kind = request.kind if request is not None else PROMPT
    own = request.sampling_column if request is not None and sampling is not None else None
    measured, literal = _measured_columns(request, prompt_column)
    out = []
    for f in files:
        parts = []
        if f.rows:
            columns = list(dict.fromkeys(measured + [c for c in (max_tokens_column, own) if c]))
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=65536, columns=columns):
                nbytes = np.full(batch.num_rows, literal, dtype=np.int64)
                for name in measured:
                    nbytes += _text_bytes(batch.column(batch.schema.get_field_index(name)))
                if kind == OPENAI_BATCH:
                    cap = _body_caps(batch.column(batch.schema.get_field_index("body")), max_model_len or max_tokens)
                    cap = cap * _body_ns(batch.column(batch.schema.get_field_index("body")))
                elif max_tokens_column:
                    col = batch.column(batch.schema.get_field_index(max_tokens_column))
                    cap = pc.fill_null(col, max_tokens).to_numpy(zero_copy_only=False)
                else:
                    cap = max_tokens
                if sampling is not None and kind != OPENAI_BATCH:
                    values = batch.column(batch.schema.get_field_index(own)).to_pylist() if own else None
                    cap = row_caps(
                        np.broadcast_to(np.asarray(cap, dtype=np.int64), (batch.num_rows,)), values, sampling
                    )
                prompt = nbytes // BYTES_PER_TOKEN + 1
                parts.append((prompt * PROMPT_TOKEN_COST).astype(np.int64) + 1 + cap)
        out.append(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64))
    return out


def row_caps(caps: np.ndarray, values: Optional[List[Any]], sampling: SamplingConfig) -> np.ndarray:  # noqa: F821
    """Each row's output tokens at most: its max_tokens (`caps`: data.max_tokens_column's or
    sampling.max_tokens) times n, each overridden by the row's own sampling value (`values`,
    data.sampling_column; None: no such column). Pure."""
    import numpy as np

    if values is None:
        return np.asarray(caps, dtype=np.int64) * sampling.n
    out = np.empty(len(values), dtype=np.int64)
    for i, (cap, value) in enumerate(zip(caps, values, strict=True)):
        own = row_sampling(value, replace(sampling, max_tokens=int(cap)))
        out[i] = 1 if isinstance(own, str) else own.max_tokens * own.n
    return out


@dataclass(frozen=True)
class RowSampling:
    """What the rows' own sampling asks for, over the whole input (planning)."""

    max_n: int = 1  # the largest n of a row
    logprobs: bool = False  # some row asks for logprobs
    prompt_logprobs: bool = False  # some row asks for prompt logprobs


def scan_row_sampling(files: Sequence[InputFile], column: str, sampling: SamplingConfig) -> RowSampling:
    """RowSampling of `column` (data.sampling_column) over `files`, each row's value over
    `sampling` (rows with invalid values do not count: they become errors). Streams the column."""
    max_n, lp, plp = sampling.n, sampling.logprobs is not None, sampling.prompt_logprobs is not None
    for f in files:
        if not f.rows:
            continue
        for batch in pq.ParquetFile(f.path).iter_batches(batch_size=65536, columns=[column]):
            for value in batch.column(0).to_pylist():
                own = row_sampling(value, sampling)
                if not isinstance(own, str):
                    max_n = max(max_n, own.n)
                    lp = lp or own.logprobs is not None
                    plp = plp or own.prompt_logprobs is not None
    return RowSampling(max_n, lp, plp)


def scan_batch_bodies(files: Sequence[InputFile]) -> RowSampling:
    """RowSampling of OpenAI Batch bodies: the largest `n`, and whether a body asks for logprobs
    (chat: `logprobs: true`; completions: `logprobs: k`). Streams the body column."""
    import json

    max_n, lp = 1, False
    for f in files:
        if not f.rows:
            continue
        for batch in pq.ParquetFile(f.path).iter_batches(batch_size=65536, columns=["body"]):
            for text in batch.column(0).to_pylist():
                try:
                    body = json.loads(text) if text else None
                except ValueError:
                    continue
                if not isinstance(body, dict):
                    continue
                if isinstance(body.get("n"), int) and not isinstance(body["n"], bool):
                    max_n = max(max_n, body["n"])
                logprobs = body.get("logprobs")
                lp = lp or (logprobs is not None and logprobs is not False)
    return RowSampling(max_n, lp, False)


CHAT_BYTES_PER_MESSAGE = 16  # what a chat template adds around a message, about


def _measured_columns(request: Optional[RequestSpec], prompt_column: Optional[str]) -> Tuple[List[str], int]:
    """(columns whose bytes make up the prompt, bytes every prompt has besides them)."""
    if request is None:
        return [prompt_column] if prompt_column else [], 0
    if request.kind == OPENAI_BATCH:
        return ["body"], 0
    if request.kind == MESSAGES:
        return [request.messages_column], CHAT_BYTES_PER_MESSAGE
    literal = 0
    if request.template is not None:
        columns = request.template_columns()
        literal = len(request.template.encode()) - sum(len(c) + 2 for c in columns)
    else:
        columns = [request.prompt_column]
    if request.chat:
        literal += CHAT_BYTES_PER_MESSAGE * (2 if request.system else 1) + len((request.system or "").encode())
    return columns, max(0, literal)


def _text_bytes(column: pa.Array) -> np.ndarray:  # noqa: F821
    """UTF-8 bytes of each value: strings as they are, a list of {role, content} messages as its
    contents plus CHAT_BYTES_PER_MESSAGE each, anything else as its text; nulls 0."""
    import numpy as np

    typ = column.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return pc.fill_null(pc.binary_length(column.cast(pa.large_string())), 0).to_numpy(zero_copy_only=False)
    if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_struct(typ.value_type):
        flat = pc.list_flatten(column)
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        sizes = np.full(len(flat), CHAT_BYTES_PER_MESSAGE, dtype=np.int64)
        if typ.value_type.get_field_index("content") >= 0:
            content = pc.struct_field(flat, "content")
            if pa.types.is_string(content.type) or pa.types.is_large_string(content.type):
                sizes += pc.fill_null(pc.binary_length(content.cast(pa.large_string())), 0).to_numpy(
                    zero_copy_only=False
                )
        return np.bincount(parents, weights=sizes, minlength=len(column)).astype(np.int64)
    return np.array([0 if v is None else len(str(v).encode()) for v in column.to_pylist()], dtype=np.int64)


def _body_ns(bodies: pa.Array) -> np.ndarray:  # noqa: F821
    """Each OpenAI Batch body's n (else 1)."""
    import json

    import numpy as np

    ns = []
    for text in bodies.to_pylist():
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        n = body.get("n") if isinstance(body, dict) else None
        ns.append(n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1)
    return np.array(ns, dtype=np.int64)


def _body_caps(bodies: pa.Array, default: int) -> np.ndarray:  # noqa: F821
    """Each OpenAI Batch body's max_completion_tokens or max_tokens (else `default`)."""
    import json

    import numpy as np

    caps = []
    for text in bodies.to_pylist():
        cap = None
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        if isinstance(body, dict):
            for key in ("max_completion_tokens", "max_tokens"):
                if isinstance(body.get(key), int) and body[key] > 0:
                    cap = body[key]
                    break
        caps.append(cap or default)
    return np.array(caps, dtype=np.int64)
