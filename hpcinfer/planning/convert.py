"""Input formats: Parquet as it is; JSON Lines, CSV and OpenAI Batch files converted to Parquet in
the run directory (`inputs/`) when the run is planned, so that sharding, work estimates, resume
and the ranks see Parquet only.

- `file_format` / `input_format`: each file's format (data.format, or by extension when `auto`;
  a `.jsonl` whose first line has `custom_id` and `body` is `openai_batch`); files of more than
  one format in one input are refused.
- `convert`: streams each file into `inputs/<n>.parquet` (temp file + rename; memory bounded by
  one block of rows), JSON Lines and CSV through pyarrow's streaming readers, OpenAI Batch line
  by line. An OpenAI Batch line that is not a JSON object of the right shape is kept as a row
  whose request is invalid (the rank gives it its error): the run goes on. `inputs/sources.json`
  records what was converted (paths, sizes, modification times), so that resuming a run reuses
  the conversion, and refuses input files that changed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pyarrow as pa

from hpcinfer.errors import DataError

PARQUET, JSONL, CSV, OPENAI_BATCH = "parquet", "jsonl", "csv", "openai_batch"
EXTENSIONS = {
    ".parquet": PARQUET,
    ".pq": PARQUET,
    ".jsonl": JSONL,
    ".ndjson": JSONL,
    ".json": JSONL,
    ".csv": CSV,
}
BATCH_LINES = 16384  # OpenAI Batch lines per Parquet row group
BLOCK_BYTES = 8 << 20  # JSON Lines / CSV: bytes per block read (memory bound of a conversion)
BATCH_SCHEMA = pa.schema(
    [("custom_id", pa.string()), ("method", pa.string()), ("url", pa.string()), ("body", pa.string())]
)
SOURCES = "sources.json"


def file_format(path: str, declared: str = "auto") -> str:
    """The format of one input file: `declared` unless it is `auto`, else by extension (a
    JSON Lines file whose first line is an OpenAI Batch request is `openai_batch`)."""
    if declared != "auto":
        return declared
    ext = os.path.splitext(path)[1].lower()
    fmt = EXTENSIONS.get(ext)
    if fmt is None:
        raise DataError(
            f"data.input file {path!r}: cannot tell its format from the extension {ext or '(none)'!r} "
            f"(known: {sorted(EXTENSIONS)}); set data.format=parquet|jsonl|csv|openai_batch"
        )
    if fmt == JSONL and _looks_like_batch(path):
        return OPENAI_BATCH
    return fmt


def _looks_like_batch(path: str) -> bool:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        return False
                    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj
    return False


def input_format(paths: Sequence[str], declared: str = "auto") -> str:
    """The one format of all input files; DataError when they mix formats."""
    formats: Dict[str, str] = {}
    for p in paths:
        formats.setdefault(file_format(p, declared), p)
    if len(formats) > 1:
        listed = ", ".join(f"{fmt} ({p!r})" for fmt, p in formats.items())
        raise DataError(f"data.input mixes formats: {listed}; give files of one format")
    return next(iter(formats))


# ---- conversion --------------------------------------------------------------------------
def _stat(path: str) -> Dict:
    st = os.stat(path)
    return {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted(paths: Sequence[str], fmt: str, out_dir: Path) -> Optional[List[str]]:
    """The Parquet files of an earlier conversion of exactly these inputs into `out_dir`, or None
    when there is none; DataError when there is one of inputs that changed since."""
    try:
        record = json.loads((out_dir / SOURCES).read_text())
    except (OSError, ValueError):
        return None
    now = [{**_stat(p), "format": fmt} for p in paths]
    if [{k: r.get(k) for k in ("source", "size", "mtime_ns", "format")} for r in record] != now:
        raise DataError(
            f"the input files changed since {str(out_dir.parent)!r} was planned (they were converted to "
            f"Parquet then); choose a new run_dir"
        )
    files = [str(out_dir / r["parquet"]) for r in record]
    return files if all(os.path.isfile(f) for f in files) else None


def convert(paths: Sequence[str], fmt: str, out_dir: Path) -> List[str]:
    """Convert `paths` (all of format `fmt`, not parquet) to Parquet files in `out_dir`, in order;
    their paths. Reuses an earlier conversion of the same, unchanged files."""
    from hpcinfer.rundir.files import atomic_path, atomic_write

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    earlier = converted(paths, fmt, out_dir)
    if earlier is not None:
        return earlier
    record, out = [], []
    for i, path in enumerate(paths):
        target = out_dir / f"{i:06d}.parquet"
        with atomic_path(target) as tmp:
            _convert_one(path, fmt, tmp)
        record.append({**_stat(path), "format": fmt, "parquet": target.name})
        out.append(str(target))
    if fmt == OPENAI_BATCH:
        check_unique_custom_ids(paths, out)
    atomic_write(out_dir / SOURCES, json.dumps(record, indent=1) + "\n")
    return out


MAX_BLOCK_BYTES = 1 << 30  # a row larger than a block: read again with larger blocks, up to this


def _convert_one(path: str, fmt: str, tmp: str) -> None:
    block = BLOCK_BYTES
    while True:
        try:
            return _write(path, fmt, tmp, block)
        except _RowTooLarge:
            if block >= MAX_BLOCK_BYTES:
                raise DataError(f"data.input file {path!r} has a row larger than {MAX_BLOCK_BYTES >> 20} MiB") from None
            block *= 4


class _RowTooLarge(Exception):
    """A row straddles a block boundary (pyarrow's streaming readers need a row within a block)."""


def _write(path: str, fmt: str, tmp: str, block: int) -> None:
    import pyarrow.parquet as pq

    if fmt == OPENAI_BATCH:
        batches: Iterator[pa.RecordBatch] = _batch_lines(path)
        schema = BATCH_SCHEMA
    else:
        reader = _open_reader(path, fmt, block)
        schema, batches = reader.schema, _read_all(reader, path, fmt)
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch)


