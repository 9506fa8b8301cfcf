"""How rows become requests, decided on the submitting machine: the `RequestSpec` of a run (raw
prompt, template, chat messages, OpenAI Batch line) with every file it names read (prompt
template, chat template), and the columns it needs, checked against the input before anything
runs. The ranks build the requests (rank/requests.py) from the spec in plan.json.
"""

from __future__ import annotations

import os
from typing import Dict

import pyarrow as pa

from hpcinfer.config import RunConfig, _schema_errors, batch_errors
from hpcinfer.errors import ConfigError, DataError
from hpcinfer.rundir.records import MESSAGES, OPENAI_BATCH, PROMPT, RequestSpec


def _read(path: str, key: str) -> str:
    p = os.path.expanduser(path)
    try:
        with open(p, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}={path!r} cannot be read: {getattr(e, 'strerror', None) or e}") from None


def request_spec(cfg: RunConfig, fmt: str) -> RequestSpec:
    """The run's RequestSpec for input format `fmt`; ConfigError for a file that cannot be read,
    a template that names no column, or options OpenAI Batch input would ignore."""
    d, p = cfg.data, cfg.prompt
    chat_template = _read(cfg.model.chat_template, "model.chat_template") if cfg.model.chat_template else None
    js = cfg.sampling.structured.json_schema
    if js is not None and not js.lstrip().startswith("{"):  # a file: its text, checked as inline JSON is
        js = _read(js, "sampling.structured.json_schema")
        errs = _schema_errors(js)
        if errs:
            raise ConfigError(f"sampling.structured.json_schema={cfg.sampling.structured.json_schema!r}: {errs[0]}")
    common = dict(
        chat_template=chat_template,
        chat_template_kwargs=dict(cfg.chat.template_kwargs),
        sampling_column=d.sampling_column,
        json_schema=js,
        seed_stride=cfg.sampling.n,
        lora_column=d.lora_column,
        lora_adapters={k: os.path.abspath(os.path.expanduser(v)) for k, v in cfg.lora.adapters.items()},
    )
    if fmt == OPENAI_BATCH:
        if cfg.data.format != OPENAI_BATCH:  # found by `auto`: the same rules as data.format=openai_batch
            errs = batch_errors(cfg)
            if errs:
                raise ConfigError(f"data.input is an OpenAI Batch file: {'; '.join(errs)}")
        return RequestSpec(
            kind=OPENAI_BATCH, prompt_column=None, **{**common, "sampling_column": None, "lora_column": None}
        )
    if d.messages_column is not None:
        return RequestSpec(kind=MESSAGES, prompt_column=None, messages_column=d.messages_column, **common)
    template = _read(p.template_file, "prompt.template_file") if p.template_file else p.template
    spec = RequestSpec(
        kind=PROMPT,
        prompt_column=None if template is not None else d.prompt_column,
        template=template,
        chat=p.chat,
        system=p.system,
        **common,
    )
    try:
        spec.template_columns()
    except ValueError as e:
        key = "prompt.template_file" if p.template_file else "prompt.template"
        raise ConfigError(f"{key}: {e}") from None
    if not spec.renders_chat and (chat_template is not None or cfg.chat.template_kwargs):
        used = [
            k
            for k, v in (("model.chat_template", chat_template), ("chat.template_kwargs", cfg.chat.template_kwargs))
            if v
        ]
        raise ConfigError(
            f"{' and '.join(used)} would be ignored: these rows are raw prompts (use data.messages_column, "
            "prompt.chat=true, or OpenAI Batch chat lines)"
        )
    return spec


def needed_columns(spec: RequestSpec, cfg: RunConfig) -> Dict[str, str]:
    """Column -> the config key that names it, for every column the requests read."""
    out: Dict[str, str] = {}
    if spec.kind == OPENAI_BATCH:
        return {"custom_id": "OpenAI Batch input", "body": "OpenAI Batch input", "url": "OpenAI Batch input"}
    if spec.prompt_column is not None:
        out[spec.prompt_column] = "data.prompt_column"
    if spec.messages_column is not None:
        out[spec.messages_column] = "data.messages_column"
    key = "prompt.template_file" if cfg.prompt.template_file else "prompt.template"
    for col in spec.template_columns():
        out.setdefault(col, key)
    if spec.sampling_column is not None:
        out.setdefault(spec.sampling_column, "data.sampling_column")
    if spec.lora_column is not None:
        out.setdefault(spec.lora_column, "data.lora_column")
    return out


def check_columns(spec: RequestSpec, cfg: RunConfig, path: str, schema: pa.Schema) -> None:
    """The columns the requests read exist in `path`, with types they can be read as."""
    names = schema.names
    for col, key in needed_columns(spec, cfg).items():
        if col not in names:
            if key.startswith("prompt.template"):
                raise DataError(f"{key} names column {{{col}}}, which is not a column of {path!r} (columns: {names})")
            raise DataError(f"{key}={col!r} is not a column of {path!r} (columns: {names})")
    for field, accepts, expected in COLUMN_TYPES:
        col = getattr(spec, field)
        if col is None:
            continue
        typ = schema.field(col).type
        if not (pa.types.is_null(typ) or accepts(typ)):  # an all-null column reads as any type
            raise DataError(f"data.{field}={col!r} in {path!r} has type {typ}; expected {expected}")


def _is_string(typ: pa.DataType) -> bool:
    return (
        pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or getattr(pa.types, "is_string_view", lambda t: False)(typ)
    )


# the typed columns requests read: (RequestSpec's field, the Arrow types it takes, what it expects)
COLUMN_TYPES = (
    ("prompt_column", _is_string, "string"),
    (
        "sampling_column",
        lambda t: _is_string(t) or pa.types.is_struct(t),
        "a struct of sampling fields or JSON object text",
    ),
    ("lora_column", _is_string, "adapter names"),
    (
        "messages_column",
        lambda t: _is_string(t) or pa.types.is_list(t) or pa.types.is_large_list(t),
        "a list of {role, content} structs or JSON text",
    ),
)


def check_lora_names(files, spec: RequestSpec) -> None:
    """Every value of the LoRA column names an adapter of lora.adapters (or is null): DataError
    naming the first that does not, its file and row. Streams the column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if spec.lora_column is None:
        return
    known = pa.array(sorted(spec.lora_adapters), pa.string())
    for f in files:
        if not f.rows:
            continue
        offset = 0
        for batch in pq.ParquetFile(f.path).iter_batches(batch_size=65536, columns=[spec.lora_column]):
            col = batch.column(0).cast(pa.string())
            bad = pc.and_(pc.is_valid(col), pc.invert(pc.is_in(col, value_set=known)))
            if pc.any(bad).as_py():
                i = pc.index(bad, True).as_py()
                raise DataError(
                    f"data.lora_column={spec.lora_column!r}: row {offset + i} of {f.path!r} names adapter "
                    f"{col[i].as_py()!r}, which is not one of lora.adapters {sorted(spec.lora_adapters)}"
                )
            offset += batch.num_rows
