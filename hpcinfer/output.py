"""The output contract: every input column unchanged, then the generated columns.

Shard files carry one more column, ROW_COLUMN (the row's global position), which finalize uses
to prove every row is present exactly once and in order, and then drops. Pure.
"""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from .engine import RowResult

ROW_COLUMN = "__hpcinfer_row"

GENERATED = pa.schema([
    ("generated_text", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("error", pa.string()),
])


def result_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of results.parquet."""
    return pa.schema(list(input_schema) + list(GENERATED))


def shard_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of a shard output file: the result schema plus the global row position."""
    return result_schema(input_schema).append(pa.field(ROW_COLUMN, pa.int64()))


def shard_table(inputs: pa.Table, results: Sequence[RowResult], global_start: int) -> pa.Table:
    """A shard's output: its input rows, the generated columns and their global positions."""
    if len(results) != inputs.num_rows:
        raise ValueError(f"{len(results)} results for {inputs.num_rows} input rows")
    arrays = list(inputs.columns)
    for f in GENERATED:
        arrays.append(pa.array([getattr(r, f.name) for r in results], type=f.type))
    arrays.append(pa.array(range(global_start, global_start + inputs.num_rows), type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=shard_schema(inputs.schema))
