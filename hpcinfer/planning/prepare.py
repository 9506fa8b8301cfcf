"""From a config to a plan, on the submitting machine: the launcher's devices, validation, the
model's path, the inputs scanned, the shards cut, the ranks laid out. Shared by `submit` and `plan`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from hpcinfer.config import PROMPT_LOGPROBS_WITH_LORA, RunConfig, engine_args, validate
from hpcinfer.doctor import conflict_message
from hpcinfer.errors import ConfigError, UserError
from hpcinfer.planning.convert import OPENAI_BATCH, PARQUET, convert, input_format
from hpcinfer.planning.devices import Devices
from hpcinfer.planning.inputs import InputFile, Inputs, check_readable, discover, scan
from hpcinfer.planning.layout import cpu_kv_cache_gib, make_plan, model_shape
from hpcinfer.planning.models import ensure_demo_data, resolve_model_path
from hpcinfer.planning.prefix import Sharing
from hpcinfer.planning.prompts import check_columns, check_lora_names, request_spec
from hpcinfer.planning.sharding import (
    RowSampling,
    active_ranks,
    cut_by_tokens,
    expected_ranks,
    make_shards,
    row_tokens,
    scan_batch_bodies,
    scan_row_sampling,
)
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.output import OutputSpec
from hpcinfer.rundir.records import Plan, RequestSpec


@dataclass
class Prepared:
    plan: Plan
    inputs: Inputs
    shards: List[Shard]
    devices: Devices
    placement: Optional[str] = None  # prefix placement on: the slot -> input row map (inputs/placement.npy)


def prepare(cfg: RunConfig, launcher: Launcher, build: bool = True, input_dir: Optional[Path] = None) -> Prepared:
    """Everything a launch needs, for the cluster of `launcher`. With build=False (plan only)
    nothing is written: built-in models are not built, the demo data is counted, not generated,
    and input other than Parquet is converted into a temporary directory, removed after. With
    build=True such input is converted into `input_dir` (the run directory's inputs/)."""
    devices = launcher.devices()
    validate(cfg, gpus_available=launcher.gpus_offered(devices))
    broken = conflict_message()
    if broken:
        raise UserError(broken)
    with contextlib.ExitStack() as stack:
        if not build or input_dir is None:
            input_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hpcinfer-plan-")))
        return _prepare(cfg, launcher, devices, build, input_dir)
    raise AssertionError("unreachable")


def _prepare(cfg: RunConfig, launcher: Launcher, devices: Devices, build: bool, input_dir: Path) -> Prepared:
    fmt = PARQUET
    if cfg.data.input is None and not build:
        inputs = _demo_inputs(cfg)
        request = request_spec(cfg, fmt)
    else:
        spec = cfg.data.input or ensure_demo_data(cfg.data.demo_rows, cfg.cache_path, chat=cfg.data.demo_chat)
        paths = discover(spec)
        check_readable(paths)  # before the formats are told (a .jsonl's first line is read)
        fmt = input_format(paths, cfg.data.format)
        request = request_spec(cfg, fmt)
        if fmt != PARQUET:
            paths = convert(paths, fmt, input_dir)
        inputs = scan(
            paths,
            None,
            cfg.data.id_column,
            cfg.data.max_tokens_column,
            check=lambda path, schema: check_columns(request, cfg, path, schema),
        )
    request, output = row_control(cfg, inputs, request, fmt)
    if cfg.output.reasoning_parser is not None:
        check_reasoning_parser(cfg.output.reasoning_parser)
    if all(os.path.isfile(f.path) for f in inputs.files):
        check_lora_names(inputs.files, request)
    model_path = resolve_model_path(cfg.model.builtin, cfg.model.path, cfg.cache_path, build=build)
    ranks = active_ranks(inputs.rows, cfg.dp)
    sharded = plan_shards(cfg, inputs, ranks, request, input_dir if build else None)
    shards = sharded.shards
    shape = model_shape(cfg.model, model_path if os.path.isdir(model_path) else None)
    plan = make_plan(
        cfg,
        shape,
        devices,
        engine_args(cfg, model_path, devices.kind, fmt),
        shards,
        inputs.rows,
        len(inputs.files),
        ranks,
        place=launcher.place,
        node_memory=None if devices.gpus else launcher.node_memory(),
        cpu_kv=None if devices.gpus else cpu_kv_cache_gib(cfg.cluster.cpu_kvcache_gib, os.environ),
    )
    notes = list(plan.notes)
    if fmt == OPENAI_BATCH:
        notes.append(
            "OpenAI Batch input: each line's body gives its sampling (vLLM's defaults for what it leaves out); "
            "of sampling.*, only sampling.seed applies (row i's seed is seed + i for a sampled line without one)"
        )
    prefix = sharded.sharing.to_json() if sharded.sharing is not None else None
    plan = replace(plan, request=request, input_format=fmt, notes=notes, prefix=prefix, output=output)
    return Prepared(plan, inputs, shards, devices, sharded.placement)


def check_reasoning_parser(name: str) -> None:
    """`name` is one of vLLM's reasoning parsers (ConfigError naming them otherwise). Imports vLLM."""
    from vllm.reasoning import ReasoningParserManager

    names = sorted(ReasoningParserManager.list_registered())
    if name not in names:
        raise ConfigError(f"output.reasoning_parser={name!r} is not one of vLLM's reasoning parsers {names}")


def row_control(cfg: RunConfig, inputs: Inputs, request: RequestSpec, fmt: str) -> Tuple[RequestSpec, OutputSpec]:
    """What the rows' own sampling (data.sampling_column, scanned) and sampling.* make of the run:
    the seed stride (the largest n) and the generated columns (list columns where n > 1 is
    possible, logprobs columns where some row asks for them)."""
    s = cfg.sampling
    rows = RowSampling(s.n, s.logprobs is not None, s.prompt_logprobs is not None)
    if request.sampling_column is not None and all(os.path.isfile(f.path) for f in inputs.files):
        rows = scan_row_sampling(inputs.files, request.sampling_column, s)
    if rows.prompt_logprobs and cfg.lora.adapters and fmt != OPENAI_BATCH:
        raise ConfigError(
            f"data.sampling_column={request.sampling_column!r} asks for prompt_logprobs with lora.adapters: "
            f"{PROMPT_LOGPROBS_WITH_LORA}; score without adapters"
        )
    if fmt == OPENAI_BATCH:  # each body is its request: its n, its logprobs
        files = all(os.path.isfile(f.path) for f in inputs.files)
        rows = scan_batch_bodies(inputs.files) if files else RowSampling()
    output = OutputSpec(
        reasoning=cfg.output.reasoning_parser is not None,
        samples=rows.max_n > 1 or cfg.output.explode_samples,
        explode=cfg.output.explode_samples,
        logprobs=rows.logprobs,
        prompt_logprobs=rows.prompt_logprobs,
    )
    return replace(request, seed_stride=rows.max_n), output


@dataclass
class Sharded:
    shards: List[Shard]
    sharing: Optional[Sharing] = None  # what prefix placement found (None: schedule.prefix=off, or nothing to key)
    placement: Optional[str] = None  # placement on and written: the slot -> input row map's path


PLACED_FILE, PLACEMENT_FILE = "placed.parquet", "placement.npy"


def plan_shards(
    cfg: RunConfig, inputs: Inputs, ranks: int, request: Optional[RequestSpec] = None, write_to: Optional[Path] = None
) -> Sharded:
    """The run's shards (`cut_shards`), placed by prompt prefix when schedule.prefix says so
    (planning/prefix.py): then the shards are ranges of the input in placement order, which is
    written (with `write_to`, the run's inputs/) as `placed.parquet` with `placement.npy`, the
    slot -> input row map; both are kept when a resume finds them (the same input gives the same
    placement)."""
    import numpy as np

    from hpcinfer.planning import prefix as px

    estimates = _estimates(cfg, inputs, request)
    base = cut_shards(cfg, inputs, ranks, request, estimates)
    if cfg.schedule.prefix == "off" or not inputs.rows or not all(os.path.isfile(f.path) for f in inputs.files):
        return Sharded(base)
    request = request or RequestSpec(prompt_column=cfg.data.prompt_column)
    hashes, lengths = [], []
    for starts, full in px.iter_starts([f.path for f in inputs.files], request):
        hashes.append(px.level_hashes(starts))
        lengths.append(full)
    h = np.concatenate(hashes)
    length = np.concatenate(lengths)
    deep = next((k + 1 for k, level in enumerate(px.LEVELS) if level >= int(length.max())), len(px.LEVELS))
    h = np.ascontiguousarray(h[:, :deep])
    prompt = int(length.sum())
    levels = px.LEVELS[:deep]
    shared = prompt - px.expected_prefill(h, length, np.zeros(len(length), dtype=np.int64), levels=levels)
    t = px.BYTES_PER_TOKEN
    if not shared and cfg.schedule.prefix == "auto":  # no row starts like another: nothing to place
        return Sharded(base, px.Sharing("auto", False, prompt // t, 0, prompt // t, prompt // t))
    tokens = np.concatenate(estimates).astype(np.int64)
    units_input = np.repeat(np.arange(len(base)), [s.rows for s in base])
    order = px.placement_order(h)
    placed_h = h[order]
    placed_path = str((write_to or Path(tempfile.gettempdir())) / PLACED_FILE)
    n = inputs.rows
    if cfg.dynamic:
        total = int(tokens.sum())
        target = max(1, -(-total // (ranks * cfg.schedule.shards_per_rank)))
        placed_tokens = tokens[order]
        cuts, chains = px.cut_placed(placed_tokens, px.shared_depth(placed_h), target, cfg.data.shard_rows)
        cum = np.concatenate(([0], np.cumsum(placed_tokens)))
        sizes = [int(cum[hi] - cum[lo]) for lo, hi in cuts]
        home = expected_ranks(sizes, ranks)
        shards = [Shard(i, home[i], placed_path, lo, hi, lo, sizes[i], chains[i]) for i, (lo, hi) in enumerate(cuts)]
        units = np.repeat(np.asarray(chains, dtype=np.int64), [hi - lo for lo, hi in cuts])
    else:
        flat = tokens[order]
        shards = [
            replace(s, tokens=int(flat[s.global_start : s.global_start + s.rows].sum()))
            for s in make_shards([InputFile(placed_path, n)], ranks, cfg.data.shard_rows)
        ]
        units = np.repeat(np.asarray([s.rank for s in shards], dtype=np.int64), [s.rows for s in shards])
    in_order = px.expected_prefill(h, length, units_input, levels=levels)
    placed = px.expected_prefill(placed_h, length[order], units, levels=levels)
    on = px.decide(cfg.schedule.prefix, prompt, in_order, placed)
    sharing = px.Sharing(cfg.schedule.prefix, on, prompt // t, shared // t, in_order // t, placed // t)
    if not on:
        return Sharded(base, sharing)
    where = None
    if write_to is not None:
        where = str(write_to / PLACEMENT_FILE)
        write_placed(inputs, order, placed_path, where)
    return Sharded(shards, sharing, where)


def write_placed(inputs: Inputs, order, placed_path: str, map_path: str) -> None:
    """The input's rows in placement order (`order`: slot -> input row) as one Parquet file, and
    `order` as a NumPy file, each atomically; kept when both exist (a resume)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hpcinfer.rundir.files import atomic_path
    from hpcinfer.rundir.permute import write_reordered

    if os.path.exists(placed_path) and os.path.exists(map_path):
        return
    os.makedirs(os.path.dirname(placed_path), mode=0o700, exist_ok=True)
    n = len(order)
    slot_of = np.empty(n, dtype=np.int64)
    slot_of[order] = np.arange(n, dtype=np.int64)
    schema = inputs.schema

    def batches():
        offset = 0
        for f in inputs.files:
            if not f.rows:
                continue
            for b in pq.ParquetFile(f.path).iter_batches(batch_size=16384):
                t = pa.Table.from_batches([b]).replace_schema_metadata(None)
                if not t.schema.equals(schema):
                    t = t.select(schema.names).cast(schema)
                for rb in t.to_batches():
                    yield rb, slot_of[offset : offset + rb.num_rows]
                    offset += rb.num_rows

    with atomic_path(placed_path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            write_reordered(batches(), n, writer.write_table, os.path.dirname(placed_path))
    with atomic_path(map_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(order, dtype=np.int64))


def cut_shards(
    cfg: RunConfig, inputs: Inputs, ranks: int, request: Optional[RequestSpec] = None, tokens: Optional[List] = None
) -> List[Shard]:
    """The run's shards in input order: by estimated tokens for the dynamic schedule, by rows per
    rank for the static one (then `tokens` is still filled in, for the plan)."""
    import numpy as np

    d = cfg.data
    tokens = _estimates(cfg, inputs, request) if tokens is None else tokens
    if cfg.dynamic:
        return cut_by_tokens(inputs.files, tokens, ranks, cfg.schedule.shards_per_rank, d.shard_rows)
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
    return [
        replace(s, tokens=int(flat[s.global_start : s.global_start + s.rows].sum()))
        for s in make_shards(inputs.files, ranks, d.shard_rows)
    ]


def _estimates(cfg: RunConfig, inputs: Inputs, request: Optional[RequestSpec]) -> List:
    """Each row's estimated work, per file (`row_tokens`)."""
    import numpy as np

    d = cfg.data
    if all(os.path.isfile(f.path) for f in inputs.files):
        tokens = row_tokens(
            inputs.files,
            d.prompt_column,
            d.max_tokens_column,
            cfg.sampling.max_tokens,
            request=request,
            max_model_len=engine_args(cfg, "-").get("max_model_len"),
            sampling=cfg.sampling,
        )
    else:  # plan of the demo set before it exists: only the output caps are known
        tokens = [np.full(f.rows, cfg.sampling.max_tokens * cfg.sampling.n + 16, dtype=np.int64) for f in inputs.files]
    return tokens


def _demo_inputs(cfg: RunConfig) -> Inputs:
    import pyarrow as pa

    if cfg.data.demo_chat:
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        return Inputs(
            [InputFile("<demo conversations, generated on first run>", cfg.data.demo_rows)],
            pa.schema([("id", pa.int64()), ("messages", pa.list_(message)), ("topic", pa.string())]),
        )
    return Inputs(
        [InputFile("<demo prompts, generated on first run>", cfg.data.demo_rows)],
        pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("topic", pa.string())]),
    )


def default_run_dir(root: str = "outputs") -> str:
    """outputs/<date>/<time>, made unique if a run started in the same second."""
    base = os.path.abspath(os.path.join(root, time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S")))
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


if TYPE_CHECKING:
    from hpcinfer.launch.base import Launcher
