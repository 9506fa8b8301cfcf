"""Input data: discovery, schema checks, sharding, the shard manifest and reading a shard.

The global row order is the order of the input files (sorted paths) and, within a file, its row
order. Two ways to cut it into shards (both pure; reading files and the manifest are at the edges):

- `make_shards` (schedule.mode=static): ranks get contiguous, near-equal ranges of that order (the
  remainder spread over the first ranks), each cut at file boundaries and at `data.shard_rows`.
- `cut_by_tokens` (dynamic): shards of about equal *estimated work* (see `row_tokens`), cut at
  file boundaries and at `data.shard_rows`; ranks claim them at run time, densest first
  (`claims.py`). Each shard's `rank` is then only where greedy longest-first balancing expects
  it (`expected_ranks`), for the plan.
"""
from __future__ import annotations

import base64
import glob as globlib
import os
import stat
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import OUTPUT_COLUMNS
from .errors import DataError

SCHEMA_KEY = b"hpcinfer.input_schema"


@dataclass(frozen=True)
class InputFile:
    path: str
    rows: int


@dataclass(frozen=True)
class Inputs:
    """The scanned input: files in global order and the schema all rows share."""

    files: List[InputFile]
    schema: pa.Schema

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass(frozen=True)
class Shard:
    """A contiguous range of one input file's rows: owned by one rank (static), or claimed by
    whichever rank has room (dynamic; `rank` is then the expected one)."""

    shard: int
    rank: int
    path: str
    file_start: int
    file_end: int
    global_start: int
    tokens: int = 0  # estimated prompt + output tokens of its rows (the dynamic schedule's size)

    @property
    def rows(self) -> int:
        return self.file_end - self.file_start


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


def cut_by_tokens(files: Sequence[InputFile], tokens: Sequence[Sequence[int]], ranks: int, shards_per_rank: int,
                  max_rows: int) -> List[Shard]:
    """Cut the global row order into shards of about total_tokens / (ranks x shards_per_rank)
    estimated tokens (`tokens[i][j]`: row j of file i), never across a file boundary and never
    over `max_rows` rows. Shards are numbered in global order; `rank` is `expected_ranks`'."""
    import numpy as np

    if max_rows < 1 or shards_per_rank < 1 or ranks < 1:
        raise ValueError(f"max_rows, shards_per_rank and ranks must be >= 1, got {max_rows}, {shards_per_rank}, {ranks}")
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


def claim_order(shards: Sequence[Shard]) -> List[Shard]:
    """The order ranks claim shards in: densest first (estimated tokens per row: the longest
    requests start early, on every rank), then largest, then input order."""
    return sorted(shards, key=lambda s: (-s.tokens / max(1, s.rows), -s.tokens, s.shard))


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
PROMPT_TOKEN_COST = 0.25  # a prompt token (prefilled in parallel) costs about this many output tokens (decoded one per step)


def row_tokens(files: Sequence[InputFile], prompt_column: str, max_tokens_column: Optional[str],
               max_tokens: int) -> List["np.ndarray"]:  # noqa: F821
    """Estimated work of every row, per file, in output-token equivalents: its prompt's tokens
    (UTF-8 bytes / BYTES_PER_TOKEN) weighted by PROMPT_TOKEN_COST, plus its output cap (its
    `max_tokens_column` value, else `max_tokens`). Only relative sizes matter: they cut shards
    of equal work and order the claims. Streams the columns batch by batch, so memory stays
    small whatever the prompt sizes."""
    import numpy as np

    out = []
    for f in files:
        parts = []
        if f.rows:
            columns = [prompt_column] + ([max_tokens_column] if max_tokens_column else [])
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=65536, columns=columns):
                nbytes = pc.fill_null(pc.binary_length(batch.column(0).cast(pa.large_string())), 0)
                cap = (pc.fill_null(batch.column(1), max_tokens).to_numpy(zero_copy_only=False)
                       if max_tokens_column else max_tokens)
                prompt = nbytes.to_numpy(zero_copy_only=False) // BYTES_PER_TOKEN + 1
                parts.append((prompt * PROMPT_TOKEN_COST).astype(np.int64) + 1 + cap)
        out.append(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64))
    return out


