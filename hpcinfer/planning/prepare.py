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
from hpcinfer.planning.prompts import check_columns, check_lora_names, request_spec
from hpcinfer.planning.sharding import (
    RowSampling,
    active_ranks,
    cut_by_tokens,
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
    shards = cut_shards(cfg, inputs, ranks, request)
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
    return Prepared(
        replace(plan, request=request, input_format=fmt, notes=notes, output=output), inputs, shards, devices
    )


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


def cut_shards(cfg: RunConfig, inputs: Inputs, ranks: int, request: Optional[RequestSpec] = None) -> List[Shard]:
    """The run's shards: by estimated tokens for the dynamic schedule, by rows per rank for the
    static one (then `tokens` is still filled in, for the plan)."""
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
    if cfg.dynamic:
        return cut_by_tokens(inputs.files, tokens, ranks, cfg.schedule.shards_per_rank, d.shard_rows)
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
    return [
        replace(s, tokens=int(flat[s.global_start : s.global_start + s.rows].sum()))
        for s in make_shards(inputs.files, ranks, d.shard_rows)
    ]


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
