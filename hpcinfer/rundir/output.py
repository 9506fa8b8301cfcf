"""The output contract: every input column unchanged, then the generated columns. Pure.

This module owns the output schema: `RowResult` (what generating one row gives), `GENERATED` (its
columns and their Arrow types, in output order) and `OUTPUT_COLUMNS` (their names, which no input
column may take). A new output column is a field of RowResult and a field of GENERATED.

Shard files carry one more column, ROW_COLUMN (the row's global position), which finalize uses
to prove every row is present exactly once and in order, and then drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

ROW_COLUMN = "__hpcinfer_row"
SAMPLE_INDEX = "sample_index"  # output.explode_samples: the sample's number within its row


@dataclass(frozen=True)
class OutputSpec:
    """Which generated columns a run has, and their shapes (plan.json's `output`; decided when
    the run is planned from the config and the rows' own sampling, so every rank and finalize
    write the same schema):

    - `samples`: some row may have n > 1: generated_text, finish_reason, output_tokens (and
      cumulative_logprob, logprobs) are lists, one item per sample;
    - `explode`: results.parquet has one row per sample instead, with `sample_index` (shard files
      keep the lists: finalize explodes them);
    - `logprobs` / `prompt_logprobs`: some row asks for them (columns `logprobs` and
      `cumulative_logprob` / `prompt_logprobs`)."""

    samples: bool = False
    explode: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False
    reasoning: bool = False  # output.reasoning_parser: a `reasoning_text` column (per sample)


# One token's logprob: its id, its text, its logprob, and the top alternatives (the token itself
# among them when it is one of the top k). A prompt's first token has no logprob (null).
TOKEN_LOGPROB = pa.struct([("token_id", pa.int64()), ("token", pa.string()), ("logprob", pa.float64())])
LOGPROB = pa.struct(
    [
        ("token_id", pa.int64()),
        ("token", pa.string()),
        ("logprob", pa.float64()),
        ("top_logprobs", pa.list_(TOKEN_LOGPROB)),
    ]
)


@dataclass
class Sample:
    """One completion of a row (vLLM's CompletionOutput, as columns)."""

    text: str
    finish_reason: Optional[str]
    output_tokens: int
    cumulative_logprob: Optional[float] = None  # with logprobs
    logprobs: Optional[List[Dict[str, Any]]] = None  # with logprobs: one LOGPROB per generated token
    reasoning_text: Optional[str] = None  # output.reasoning_parser: the reasoning (text: the answer)


@dataclass
class RowResult:
    """One row's generated columns: its generation, or the `error` that kept it from being
    generated (then `generated_text` and `finish_reason` are None). `generated_text`,
    `finish_reason` are the first sample's, `output_tokens` the sum over `samples` (every
    completion of the row: n of them)."""

    generated_text: Optional[str]
    finish_reason: Optional[str]
    prompt_tokens: int
    output_tokens: int
    error: Optional[str]
    samples: List[Sample] = field(default_factory=list)
    prompt_logprobs: Optional[List[Dict[str, Any]]] = None  # one LOGPROB per prompt token


GENERATED = pa.schema(
    [
        ("generated_text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("error", pa.string()),
    ]
)

# Every column hpcinfer may add to a row (no input column may take one of these names)
OUTPUT_COLUMNS: Tuple[str, ...] = (
    *GENERATED.names,
    "cumulative_logprob",
    "logprobs",
    "prompt_logprobs",
    "reasoning_text",
    SAMPLE_INDEX,
)
PER_SAMPLE = ("generated_text", "finish_reason", "output_tokens", "cumulative_logprob", "logprobs", "reasoning_text")


def generated_schema(spec: Optional[OutputSpec] = None, exploded: bool = False) -> pa.Schema:
    """The generated columns of a run, in output order: per sample a list when `spec.samples`
    (shard files; `exploded`: results.parquet of an exploded run, one row per sample). Pure."""
    spec = spec or OutputSpec()
    fields = [f for f in GENERATED if f.name != "error"]
    if spec.logprobs:
        fields += [pa.field("cumulative_logprob", pa.float64()), pa.field("logprobs", pa.list_(LOGPROB))]
    if spec.prompt_logprobs:
        fields.append(pa.field("prompt_logprobs", pa.list_(LOGPROB)))
    if spec.reasoning:
        fields.append(pa.field("reasoning_text", pa.string()))
    fields.append(GENERATED.field("error"))
    if spec.samples and not exploded:
        fields = [pa.field(f.name, pa.list_(f.type)) if f.name in PER_SAMPLE else f for f in fields]
    if exploded:
        fields.insert(0, pa.field(SAMPLE_INDEX, pa.int64()))
    return pa.schema(fields)


def result_schema(input_schema: pa.Schema, spec: Optional[OutputSpec] = None) -> pa.Schema:
    """Schema of results.parquet."""
    spec = spec or OutputSpec()
    return pa.schema(list(input_schema) + list(generated_schema(spec, exploded=spec.explode)))


def shard_schema(input_schema: pa.Schema, spec: Optional[OutputSpec] = None) -> pa.Schema:
    """Schema of a shard output file: the generated columns (samples as lists) plus the global row position."""
    return pa.schema(list(input_schema) + list(generated_schema(spec))).append(pa.field(ROW_COLUMN, pa.int64()))


def _value(r: RowResult, name: str, spec: OutputSpec) -> Any:
    """Column `name` of one row's result."""
    if name in ("prompt_tokens", "error", "prompt_logprobs"):
        return getattr(r, name)
    samples = r.samples or (
        [] if r.error is not None else [Sample(r.generated_text or "", r.finish_reason, r.output_tokens)]
    )
    key = "text" if name == "generated_text" else name
    if spec.samples:
        return None if r.error is not None else [getattr(s, key) for s in samples]
    if name in ("generated_text", "finish_reason", "output_tokens"):
        return getattr(r, name)
    return getattr(samples[0], key) if samples else None


def output_table(
    inputs: pa.Table,
    positions: Sequence[int],
    results: Sequence[RowResult],
    global_start: int,
    spec: Optional[OutputSpec] = None,
) -> pa.Table:
    """Output rows for `inputs` rows `positions` (in that order) with their results and global
    positions (global_start + position)."""
    if len(results) != len(positions):
        raise ValueError(f"{len(results)} results for {len(positions)} input rows")
    spec = spec or OutputSpec()
    arrays = list(inputs.take(pa.array(positions, type=pa.int64())).columns)
    for f in generated_schema(spec):
        arrays.append(pa.array([_value(r, f.name, spec) for r in results], type=f.type))
    arrays.append(pa.array([global_start + p for p in positions], type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=shard_schema(inputs.schema, spec))


def token_sum(column: Any) -> int:
    """The sum of an output_tokens column: integers, or lists of them (one per sample). Pure."""
    if pa.types.is_list(column.type):
        column = pc.list_flatten(column)
    return int(pc.sum(column).as_py() or 0)


def explode(table: Any) -> pa.Table:
    """One row per sample of a table with samples as lists (a shard's generated columns), in
    order (rows in their order, then their samples), each with its `sample_index` before
    generated_text; a row without samples (an error) stays one row, with sample_index null. Pure."""
    import numpy as np

    table = table.combine_chunks() if isinstance(table, pa.Table) else pa.Table.from_batches([table])
    texts = table.column("generated_text").combine_chunks()
    null = pc.is_null(texts).to_numpy(zero_copy_only=False)
    lengths = np.where(null, 1, pc.fill_null(pc.list_value_length(texts), 1).to_numpy(zero_copy_only=False))
    parents = np.repeat(np.arange(table.num_rows), lengths).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    index = np.arange(len(parents), dtype=np.int64) - np.repeat(starts, lengths)
    out = table.take(pa.array(parents, pa.int64()))
    columns, fields = [], []
    for f in table.schema:
        if f.name in PER_SAMPLE:
            col = table.column(f.name).combine_chunks()
            filled = pc.if_else(pc.is_null(col), pa.scalar([None], f.type), col)
            columns.append(pc.list_flatten(filled))
            fields.append(pa.field(f.name, f.type.value_type))
        else:
            columns.append(out.column(f.name))
            fields.append(f)
        if f.name == "generated_text":
            columns.insert(-1, pa.array(index, pa.int64(), mask=np.repeat(null, lengths)))
            fields.insert(-1, pa.field(SAMPLE_INDEX, pa.int64()))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


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
