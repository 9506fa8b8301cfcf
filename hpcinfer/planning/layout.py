"""Layout arithmetic: model shape, memory per GPU, the expert layout, and `make_plan`. Pure.

Seed rules: a model that fits one GPU needs no model parallelism; too large for one GPU -> tensor
parallel within a node (tp must divide the attention heads), then pipeline parallel; more
throughput -> more data-parallel ranks; MoE -> expert parallel. Total GPUs = dp x tp x pp. Where
ranks go (devices, Slurm jobs and nodes) is the launcher's `place`, handed in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from hpcinfer.config import ModelConfig, RunConfig
from hpcinfer.errors import ConfigError
from hpcinfer.planning.devices import Devices, NodeMemory
from hpcinfer.rundir.manifest import Shard
from hpcinfer.rundir.records import ExpertLayout, Memory, Plan, RankPlan

GIB = 1024**3


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "auto": 2, "float32": 4, "float": 4}


ACTIVATION_RESERVE_GIB = 1.0  # per GPU: activations, CUDA graphs, allocator slack (rule of thumb)


@dataclass(frozen=True)
class ModelShape:
    """What planning needs to know of a model; unknown fields are None."""

    num_params_b: Optional[float]
    num_layers: Optional[int]
    num_attention_heads: Optional[int]
    num_kv_heads: Optional[int]
    head_dim: Optional[int]
    moe: bool = False
    num_experts: Optional[int] = None
    expert_params_b: Optional[float] = None  # MoE: the experts' share of num_params_b (split by EP, not TP)

    def kv_bytes_per_token(self, dtype_bytes: int) -> Optional[int]:
        if None in (self.num_layers, self.num_kv_heads, self.head_dim):
            return None
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def model_shape(m: ModelConfig, model_dir: Optional[str] = None) -> ModelShape:
    """Shape from the config's fields, filled from `<model_dir>/config.json` when present."""
    hf: Dict[str, Any] = {}
    if model_dir and os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json")) as f:
            hf = json.load(f)
        hf = hf.get("text_config", hf)

    def pick(ours, *keys):
        return ours if ours is not None else next((hf[k] for k in keys if hf.get(k) is not None), None)

    hidden = pick(m.hidden_size, "hidden_size")
    heads = pick(m.num_attention_heads, "num_attention_heads")
    kv = pick(m.num_kv_heads, "num_key_value_heads") or heads
    head_dim = pick(m.head_dim, "head_dim") or (hidden // heads if hidden and heads else None)
    experts = pick(m.num_experts, "num_local_experts", "num_experts", "n_routed_experts")
    layers = pick(m.num_layers, "num_hidden_layers")
    params = m.num_params_b
    inter = pick(m.intermediate_size, "intermediate_size")
    if params is None:
        params = _estimate_params_b(
            hidden,
            inter,
            layers,
            heads,
            kv,
            head_dim,
            pick(m.vocab_size, "vocab_size"),
            experts,
            bool(hf.get("tie_word_embeddings", False)),
        )
    expert_params = (
        layers * 3 * hidden * inter * experts / 1e9 if experts and None not in (layers, hidden, inter) else None
    )
    if expert_params is not None and (params is None or expert_params > params):
        expert_params = None  # a given size that the shape does not explain: do not split it
    return ModelShape(params, layers, heads, kv, head_dim, m.moe or bool(experts), experts, expert_params)


def _estimate_params_b(hidden, inter, layers, heads, kv, head_dim, vocab, experts, tied) -> Optional[float]:
    if None in (hidden, inter, layers, heads, kv, head_dim, vocab):
        return None
    attn = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * inter * (experts or 1) + (hidden * experts if experts else 0)
    embed = vocab * hidden * (1 if tied else 2)
    return (layers * (attn + mlp) + embed) / 1e9


def memory_per_gpu(
    shape: ModelShape, engine: Dict[str, Any], tp: int, pp: int, gpu_memory_gib: Optional[float], ep_size: int = 1
) -> Memory:
    """Weights per GPU = params x bytes / (tp x pp); with expert parallelism (ep_size = dp x tp
    GPUs) the experts' share is split over ep_size x pp instead. KV cache = what is left."""
    dtype_bytes = DTYPE_BYTES.get(str(engine.get("dtype", "auto")), 2)
    weights = shape.num_params_b * 1e9 * dtype_bytes / (tp * pp) / GIB if shape.num_params_b else None
    if weights is not None and ep_size > tp and shape.expert_params_b:
        weights -= shape.expert_params_b * 1e9 * dtype_bytes * (1 / (tp * pp) - 1 / (ep_size * pp)) / GIB
    kv_tok = _kv_bytes_per_token_per_worker(shape, dtype_bytes, tp, pp)
    budget = gpu_memory_gib * engine.get("gpu_memory_utilization", 0.9) if gpu_memory_gib else None
    if engine.get("kv_cache_memory_bytes"):
        kv = engine["kv_cache_memory_bytes"] / GIB
    elif budget is not None and weights is not None:
        kv = budget - weights - ACTIVATION_RESERVE_GIB
    else:
        kv = None
    tokens = int(kv * GIB // kv_tok) if kv is not None and kv > 0 and kv_tok else None
    fits = kv is None or kv > 0
    if fits and engine.get("kv_cache_memory_bytes") and budget is not None and weights is not None:
        fits = weights + ACTIVATION_RESERVE_GIB + kv <= budget
    return Memory(weights, kv, tokens, budget, gpu_memory_gib, fits)


def _kv_bytes_per_token_per_worker(shape: ModelShape, dtype_bytes: int, tp: int, pp: int) -> Optional[int]:
    """KV cache bytes of one token on one GPU (worker): KV heads split over tp (replicated past their
    count), layers over pp."""
    kv_tok = shape.kv_bytes_per_token(dtype_bytes)
    return kv_tok // (pp * min(tp, shape.num_kv_heads or 1)) if kv_tok is not None else None


def cpu_kv_cache_gib(configured: int, env: Mapping[str, str]) -> Tuple[float, str]:
    """(KV cache GiB of one CPU engine worker, the key that sets it): VLLM_CPU_KVCACHE_SPACE when
    the environment sets it (the ranks inherit it: launch/env.py:cpu_engine_env), else
    cluster.cpu_kvcache_gib. vLLM's CPU build sizes every worker's KV cache by that variable,
    whatever engine.kv_cache_memory_bytes says. ConfigError when it is not a whole number. Pure."""
    raw = env.get("VLLM_CPU_KVCACHE_SPACE")
    if not raw:
        return float(configured), "cluster.cpu_kvcache_gib"
    try:
        return float(int(raw)), "VLLM_CPU_KVCACHE_SPACE"
    except ValueError:
        raise ConfigError(
            f"VLLM_CPU_KVCACHE_SPACE={raw!r} in the environment must be a whole number of GiB (vLLM reads it with int())"
        ) from None


def memory_per_cpu_node(
    shape: ModelShape,
    engine: Dict[str, Any],
    tp: int,
    pp: int,
    kv_gib: float,
    node_ranks: Optional[int],
    workers_per_rank: int,
    node: Optional[NodeMemory],
    ep_size: int = 1,
) -> Memory:
    """Without GPUs: each engine worker holds weights = params x bytes / (tp x pp) (as on a GPU) and
    a KV cache of `kv_gib` in the memory of its node, which the `workers_per_rank` workers of each of
    the `node_ranks` ranks there share. Fits when node_ranks x workers_per_rank x (weights + KV
    cache) <= the node's memory (unknown node or model size: not checked). Pure."""
    gpu_like = memory_per_gpu(
        shape, {k: v for k, v in engine.items() if k != "kv_cache_memory_bytes"}, tp, pp, None, ep_size
    )
    weights = gpu_like.weights_gib
    kv_tok = _kv_bytes_per_token_per_worker(shape, DTYPE_BYTES.get(str(engine.get("dtype", "auto")), 2), tp, pp)
    tokens = int(kv_gib * GIB // kv_tok) if kv_tok and kv_gib > 0 else None
    workers = node_ranks * workers_per_rank if node_ranks else None
    need = workers * (weights + kv_gib) if workers and weights is not None else None
    fits = node is None or need is None or need <= node.gib
    return Memory(
        weights,
        kv_gib,
        tokens,
        None,
        None,
        fits,
        node_workers=workers,
        node_need_gib=need,
        node_gib=node.gib if node else None,
        node_source=node.source if node else None,
    )


def cpu_memory_message(
    model: str, memory: Memory, node_ranks: int, workers_per_rank: int, ranks_key: str, kv_key: str
) -> str:
    """The one line that says a CPU layout does not fit its node's memory, with the arithmetic and
    what to change (`ranks_key`: what sets the ranks on a node, e.g. dp). Pure."""
    w, kv, node = memory.weights_gib or 0.0, memory.kv_gib or 0.0, memory.node_gib or 0.0
    workers = f" x {workers_per_rank} worker(s)" if workers_per_rank > 1 else ""
    per_rank = workers_per_rank * (w + kv)
    fit = int(node // per_rank) if per_rank > 0 else 0
    if fit >= 1:
        hint = f"use {ranks_key}={fit} or a smaller model"
    elif workers_per_rank * w >= node:
        hint = "even one rank's weights do not fit: use a smaller (or quantized) model"
    else:
        hint = f"even one rank does not fit: lower its KV cache ({kv_key}) or use a smaller model"
    return (
        f"model {model!r} does not fit in memory: {node_ranks} rank(s){workers} x ({w:.2f} GiB weights + "
        f"{kv:g} GiB KV cache) = {memory.node_need_gib:.1f} GiB > {node:.1f} GiB of {memory.node_source}; {hint}"
    )


def smallest_fitting_tp(
    shape: ModelShape, engine: Dict[str, Any], gpu_memory_gib: float, max_tp: int = 8
) -> Optional[int]:
    """The smallest power-of-two tp that divides the heads and leaves room for KV cache."""
    tp = 1
    while tp <= max_tp:
        if (not shape.num_attention_heads or shape.num_attention_heads % tp == 0) and memory_per_gpu(
            shape, engine, tp, 1, gpu_memory_gib
        ).fits:
            return tp
        tp *= 2
    return None


def expert_layout(
    num_experts: Optional[int],
    dp: int,
    tp: int,
    redundant: int = 0,
    eplb: bool = False,
    placement: Optional[str] = None,
    all2all_backend: Optional[str] = None,
) -> ExpertLayout:
    """EP size and experts per GPU for `dp` lockstep ranks of `tp` GPUs each (null placement and
    backend: vLLM's defaults)."""
    ep = dp * tp
    if num_experts is None:
        lo = hi = None
    else:
        lo, rem = divmod(num_experts + redundant, ep)
        hi = lo + (1 if rem else 0)
    return ExpertLayout(
        ep, num_experts, redundant, lo, hi, eplb, placement or "linear", all2all_backend or "allgather_reducescatter"
    )


def make_plan(
    cfg: RunConfig,
    shape: ModelShape,
    devices: Devices,
    engine_args: Dict[str, Any],
    shards: List[Shard],
    n_rows: int,
    n_files: int,
    active: int,
    place: Callable[[int, Devices], Placement],
    *,
    node_memory: Optional[NodeMemory] = None,
    cpu_kv: Optional[Tuple[float, str]] = None,
) -> Plan:
    """The layout of this run; `place` is the launcher's (`Launcher.place`: each rank's devices
    and, on Slurm, its job and node). Without GPUs, `node_memory` is the memory the ranks of a node
    share (`Launcher.node_memory`; None: unknown, not checked) and `cpu_kv` each engine worker's KV
    cache and the key that sets it (`cpu_kv_cache_gib`; None: cluster.cpu_kvcache_gib). Raises
    ConfigError when it cannot work."""
    notes: List[str] = []
    where = place(active, devices)
    ep_size = active * cfg.tp if cfg.lockstep else 1
    gpu_mem = getattr(cfg.cluster, "gpu_memory_gib", None) or devices.gpu_memory_gib
    if devices.gpus:
        memory = memory_per_gpu(shape, engine_args, cfg.tp, cfg.pp, gpu_mem, ep_size=ep_size)
    else:
        memory = _cpu_memory(cfg, shape, engine_args, where, node_memory, cpu_kv, ep_size, notes)
    if devices.gpus and not memory.fits:
        tp = smallest_fitting_tp(shape, engine_args, gpu_mem)
        hint = f"try tp={tp}" if tp else "use pp>1 across GPUs, or a smaller/quantized model"
        raise ConfigError(
            f"model {cfg.model.name!r} does not fit: {memory.weights_gib:.1f} GiB of weights per GPU at "
            f"tp={cfg.tp} pp={cfg.pp}, but a GPU offers {memory.budget_gib:.1f} GiB "
            f"({gpu_mem:.0f} GiB x gpu_memory_utilization); {hint}"
        )
    if (
        devices.gpus
        and (cfg.tp > 1 or cfg.pp > 1)
        and memory_per_gpu(shape, engine_args, 1, 1, gpu_mem).fits
        and shape.num_params_b is not None
    ):
        notes.append(
            f"the model fits one GPU: tp=1 pp=1 with dp={cfg.dp * cfg.tp * cfg.pp} "
            f"usually gives more throughput on the same GPUs"
        )
    if active < cfg.dp:
        notes.append(
            f"only {n_rows} input row(s) for dp={cfg.dp}: starting {active} rank(s), a rank needs at least one row"
        )
    experts = _experts(cfg, shape, active, bool(devices.gpus), notes) if cfg.lockstep else None
    notes += where.notes
    rank_plans = [
        RankPlan(
            r,
            where.devices[r],
            [s.shard for s in shards if s.rank == r],
            sum(s.rows for s in shards if s.rank == r),
            job=where.job[r],
            node=where.node[r],
        )
        for r in range(active)
    ]
    return Plan(
        tp=cfg.tp,
        pp=cfg.pp,
        dp=cfg.dp,
        ep=cfg.ep,
        ranks=active,
        device_kind=devices.kind,
        gpus_per_rank=cfg.gpus_per_rank,
        nodes=where.nodes,
        rows=n_rows,
        files=n_files,
        shards=len(shards),
        memory=memory,
        engine_args=engine_args,
        model={"name": cfg.model.name, "path": engine_args["model"], **asdict(shape)},
        rank_plans=rank_plans,
        notes=notes,
        jobs=where.jobs,
        schedule="dynamic" if cfg.dynamic else "static",
        tokens=sum(s.tokens for s in shards),
        experts=experts,
        nodes_per_rank=cfg.nodes_per_rank,
    )


def _cpu_memory(
    cfg: RunConfig,
    shape: ModelShape,
    engine_args: Dict[str, Any],
    where: Placement,
    node: Optional[NodeMemory],
    cpu_kv: Optional[Tuple[float, str]],
    ep_size: int,
    notes: List[str],
) -> Memory:
    """A CPU run's memory: per worker and per node; ConfigError when a node cannot hold its ranks."""
    kv_gib, kv_key = cpu_kv or (float(cfg.cluster.cpu_kvcache_gib), "cluster.cpu_kvcache_gib")
    workers_per_rank = cfg.gpus_per_rank // cfg.nodes_per_rank  # a rank spanning nodes: its share of each
    memory = memory_per_cpu_node(
        shape, engine_args, cfg.tp, cfg.pp, kv_gib, where.node_ranks, workers_per_rank, node, ep_size
    )
    if not memory.fits:
        assert node is not None and where.node_ranks
        raise ConfigError(
            cpu_memory_message(cfg.model.name, memory, where.node_ranks, workers_per_rank, node.ranks_key, kv_key)
        )
    if memory.node_need_gib is not None and node is None:
        notes.append(
            f"memory not checked: {memory.node_workers} engine worker(s) on a node need {memory.node_need_gib:.1f} "
            "GiB (weights + KV cache), and the memory of a node is unknown here"
        )
    notes += [
        f"engine.{k}={cfg.engine[k]!r} has no effect on CPU: vLLM's CPU build sizes the KV cache by "
        f"VLLM_CPU_KVCACHE_SPACE ({kv_key}={kv_gib:g})"
        for k in ("kv_cache_memory_bytes", "gpu_memory_utilization")
        if cfg.engine.get(k) is not None
    ]
    return memory


def _experts(cfg: RunConfig, shape: ModelShape, ranks: int, gpus: bool, notes: List[str]) -> ExpertLayout:
    """The expert layout of an ep=true run; ConfigError for what vLLM's EPLB would refuse."""
    e = cfg.expert
    lay = expert_layout(shape.num_experts, ranks, cfg.tp, e.redundant_experts, e.eplb, e.placement, e.all2all_backend)
    if e.eplb and not gpus:
        raise ConfigError(
            "expert.eplb=true needs GPUs: vLLM runs EPLB on CUDA/ROCm devices only, and this run has none"
        )
    if lay.ep_size > 1 and not gpus:  # shared/notes/vllm-cpu.md: both fail at the first forward pass
        raise ConfigError(
            f"ep=true with dp={ranks} x tp={cfg.tp} (EP size {lay.ep_size}) needs GPUs, and this run has "
            "none: vLLM's CPU build runs neither lockstep data parallel (its CPU communicator has no "
            "all_gatherv) nor expert parallelism (its fused-MoE kernel ignores the expert map); "
            f"without ep=true the {ranks} rank(s) run as independent engines"
        )
    if e.eplb and lay.num_experts is not None and lay.per_gpu_min != lay.per_gpu_max:
        raise ConfigError(
            f"expert.eplb=true needs the {lay.num_experts} experts + {lay.redundant} redundant to "
            f"divide evenly over the EP size {lay.ep_size} (dp={ranks} x tp={cfg.tp}): vLLM's EPLB "
            "supports only an even distribution; change expert.redundant_experts, dp or tp"
        )
    if lay.num_experts is None:
        notes.append("experts per GPU unknown: set model.num_experts (or give a model directory with config.json)")
    if e.placement == "round_robin":
        notes.append(
            "expert.placement=round_robin: vLLM uses it only for models with expert groups and without "
            "EPLB/redundant experts (and an all2all backend that supports it); otherwise it places linearly"
        )
    return lay


if TYPE_CHECKING:
    from hpcinfer.launch.base import Placement
