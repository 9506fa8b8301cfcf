"""What a Slurm partition's nodes offer, and whether a run's layout fits them. Pure: parses the text
of `sinfo -a -N -h -o '%N|%P|%c|%m|%G'` (one line per node and partition: name, partition with
`*` for the default one, CPUs, RealMemory in MB, generic resources); the launcher runs the command.

What a job of the run asks of each of its nodes, and what makes sbatch refuse it after the run
directory was written ("Invalid generic resource (gres) specification", "Requested node
configuration is not available"):
- GPUs: cluster.gpus_per_node (the layout packs ranks by it) against the nodes' GRES `gpu`;
- CPUs: tasks per node x cluster.cpus_per_task (when set) against the nodes' CPUs;
- memory: cluster.mem (and finalize_mem, when set) against the nodes' RealMemory;
- nodes: a job's nodes against the partition's nodes that offer all of that.
Node states are not looked at (a job waits for busy or drained nodes), nor constraints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from hpcinfer.config import RunConfig
from hpcinfer.errors import UserError
from hpcinfer.rundir.records import JobLayout

SINFO_FORMAT = "%N|%P|%c|%m|%G"
SINFO_ARGS = ["sinfo", "-a", "-N", "-h", "-o", SINFO_FORMAT]
UNSET_MEMORY_MB = 1  # Slurm's RealMemory when slurm.conf does not give one: unknown


@dataclass(frozen=True)
class SlurmNode:
    """One node of one partition, as sinfo lists it."""

    name: str
    partition: str
    default: bool  # the partition is the cluster's default (sinfo marks it with '*')
    cpus: int
    memory_mb: int  # RealMemory
    gpus: int  # GRES gpu count (all types)


def parse_sinfo_nodes(text: str) -> List[SlurmNode]:
    """The nodes in sinfo's output (SINFO_FORMAT); lines that do not parse are skipped."""
    nodes = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 5 or not parts[0]:
            continue
        name, partition, cpus, mem, gres = parts
        cpus_n, mem_n = _leading_int(cpus), _leading_int(mem)
        if cpus_n is None or mem_n is None:
            continue
        nodes.append(SlurmNode(name, partition.rstrip("*"), partition.endswith("*"), cpus_n, mem_n, gres_gpus(gres)))
    return nodes


def _leading_int(value: str) -> Optional[int]:
    m = re.match(r"^(\d+)", value)  # '4096', or with a '+' where sinfo aggregates
    return int(m.group(1)) if m else None


def gres_gpus(gres: str) -> int:
    """GPUs in a GRES string: '(null)' -> 0, 'gpu:8' -> 8, 'gpu:a100:4(S:0-1),nvme:1' -> 4,
    'gpu:a100:2(S:0),gpu:v100:2(S:1)' -> 4."""
    gres = re.sub(r"\([^)]*\)", "", gres)  # socket bindings, IDX lists
    total = 0
    for item in gres.split(","):
        fields = item.strip().split(":")
        if fields[0] != "gpu" or len(fields) < 2:
            continue
        count = re.match(r"^(\d+)", fields[-1])
        total += int(count.group(1)) if count else 1  # 'gpu:a100' alone: Slurm's default count, 1
    return total


