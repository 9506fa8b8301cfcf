"""[from slurm_layout] How a run's ranks become Slurm jobs: replica groups, nodes and tasks per job, array chunks,
time limits. Pure; used by the planner (to show the layout) and by the Slurm backend (to submit).

A *group* is one Slurm job (or one element of a job array) whose tasks are consecutive ranks:
rank = group x ranks_per_group + SLURM_PROCID. Groups are independent (dense models), so a run
may be split into several smaller jobs that the scheduler can place as nodes free up.

A rank larger than a node (tp x pp > gpus_per_node) is a replica spanning `nodes_per_rank` whole
nodes, one task per node: rank = group x ranks_per_group + SLURM_PROCID // nodes_per_rank, and
SLURM_PROCID % nodes_per_rank is the task's node within its replica (0: the leader; replica.py).

[from planner] Layout arithmetic: ranks, devices per rank, nodes, memory per GPU. Pure.

Seed rules: a model that fits one GPU needs no model parallelism; too large for one GPU -> tensor
parallel within a node (tp must divide the attention heads), then pipeline parallel; more
throughput -> more data-parallel ranks; MoE -> expert parallel. Total GPUs = dp x tp x pp.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class JobLayout:
    groups: int  # worker jobs (array elements)
    ranks_per_group: int  # ranks (tasks with work) per job
    nodes_per_job: int
    tasks_per_node: int
    ranks_per_node: int  # what one node can hold (GPUs per node // GPUs per rank; 1 when a rank spans nodes)
    nodes_per_rank: int = 1  # > 1: each rank is a replica spanning this many nodes (one task per node)

    @property
    def tasks_per_job(self) -> int:
        return self.nodes_per_job * self.tasks_per_node

    @property
    def nodes(self) -> int:
        return self.groups * self.nodes_per_job

    def idle_tasks(self, ranks: int) -> int:
        """Tasks that get no rank (a rank count that does not fill the last node evenly)."""
        return self.groups * self.tasks_per_job - ranks * self.nodes_per_rank

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Memory:
    """Per-GPU memory estimate of one rank's model replica."""

    weights_gib: Optional[float]
    kv_gib: Optional[float]  # KV cache room left (or as configured)
    kv_tokens: Optional[int]  # tokens the KV room holds
    budget_gib: Optional[float]  # GPU memory x gpu_memory_utilization
    gpu_memory_gib: Optional[float]

    fits: bool = True  # weights, activations and a non-empty KV cache fit the GPU budget (when known)


@dataclass(frozen=True)
class ExpertLayout:
    """How a MoE model's experts spread over the GPUs with ep=true (vLLM's FusedMoE): the EP group
    is the dp x tp GPUs of one pipeline stage; each holds the experts of its share of every MoE
    layer, `num_experts + redundant` physical experts dealt out as evenly as possible."""

    ep_size: int  # GPUs in the expert-parallel group: dp x tp
    num_experts: Optional[int]  # routed experts per MoE layer (None: unknown)
    redundant: int  # extra copies kept by EPLB
    per_gpu_min: Optional[int]
    per_gpu_max: Optional[int]
    eplb: bool = False
    placement: str = "linear"
    all2all_backend: str = "allgather_reducescatter"


@dataclass
class RankPlan:
    rank: int
    devices: List[str]  # GPU ids or CPU cores (on Slurm: as numbered on its node)
    shards: List[int]
    rows: int
    job: Optional[int] = None  # Slurm: the rank's group (job or array element)
    node: Optional[int] = None  # Slurm: the rank's node within its job


@dataclass
class Plan:
    tp: int
    pp: int
    dp: int
    ep: bool
    ranks: int  # ranks that get work (min(dp, rows))
    device_kind: str  # "cuda" | "cpu"
    gpus_per_rank: int
    nodes: int
    rows: int
    files: int
    shards: int
    memory: Memory
    engine_args: Dict[str, Any]
    model: Dict[str, Any]
    rank_plans: List[RankPlan] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    jobs: Optional[JobLayout] = None  # Slurm: how the ranks are grouped into jobs and nodes
    schedule: str = "static"  # "dynamic": ranks claim shards at run time (rank_plans are expectations)
    tokens: int = 0  # estimated prompt + output tokens of all rows
    nodes_per_replica: int = 1  # > 1: each rank spans this many nodes (processes): a leader + headless ones
    experts: Optional["ExpertLayout"] = None  # ep=true: how the experts spread over the GPUs

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)
