"""How a run's ranks become Slurm jobs: replica groups, nodes and tasks per job, array chunks. Pure;
used by the Slurm launcher to place ranks (for the plan) and to submit.

A *group* is one Slurm job (or one element of a job array) whose tasks are consecutive ranks:
rank = group x ranks_per_group + SLURM_PROCID. Groups are independent (dense models), so a run
may be split into several smaller jobs that the scheduler can place as nodes free up.

A rank larger than a node (tp x pp > gpus_per_node) is a replica spanning `nodes_per_rank` whole
nodes, one task per node: rank = group x ranks_per_group + SLURM_PROCID // nodes_per_rank, and
SLURM_PROCID % nodes_per_rank is the task's node within its replica (0: the leader).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from hpcinfer.config import RunConfig
from hpcinfer.errors import ConfigError
from hpcinfer.rundir.records import JobLayout


def node_capacity(gpus_per_node: int, gpus_per_rank: int, ranks_per_node: Optional[int]) -> int:
    """Ranks one node holds: as configured, else GPUs per node // GPUs per rank (CPU nodes: 1)."""
    if ranks_per_node is not None:
        return ranks_per_node
    if gpus_per_node == 0:
        return 1
    return max(1, gpus_per_node // gpus_per_rank)


def job_layout(
    ranks: int,
    capacity: int,
    *,
    nodes: Optional[int] = None,
    array: int = 1,
    max_nodes_per_job: Optional[int] = None,
    nodes_per_rank: int = 1,
) -> JobLayout:
    """Split `ranks` into groups of near-equal size, each one job over as few nodes as hold it.

    `nodes` fixes the nodes per job; `array` asks for that many groups; `max_nodes_per_job`
    adds groups until each job fits. `nodes_per_rank` > 1: every rank spans that many whole
    nodes, one task each (`capacity` is then 1). Raises ValueError naming the values that cannot
    work."""
    k = nodes_per_rank
    if ranks < 1 or k < 1:
        raise ValueError(f"no ranks to lay out (ranks={ranks}, nodes_per_rank={k})")
    if array > ranks:
        raise ValueError(f"cluster.array={array} exceeds the {ranks} rank(s) of this run")
    capacity = 1 if k > 1 else capacity
    groups = array
    if max_nodes_per_job is not None:
        if max_nodes_per_job < k:
            raise ValueError(f"a rank spans {k} nodes but cluster.max_nodes_per_job={max_nodes_per_job}")
        groups = max(groups, math.ceil(ranks / (max_nodes_per_job // k * capacity)))
        groups = min(groups, ranks)
    per_group = math.ceil(ranks / groups)
    groups = math.ceil(ranks / per_group)  # e.g. 5 ranks in groups of 2 -> 3 groups, not 4
    if nodes is None:
        job_nodes = math.ceil(per_group / capacity) * k
    else:
        job_nodes = nodes
        if job_nodes % k:
            raise ValueError(f"cluster.nodes={nodes} is not a multiple of the {k} nodes each rank spans")
        if job_nodes // k * capacity < per_group:
            held = f"{capacity} rank(s) per node" if k == 1 else f"1 rank per {k} nodes"
            raise ValueError(
                f"cluster.nodes={nodes} node(s) x {held} cannot hold the "
                f"{per_group} rank(s) of a job; raise cluster.nodes or cluster.array"
            )
        if job_nodes > per_group * k:
            raise ValueError(f"cluster.nodes={nodes} is more nodes than the {per_group} rank(s) of a job need")
    if max_nodes_per_job is not None and job_nodes > max_nodes_per_job:
        raise ValueError(f"a job needs {job_nodes} node(s) but cluster.max_nodes_per_job={max_nodes_per_job}")
    return JobLayout(
        groups=groups,
        ranks_per_group=per_group,
        nodes_per_job=job_nodes,
        tasks_per_node=math.ceil(per_group / (job_nodes // k)) if k == 1 else 1,
        ranks_per_node=capacity,
        nodes_per_rank=k,
    )


def rank_groups(ranks: List[int], jobs: JobLayout) -> List[List[int]]:
    """The ranks each job runs: consecutive runs of `ranks_per_group` (task i runs the i-th)."""
    per = jobs.ranks_per_group
    return [ranks[i : i + per] for i in range(0, len(ranks), per)]


def array_chunks(groups: int, max_array_size: int) -> List[Tuple[int, int]]:
    """(first group, count) of each job array to submit: Slurm refuses array indices at or above
    MaxArraySize, so larger arrays go in several submissions whose group numbers are offset."""
    if max_array_size < 1:
        raise ValueError(f"max_array_size must be >= 1, got {max_array_size}")
    return [(start, min(max_array_size, groups - start)) for start in range(0, groups, max_array_size)]


def slurm_jobs(cfg: RunConfig, ranks: int, nodes: Optional[int] = -1) -> JobLayout:
    """The job layout of `ranks` ranks (nodes per job: cluster.nodes unless given; None = derived)."""
    c = cfg.cluster
    try:
        jobs = job_layout(
            ranks,
            node_capacity(c.gpus_per_node, cfg.gpus_per_rank, c.ranks_per_node),
            nodes=c.nodes if nodes == -1 else nodes,
            array=min(c.array, ranks),
            max_nodes_per_job=c.max_nodes_per_job,
            nodes_per_rank=cfg.nodes_per_rank,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.lockstep and jobs.groups > 1:
        raise ConfigError(
            f"ep=true ranks run in lockstep as one vLLM group, so they must be one job, but "
            f"{ranks} rank(s) need {jobs.groups} jobs of at most cluster.max_nodes_per_job="
            f"{c.max_nodes_per_job} node(s)"
        )
    return jobs


def slurm_rank_place(jobs: JobLayout, rank: int, gpus_per_rank: int, gpus: bool):
    """(devices on its node, job, node within the job) of a rank: task `procid` of job `group`
    runs on node procid // tasks_per_node as local rank procid % tasks_per_node. A rank spanning
    k = nodes_per_rank nodes: its first (leader) node, and the GPUs it uses on each of them."""
    group, procid = divmod(rank, jobs.ranks_per_group)
    local = procid % jobs.tasks_per_node
    per_node = gpus_per_rank // jobs.nodes_per_rank
    devices = [str(i) for i in range(local * per_node, (local + 1) * per_node)] if gpus else []
    return devices, group, procid // jobs.tasks_per_node * jobs.nodes_per_rank