def _check_straddling(e: Exception) -> None:
    if "straddl" in str(e) or "block size" in str(e):
        raise _RowTooLarge() from None


def _open_reader(path: str, fmt: str, block: int = BLOCK_BYTES):
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    try:
        if fmt == JSONL:
            return pjson.open_json(path, read_options=pjson.ReadOptions(block_size=block))
        if fmt == CSV:
            return pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=block))
    except (pa.ArrowInvalid, OSError) as e:
        _check_straddling(e)
        raise DataError(_bad_file(path, fmt, e)) from None
    except StopIteration:  # an empty file
        raise DataError(f"data.input file {path!r} is empty ({fmt} needs at least a header or a row)") from None
    raise DataError(f"data.format={fmt!r} cannot be converted")


def _read_all(reader, path: str, fmt: str) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as e:
            _check_straddling(e)
            raise DataError(_bad_file(path, fmt, e)) from None


def _bad_file(path: str, fmt: str, e: Exception) -> str:
    what = {JSONL: "JSON Lines (one JSON object per line)", CSV: "CSV"}.get(fmt, fmt)
    return f"data.input file {path!r} is not valid {what}: {' '.join(str(e).split())[:300]}"


def batch_row(line: str) -> Dict[str, Optional[str]]:
    """One OpenAI Batch line as a row (custom_id, method, url, body: the body's JSON text). A line
    that is not a JSON object with a string custom_id and an object body keeps its text as the
    body and null custom_id, method and url: the rank gives that row its error. Pure."""
    try:
        obj = json.loads(line)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict):
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        return {"custom_id": cid if isinstance(cid, str) else None, "method": None, "url": None, "body": line}
    cid = obj.get("custom_id")
    return {
        "custom_id": cid if isinstance(cid, str) else None,
        "method": obj.get("method") if isinstance(obj.get("method"), str) else None,
        "url": obj.get("url") if isinstance(obj.get("url"), str) else None,
        "body": json.dumps(obj["body"], ensure_ascii=False),
    }


def _batch_lines(path: str) -> Iterator[pa.RecordBatch]:
    rows: List[Dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():  # vLLM's run-batch skips empty lines too
                    rows.append(batch_row(line.strip()))
                if len(rows) >= BATCH_LINES:
                    yield pa.RecordBatch.from_pylist(rows, schema=BATCH_SCHEMA)
                    rows = []
    except UnicodeDecodeError as e:
        raise DataError(f"data.input file {path!r} is not UTF-8 text: {e}") from None
    yield pa.RecordBatch.from_pylist(rows, schema=BATCH_SCHEMA)


def check_unique_custom_ids(sources: Sequence[str], files: Sequence[str]) -> None:
    """Every OpenAI Batch line's custom_id is unique (lines without one are invalid requests)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = pa.chunked_array(
        [pq.read_table(f, columns=["custom_id"]).column(0).combine_chunks() for f in files], pa.string()
    )
    counts = pc.value_counts(ids.drop_null())
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    if dup:
        shown = ", ".join(repr(d) for d in dup[:5]) + (f" and {len(dup) - 5} more" if len(dup) > 5 else "")
        raise DataError(
            f"custom_id must be unique in an OpenAI Batch input, but {len(dup)} repeat(s): {shown} "
            f"(in {', '.join(repr(s) for s in sources[:3])})"
        )