def mem_mb(value: Optional[str]) -> Optional[int]:
    """An sbatch --mem value in MB ('200G' -> 204800, '64000' -> 64000, '1T', '512M', '100K');
    None for null, 0 (all of a node's memory) and what does not parse (sbatch judges that)."""
    if value is None:
        return None
    m = re.match(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", str(value).strip(), re.IGNORECASE)
    if not m:
        return None
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[m.group(2).upper()]
    mb = int(float(m.group(1)) * factor)
    return mb or None


def partition_nodes(nodes: List[SlurmNode], partition: Optional[str]) -> Tuple[str, List[SlurmNode]]:
    """(the partition's name, its nodes): `partition`, or the default one when None. UserError when
    it does not exist, or when there is no default partition to fall back on."""
    if partition is None:
        default = sorted({n.partition for n in nodes if n.default})
        if not default:
            raise UserError(
                "cluster.partition is not set and this Slurm cluster has no default partition; "
                f"set cluster.partition to one of {sorted({n.partition for n in nodes})}"
            )
        partition = default[0]
    own = [n for n in nodes if n.partition == partition]
    if not own:
        raise UserError(f"cluster.partition={partition!r} does not exist on this Slurm cluster (sinfo lists them)")
    return partition, own


@dataclass(frozen=True)
class NodeNeeds:
    """What every node of one worker job asks for."""

    nodes_per_job: int
    gpus_per_node: int = 0  # cluster.gpus_per_node (0: CPU nodes)
    cpus_per_node: Optional[int] = None  # tasks per node x cluster.cpus_per_task (None: not set)
    mem_mb: Optional[int] = None  # cluster.mem (None: not set)
    cpus_key: str = "cluster.cpus_per_task"  # what sets cpus_per_node, as the message names it
    mem_key: str = "cluster.mem"


def partition_errors(partition: str, nodes: List[SlurmNode], needs: NodeNeeds) -> List[str]:
    """Why the nodes of `partition` cannot run a job with `needs` (empty: they can). Pure."""
    where = f"the nodes of partition {partition!r}"
    errs = []
    most_gpus = max(n.gpus for n in nodes)
    if needs.gpus_per_node > most_gpus:
        have = f"at most {most_gpus} GPU(s) (GRES gpu:{most_gpus})" if most_gpus else "no GPUs (no GRES gpu)"
        fix = f"set cluster.gpus_per_node={most_gpus}" if most_gpus else "for CPU nodes use cluster=slurm_cpu"
        errs.append(f"cluster.gpus_per_node={needs.gpus_per_node}, but {where} have {have}; {fix}")
    most_cpus = max(n.cpus for n in nodes)
    if needs.cpus_per_node is not None and needs.cpus_per_node > most_cpus:
        errs.append(
            f"{needs.cpus_key} asks for {needs.cpus_per_node} CPUs per node, but {where} have at most {most_cpus}"
        )
    known = [n.memory_mb for n in nodes if n.memory_mb > UNSET_MEMORY_MB]
    if needs.mem_mb is not None and known and needs.mem_mb > max(known):
        errs.append(f"{needs.mem_key} asks for {needs.mem_mb} MB per node, but {where} have at most {max(known)} MB")
    if errs:
        return errs
    fitting = [n for n in nodes if _offers(n, needs)]
    if len(fitting) < needs.nodes_per_job:
        errs.append(
            f"a job needs {needs.nodes_per_job} node(s){_describe(needs)}, but partition {partition!r} has "
            f"{len(fitting)}; use fewer nodes per job (cluster.array, cluster.max_nodes_per_job) or another partition"
        )
    return errs


def _offers(n: SlurmNode, needs: NodeNeeds) -> bool:
    return (
        n.gpus >= needs.gpus_per_node
        and (needs.cpus_per_node is None or n.cpus >= needs.cpus_per_node)
        and (needs.mem_mb is None or n.memory_mb <= UNSET_MEMORY_MB or n.memory_mb >= needs.mem_mb)
    )


def _describe(needs: NodeNeeds) -> str:
    parts = [f"{needs.gpus_per_node} GPU(s)"] if needs.gpus_per_node else []
    if needs.cpus_per_node is not None:
        parts.append(f"{needs.cpus_per_node} CPU(s)")
    if needs.mem_mb is not None:
        parts.append(f"{needs.mem_mb} MB")
    return " with " + ", ".join(parts) if parts else ""


def largest_memory_mb(nodes: List[SlurmNode]) -> Optional[int]:
    """The largest RealMemory among `nodes` (None when slurm.conf gives none)."""
    known = [n.memory_mb for n in nodes if n.memory_mb > UNSET_MEMORY_MB]
    return max(known) if known else None


def run_needs(cfg: RunConfig, jobs: JobLayout) -> List[NodeNeeds]:
    """What the worker jobs (laid out as `jobs`) and the finalize job ask of each of their nodes."""
    c = cfg.cluster
    worker = NodeNeeds(
        nodes_per_job=jobs.nodes_per_job,
        gpus_per_node=c.gpus_per_node,
        cpus_per_node=jobs.tasks_per_node * c.cpus_per_task if c.cpus_per_task else None,
        mem_mb=mem_mb(c.mem),
        cpus_key=f"{jobs.tasks_per_node} task(s) per node x cluster.cpus_per_task={c.cpus_per_task}",
        mem_key=f"cluster.mem={c.mem}",
    )
    finalize = NodeNeeds(
        nodes_per_job=1,
        cpus_per_node=c.finalize_cpus,
        mem_mb=mem_mb(c.finalize_mem),
        cpus_key=f"cluster.finalize_cpus={c.finalize_cpus}",
        mem_key=f"cluster.finalize_mem={c.finalize_mem}",
    )
    return [worker, finalize]


def check_partition(cfg: RunConfig, jobs: JobLayout, nodes: List[SlurmNode]) -> None:
    """UserError naming every way the partition of `cfg` (or the default one) cannot run the worker
    jobs laid out as `jobs` and the finalize job. Pure."""
    name, own = partition_nodes(nodes, cfg.cluster.partition)
    errs: List[str] = []
    for needs in run_needs(cfg, jobs):
        errs += [e for e in partition_errors(name, own, needs) if e not in errs]
    if errs:
        raise UserError("; ".join(errs))