def check_max_tokens(inputs: Inputs, column: str) -> None:
    """The per-row output cap column holds integers >= 1 (nulls: sampling.max_tokens)."""
    typ = inputs.schema.field(column).type
    if not pa.types.is_integer(typ) and not pa.types.is_null(typ):
        raise DataError(f"data.max_tokens_column={column!r} has type {typ}; expected integers")
    for f in inputs.files:
        if not f.rows or pa.types.is_null(typ):
            continue
        values = _read_column(f.path, column)
        bad = pc.less(values, 1)
        if pc.any(bad).as_py():
            row = _rows_where(bad)[0]
            raise DataError(f"data.max_tokens_column={column!r} must be >= 1, but row {row} of {f.path!r} "
                            f"has {values[row].as_py()!r}")


# ---- discovery and checks ---------------------------------------------------------------
def discover(spec: str) -> List[str]:
    """Input files for a path, a directory (its *.parquet files) or a glob, in sorted order."""
    spec = os.path.expanduser(spec)
    if any(c in spec for c in "*?["):
        paths = sorted(p for p in globlib.glob(spec) if os.path.isfile(p))
        if not paths:
            raise DataError(f"data.input={spec!r} matches no files")
        return paths
    if os.path.isdir(spec):
        paths = sorted(globlib.glob(os.path.join(spec, "*.parquet")))
        if not paths:
            raise DataError(f"data.input={spec!r} is a directory without *.parquet files")
        return paths
    if not os.path.exists(spec):
        raise DataError(f"data.input={spec!r} does not exist")
    return [spec]


def scan(paths: Iterable[str], prompt_column: str, id_column: Optional[str] = None,
         max_tokens_column: Optional[str] = None) -> Inputs:
    """Open every file's footer, check the columns, unify the schemas. Reads no row data except
    the id column when one is given (to check it is unique)."""
    files, schemas = [], []
    for path in paths:
        pf = _open(path)
        schema = pf.schema_arrow
        files.append(InputFile(os.path.abspath(path), pf.metadata.num_rows))
        if len(schema) == 0 and pf.metadata.num_rows == 0:
            continue  # an empty file without columns: nothing to check
        _check_columns(path, schema, prompt_column, id_column, max_tokens_column)
        schemas.append((path, schema.remove_metadata()))
    if not schemas:
        raise DataError(f"data.input has no columns: {[f.path for f in files]!r}")
    inputs = Inputs(files, _unify(schemas))
    if inputs.rows == 0:
        raise DataError(f"data.input has no rows: all {len(files)} file(s) are empty, e.g. {files[0].path!r}")
    if id_column is not None:
        check_unique_ids(inputs, id_column)
    if max_tokens_column is not None:
        check_max_tokens(inputs, max_tokens_column)
    return inputs


def _open(path: str) -> pq.ParquetFile:
    """The file's Parquet footer; DataError naming the file when it is not a readable Parquet file.
    Only regular files are opened (a FIFO would block forever)."""
    _check_readable(path)
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"data.input file {path!r} is not a Parquet file ({str(e).splitlines()[0]})") from None


