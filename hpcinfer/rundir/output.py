"""The output contract: every input column unchanged, then the generated columns. Pure.

This module owns the output schema: `RowResult` (what generating one row gives), `GENERATED` (its
columns and their Arrow types, in output order) and `OUTPUT_COLUMNS` (their names, which no input
column may take). A new output column is a field of RowResult and a field of GENERATED.

Shard files carry one more column, ROW_COLUMN (the row's global position), which finalize uses
to prove every row is present exactly once and in order, and then drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import pyarrow as pa

ROW_COLUMN = "__hpcinfer_row"


@dataclass
class RowResult:
    """One row's generated columns: its generation, or the `error` that kept it from being
    generated (then `generated_text` and `finish_reason` are None)."""

    generated_text: Optional[str]
    finish_reason: Optional[str]
    prompt_tokens: int
    output_tokens: int
    error: Optional[str]


GENERATED = pa.schema(
    [
        ("generated_text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("error", pa.string()),
    ]
)

OUTPUT_COLUMNS: Tuple[str, ...] = tuple(GENERATED.names)  # the columns hpcinfer adds to every row


def result_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of results.parquet."""
    return pa.schema(list(input_schema) + list(GENERATED))


def shard_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of a shard output file: the result schema plus the global row position."""
    return result_schema(input_schema).append(pa.field(ROW_COLUMN, pa.int64()))


def output_table(
    inputs: pa.Table, positions: Sequence[int], results: Sequence[RowResult], global_start: int
) -> pa.Table:
    """Output rows for `inputs` rows `positions` (in that order) with their results and global
    positions (global_start + position)."""
    if len(results) != len(positions):
        raise ValueError(f"{len(results)} results for {len(positions)} input rows")
    arrays = list(inputs.take(pa.array(positions, type=pa.int64())).columns)
    for f in GENERATED:
        arrays.append(pa.array([getattr(r, f.name) for r in results], type=f.type))
    arrays.append(pa.array([global_start + p for p in positions], type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=shard_schema(inputs.schema))


def shard_table(inputs: pa.Table, results: Sequence[RowResult], global_start: int) -> pa.Table:
    """A whole shard's output: all its input rows in order."""
    return output_table(inputs, range(inputs.num_rows), results, global_start)


def assemble(parts: Sequence[pa.Table], global_start: int, rows: int) -> pa.Table:
    """A shard's output from its parts (rows in any order): sorted by position, each row once.

    A row found in several parts (two attempts of one rank that overlapped, e.g. an orphan on a
    lost node) is kept once, from the earliest part: every attempt computes the same result for
    a row (per-row seeds). ValueError unless rows global_start .. global_start+rows-1 are all there."""
    if not parts:
        raise ValueError(f"no parts for a shard of {rows} rows")
    table = pa.concat_tables(parts)
    first = {}
    for i, p in enumerate(table.column(ROW_COLUMN).to_pylist()):
        first.setdefault(p, i)
    if sorted(first) != list(range(global_start, global_start + rows)):
        raise ValueError(
            f"parts hold {len(first)} distinct rows of {rows}, or foreign ones "
            f"(expected {global_start}..{global_start + rows - 1})"
        )
    return table.take(pa.array([first[p] for p in sorted(first)], type=pa.int64()))
