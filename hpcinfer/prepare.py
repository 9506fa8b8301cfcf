"""From a config to a plan, on the login node: detect devices, validate, locate the model,
scan the inputs, cut shards, lay out the ranks. Shared by `submit` and `plan`."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import List

from .config import RunConfig, SlurmClusterConfig, engine_args, validate
from .data import Inputs, InputFile, Shard, active_ranks, discover, make_shards, scan
from .devices import Devices, detect
from .doctor import conflict_message
from .errors import UserError
from .models import ensure_demo_data, resolve_model_path
from .planner import Plan, make_plan, model_shape


@dataclass
class Prepared:
    plan: Plan
    inputs: Inputs
    shards: List[Shard]
    devices: Devices


def prepare(cfg: RunConfig, build: bool = True) -> Prepared:
    """Everything a launch needs. With build=False (plan only) nothing is written: built-in
    models are not built and the demo data is counted, not generated."""
    if isinstance(cfg.cluster, SlurmClusterConfig):  # devices of one compute node, as configured
        devices = Devices(gpus=[str(i) for i in range(cfg.cluster.gpus_per_node)],
                          cpus=list(range(cfg.cluster.cpus_per_task or 1)), gpu_memory_gib=cfg.cluster.gpu_memory_gib)
        validate(cfg)
    else:
        devices = detect(gpus=cfg.cluster.gpus)
        validate(cfg, gpus_available=len(devices.gpus) or None)
    broken = conflict_message()
    if broken:
        raise UserError(broken)
    if cfg.data.input is None and not build:
        inputs = _demo_inputs(cfg)
    else:
        spec = cfg.data.input or ensure_demo_data(cfg.data.demo_rows, cfg.cache_path)
        inputs = scan(discover(spec), cfg.data.prompt_column, cfg.data.id_column)
    model_path = resolve_model_path(cfg.model.builtin, cfg.model.path, cfg.cache_path, build=build)
    ranks = active_ranks(inputs.rows, cfg.dp)
    shards = make_shards(inputs.files, ranks, cfg.data.shard_rows)
    shape = model_shape(cfg.model, model_path if os.path.isdir(model_path) else None)
    plan = make_plan(cfg, shape, devices, engine_args(cfg, model_path), shards, inputs.rows,
                     len(inputs.files), ranks)
    return Prepared(plan, inputs, shards, devices)


def _demo_inputs(cfg: RunConfig) -> Inputs:
    import pyarrow as pa

    return Inputs([InputFile("<demo prompts, generated on first run>", cfg.data.demo_rows)],
                  pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("topic", pa.string())]))


def default_run_dir(root: str = "outputs") -> str:
    """outputs/<date>/<time>, made unique if a run started in the same second."""
    base = os.path.abspath(os.path.join(root, time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S")))
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path