def _check_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            with open(path, "rb"):
                return
    except PermissionError:
        raise DataError(f"data.input file {path!r} is not readable (permission denied)") from None
    except OSError as e:
        link = " (a symbolic link to a missing file)" if os.path.islink(path) else ""
        raise DataError(f"data.input file {path!r} cannot be read{link}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"data.input {path!r} is a directory inside the input set; give Parquet files")
    raise DataError(f"data.input {path!r} is not a regular file (a FIFO, socket or device); give Parquet files")


def _check_columns(path: str, schema: pa.Schema, prompt_column: str, id_column: Optional[str],
                   max_tokens_column: Optional[str] = None) -> None:
    names = schema.names
    if prompt_column not in names:
        raise DataError(f"data.prompt_column={prompt_column!r} is not a column of {path!r} (columns: {names})")
    ptype = schema.field(prompt_column).type
    if not (pa.types.is_string(ptype) or pa.types.is_large_string(ptype) or pa.types.is_null(ptype)
            or getattr(pa.types, "is_string_view", lambda t: False)(ptype)):
        raise DataError(f"data.prompt_column={prompt_column!r} in {path!r} has type {ptype}; expected string")
    if id_column is not None and id_column not in names:
        raise DataError(f"data.id_column={id_column!r} is not a column of {path!r} (columns: {names})")
    if max_tokens_column is not None and max_tokens_column not in names:
        raise DataError(f"data.max_tokens_column={max_tokens_column!r} is not a column of {path!r} (columns: {names})")
    clash = [c for c in OUTPUT_COLUMNS if c in names]
    if clash:
        raise DataError(f"{path!r} already has column(s) {clash}, which hpcinfer adds to the output; rename them")


def _unify(schemas: List[Tuple[str, pa.Schema]]) -> pa.Schema:
    first_path, first = schemas[0]
    for path, schema in schemas[1:]:
        if schema.names != first.names:
            raise DataError(f"input files disagree on columns: {first_path!r} has {first.names}, "
                            f"{path!r} has {schema.names}")
    try:
        return pa.unify_schemas([s for _, s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"input files have incompatible column types: {str(e).splitlines()[0]}") from None


def check_unique_ids(inputs: Inputs, id_column: str) -> None:
    """The id column has no nulls and no value twice; DataError naming a bad value and its files."""
    typ = inputs.schema.field(id_column).type
    columns = [(f.path, _read_column(f.path, id_column).cast(typ)) for f in inputs.files if f.rows]
    ids = pa.chunked_array([c for _, c in columns], type=typ)
    if ids.null_count:
        path, rows = next((p, _rows_where(pc.is_null(c))) for p, c in columns if c.null_count)
        raise DataError(f"data.id_column={id_column!r} has {ids.null_count} null value(s), e.g. row "
                        f"{rows[0]} of {path!r}")
    if not _all_distinct(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        where = [f"row {r} of {p!r}" for p, c in columns for r in _rows_where(pc.equal(c, dup[0]))]
        raise DataError(f"data.id_column={id_column!r} is not unique: {len(dup)} value(s) repeat, "
                        f"e.g. {dup[:3].to_pylist()!r}; {dup[0].as_py()!r} is at {' and '.join(where[:3])}"
                        + (f" and {len(where) - 3} more row(s)" if len(where) > 3 else ""))


def _all_distinct(ids: pa.ChunkedArray) -> bool:
    """No value twice. Integers: sort and compare neighbours (a fraction of a hash table's memory
    and time at 10M+ ids); other types: pyarrow's unique."""
    if pa.types.is_integer(ids.type):
        import numpy as np

        values = np.sort(ids.to_numpy())
        return not bool((values[1:] == values[:-1]).any())
    return len(pc.unique(ids)) == len(ids)


def _read_column(path: str, column: str) -> pa.ChunkedArray:
    try:
        return pq.read_table(path, columns=[column]).column(0)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data.input file {path!r}: cannot read column {column!r} ({str(e).splitlines()[0]})") from None


def _rows_where(mask: pa.ChunkedArray) -> List[int]:
    return pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()


# ---- the manifest ----------------------------------------------------------------------
def write_manifest(path: str, shards: Sequence[Shard], schema: pa.Schema) -> None:
    from .rundir import atomic_path

    table = pa.Table.from_pylist([asdict(s) for s in shards], schema=_MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({SCHEMA_KEY: base64.b64encode(schema.serialize().to_pybytes())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: str) -> Tuple[List[Shard], pa.Schema]:
    """The shards, in global order, and the input schema every shard is cast to."""
    table = pq.read_table(path)
    raw = base64.b64decode(table.schema.metadata[SCHEMA_KEY])
    schema = pa.ipc.read_schema(pa.py_buffer(raw))
    return [Shard(**row) for row in table.to_pylist()], schema


_MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("rank", pa.int64()), ("path", pa.string()),
    ("file_start", pa.int64()), ("file_end", pa.int64()), ("global_start", pa.int64()), ("tokens", pa.int64()),
])


# ---- reading a shard -------------------------------------------------------------------
def read_shard(shard: Shard, schema: pa.Schema) -> pa.Table:
    """The shard's input rows, cast to the run's input schema. Reads only the row groups that
    overlap the shard."""
    pf = pq.ParquetFile(shard.path)
    groups, first, offset = [], None, 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset < shard.file_end and offset + n > shard.file_start:
            groups.append(i)
            first = offset if first is None else first
        offset += n
    if offset < shard.file_end:
        raise DataError(f"{shard.path!r} has {offset} rows now, fewer than the {shard.file_end} "
                        f"it had when the run was planned")
    table = pf.read_row_groups(groups).slice(shard.file_start - (first or 0), shard.rows)
    table = table.replace_schema_metadata(None)
    return table if table.schema.equals(schema) else table.select(schema.names).cast(schema)
