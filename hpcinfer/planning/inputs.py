"""Input data on the submitting machine: discovery (a file, a directory, a glob), and the checks
made before anything is written: readable Parquet files, the prompt column a string, the schemas
of all files one schema, ids unique and non-null, per-row output caps integers >= 1. Reads
footers and the few columns it checks, never whole files. The global row order is the order of
the input files (sorted paths) and, within a file, its row order.
"""

from __future__ import annotations

import glob as globlib
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcinfer.errors import DataError
from hpcinfer.rundir.output import OUTPUT_COLUMNS


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
            raise DataError(
                f"data.max_tokens_column={column!r} must be >= 1, but row {row} of {f.path!r} "
                f"has {values[row].as_py()!r}"
            )


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
        from hpcinfer.planning.convert import EXTENSIONS

        # every entry with an input extension, files or not: a directory or FIFO named like one is refused (scan)
        paths = sorted(p for p in globlib.glob(os.path.join(spec, "*")) if os.path.splitext(p)[1].lower() in EXTENSIONS)
        if not paths:
            others = ", ".join("*" + e for e in EXTENSIONS if e != ".parquet")
            raise DataError(f"data.input={spec!r} is a directory without *.parquet files (nor {others})")
        return paths
    if not os.path.exists(spec):
        raise DataError(f"data.input={spec!r} does not exist")
    return [spec]


def scan(
    paths: Iterable[str],
    prompt_column: Optional[str],
    id_column: Optional[str] = None,
    max_tokens_column: Optional[str] = None,
    check: Optional[Callable[[str, pa.Schema], None]] = None,
) -> Inputs:
    """Open every file's footer, check the columns, unify the schemas. Reads no row data except
    the id column when one is given (to check it is unique). `check(path, schema)`, when given,
    checks the columns the requests read (planning/prompts.py) instead of `prompt_column`."""
    files, schemas = [], []
    for path in paths:
        pf = _open(path)
        schema = pf.schema_arrow
        files.append(InputFile(os.path.abspath(path), pf.metadata.num_rows))
        if len(schema) == 0 and pf.metadata.num_rows == 0:
            continue  # an empty file without columns: nothing to check
        _check_columns(path, schema, None if check else prompt_column, id_column, max_tokens_column)
        if check:
            check(path, schema)
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


def check_readable(paths: Iterable[str]) -> None:
    """Every path is a regular file this user may read (before any is opened: a FIFO would block
    forever); DataError naming the first that is not."""
    for path in paths:
        _check_readable(path)


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
        raise DataError(f"data.input {path!r} is a directory inside the input set; give input files")
    raise DataError(f"data.input {path!r} is not a regular file (a FIFO, socket or device); give input files")


def _check_columns(
    path: str,
    schema: pa.Schema,
    prompt_column: Optional[str],
    id_column: Optional[str],
    max_tokens_column: Optional[str] = None,
) -> None:
    names = schema.names
    if prompt_column is None:
        pass
    elif prompt_column not in names:
        raise DataError(f"data.prompt_column={prompt_column!r} is not a column of {path!r} (columns: {names})")
    ptype = schema.field(prompt_column).type if prompt_column is not None else pa.string()
    if not (
        pa.types.is_string(ptype)
        or pa.types.is_large_string(ptype)
        or pa.types.is_null(ptype)
        or getattr(pa.types, "is_string_view", lambda t: False)(ptype)
    ):
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
            raise DataError(
                f"input files disagree on columns: {first_path!r} has {first.names}, {path!r} has {schema.names}"
            )
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
        raise DataError(
            f"data.id_column={id_column!r} has {ids.null_count} null value(s), e.g. row {rows[0]} of {path!r}"
        )
    if not _all_distinct(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        where = [f"row {r} of {p!r}" for p, c in columns for r in _rows_where(pc.equal(c, dup[0]))]
        raise DataError(
            f"data.id_column={id_column!r} is not unique: {len(dup)} value(s) repeat, "
            f"e.g. {dup[:3].to_pylist()!r}; {dup[0].as_py()!r} is at {' and '.join(where[:3])}"
            + (f" and {len(where) - 3} more row(s)" if len(where) > 3 else "")
        )


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
