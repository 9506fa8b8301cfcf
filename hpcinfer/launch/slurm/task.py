"""How a Slurm task finds out which hpcinfer rank it is and what it may use.

Pure functions over what Slurm gives a task (its `SLURM_*` variables, its CUDA_VISIBLE_DEVICES,
its CPU affinity): `slurm_task` reads the variables, `task_rank` and `task_replica` map a task to
its rank (and its node in a replica spanning nodes), `master_port` / `replica_port` pick
deterministic rendezvous ports per job, `task_gpus` / `task_cpus` pick the task's share of the
node. `port_is_free` / `check_master_port` are the only side effects (a bind).
"""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from hpcinfer.launch.env import ReplicaError


class SlurmEnvError(RuntimeError):
    """The Slurm environment of a task is missing something or does not add up."""


REQUIRED_VARS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID", "SLURM_JOB_NODELIST")


_INT = re.compile(r"-?[0-9]+")


# Linux hands out ports from 32768 up (net.ipv4.ip_local_port_range) to outgoing connections.
EPHEMERAL_PORTS_START = 32768


@dataclass(frozen=True)
class SlurmTask:
    job_id: str  # SLURM_JOB_ID
    array_job_id: Optional[str]  # SLURM_ARRAY_JOB_ID
    array_task_id: Optional[int]  # SLURM_ARRAY_TASK_ID
    procid: int  # SLURM_PROCID: rank of the task in its step
    localid: int  # SLURM_LOCALID: rank of the task on its node
    ntasks: int  # SLURM_NTASKS
    nodeid: int  # SLURM_NODEID
    nodelist: str  # SLURM_JOB_NODELIST
    restart_count: int = 0  # SLURM_RESTART_COUNT


def slurm_task(env: Mapping[str, str]) -> SlurmTask:
    """The task's identity from its environment. SlurmEnvError names every missing variable,
    every non-integer value, and a procid outside [0, ntasks) or a negative localid/nodeid."""
    missing = [k for k in REQUIRED_VARS if not env.get(k)]
    if missing:
        raise SlurmEnvError(f"not a Slurm task: {', '.join(missing)} not set")
    names = {
        "procid": "SLURM_PROCID",
        "localid": "SLURM_LOCALID",
        "ntasks": "SLURM_NTASKS",
        "nodeid": "SLURM_NODEID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "restart_count": "SLURM_RESTART_COUNT",
    }
    present = {field: env[var] for field, var in names.items() if env.get(var)}
    bad = [f"{names[f]}={v!r}" for f, v in present.items() if not _INT.fullmatch(v)]
    if bad:
        raise SlurmEnvError(f"Slurm variables that should be integers are not: {', '.join(bad)}")
    ints: Dict[str, int] = {f: int(v) for f, v in present.items()}
    task = SlurmTask(
        job_id=env["SLURM_JOB_ID"],
        array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
        nodelist=env["SLURM_JOB_NODELIST"],
        array_task_id=ints.pop("array_task_id", None),
        restart_count=ints.pop("restart_count", 0),
        **ints,
    )
    if not 0 <= task.procid < task.ntasks:
        raise SlurmEnvError(f"SLURM_PROCID={task.procid} is not in [0, SLURM_NTASKS={task.ntasks})")
    negative = [f"{names[f]}={getattr(task, f)}" for f in ("localid", "nodeid") if getattr(task, f) < 0]
    if negative:
        raise SlurmEnvError(f"negative Slurm ids: {', '.join(negative)}")
    return task


def task_rank(procid: int, ranks: Sequence[int]) -> Optional[int]:
    """The hpcinfer rank of task `procid` of a job that runs `ranks` (task i runs ranks[i]);
    None for a task past the end (the job's last node is not full)."""
    if procid < 0:
        raise SlurmEnvError(f"no rank for procid={procid}: need procid >= 0")
    return ranks[procid] if procid < len(ranks) else None


def master_port(job_id: Union[str, int], base: int = 20000, span: int = 10000, stride: int = 8) -> int:
    """A port in [base, base + span), `stride`-aligned from base, chosen by the job id alone.

    Every task of a job computes the same port; ports port+1 .. port+stride-1 stay free for the
    engine. Consecutive job ids get consecutive slots. "123_4" (array notation) uses 123.
    """
    text = str(job_id).split("_", 1)[0] if not isinstance(job_id, bool) else ""
    if not re.fullmatch(r"[0-9]+", text):
        raise SlurmEnvError(f"job id {job_id!r} is not an integer (nor an array id like '123_4')")
    if base < 1 or stride < 1 or span < stride or base + span > EPHEMERAL_PORTS_START:
        raise SlurmEnvError(
            f"bad port window base={base}, span={span}, stride={stride}: need 1 <= base, "
            f"1 <= stride <= span and base + span <= {EPHEMERAL_PORTS_START} "
            "(higher ports are handed to outgoing connections)"
        )
    return base + (int(text) % (span // stride)) * stride


def port_is_free(addr: str, port: int) -> bool:
    """Whether TCP `port` can be bound on `addr` now (that address only, never 0.0.0.0; no
    SO_REUSEADDR). False when it is in use; other bind errors (an address that is not this
    machine's, a privileged port) raise OSError."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def check_master_port(addr: str, port: int) -> None:
    """SlurmEnvError naming addr:port unless the rendezvous port can be bound there now."""
    try:
        free = port_is_free(addr, port)
    except OSError as e:
        raise SlurmEnvError(f"cannot bind the master port {addr}:{port}: {e}") from None
    if not free:
        raise SlurmEnvError(
            f"master port {addr}:{port} is already in use: another job on this machine may hold it "
            "(nodes of one machine share a network stack), or a previous run has not let go of it yet"
        )


_NO_GPUS = ("NoDevFiles", "-1")


def task_gpus(visible: Optional[str], local_rank: int, gpus_per_rank: int) -> List[str]:
    """This task's GPU ids, given the CUDA_VISIBLE_DEVICES Slurm set for it (None/"" = not set).

    Not set: ids local_rank*g .. local_rank*g+g-1. Exactly g ids: Slurm already restricted the
    task, keep them. At least (local_rank+1)*g ids: the task's slice. Anything else, including
    "NoDevFiles" / "-1" (no GPU for this task), duplicated or empty ids: SlurmEnvError.
    """
    g = gpus_per_rank
    if local_rank < 0 or g < 1:
        raise SlurmEnvError(f"need local_rank >= 0 and gpus_per_rank >= 1, got {local_rank} and {g}")
    where = f"CUDA_VISIBLE_DEVICES={visible!r}, local_rank={local_rank}, gpus_per_rank={g}"
    if visible is None or not visible.strip():
        return [str(i) for i in range(local_rank * g, local_rank * g + g)]
    if visible.strip() in _NO_GPUS:
        raise SlurmEnvError(f"Slurm gave this task no GPU ({where}); ask for GPUs in the job (--gpus-per-task)")
    ids = [x.strip() for x in visible.split(",")]
    if "" in ids or len(set(ids)) != len(ids):
        raise SlurmEnvError(f"cannot read the GPU list ({where}): empty or repeated ids")
    if len(ids) == g:
        return ids
    if len(ids) >= (local_rank + 1) * g:
        return ids[local_rank * g : (local_rank + 1) * g]
    raise SlurmEnvError(
        f"too few GPUs for this task ({where}): {len(ids)} visible, need {g} "
        f"of its own or {(local_rank + 1) * g} to take slice {local_rank}"
    )


def task_cpus(affinity: Sequence[int], cpus_per_task: Optional[int], slot: int) -> List[str]:
    """The CPU cores this task's engine uses, as sorted strings.

    All of `affinity` when Slurm confined the task (cpus_per_task unknown, or no more cores than
    it). Otherwise a window of cpus_per_task cores of sorted(affinity), from index
    (slot * cpus_per_task) % len(affinity), wrapping around.
    """
    cores = sorted(set(affinity))
    if not cores or slot < 0 or (cpus_per_task is not None and cpus_per_task < 1):
        raise SlurmEnvError(
            f"cannot pick cores from affinity={list(affinity)} with cpus_per_task={cpus_per_task}, slot={slot}"
        )
    if cpus_per_task is None or len(cores) <= cpus_per_task:
        return [str(c) for c in cores]
    start = (slot * cpus_per_task) % len(cores)
    window = [cores[(start + i) % len(cores)] for i in range(cpus_per_task)]
    return [str(c) for c in sorted(window)]


def task_replica(procid: int, nnodes: int) -> Tuple[int, int]:
    """(index of the replica among the job's ranks, node rank within it) of Slurm task `procid`
    in a job whose replicas span `nnodes` nodes each, one task per node: replica i runs on tasks
    i x nnodes .. i x nnodes + nnodes - 1, the first of them its leader."""
    if procid < 0 or nnodes < 1:
        raise ReplicaError(f"no replica for procid={procid} with nnodes={nnodes}")
    return divmod(procid, nnodes)


def replica_port(base: int, replica: int, stride: int = 8) -> int:
    """The rendezvous port of replica `replica` of a job whose master port is `base`
    (slurm_ranks.master_port: a slot of `stride` ports per job, which dense ranks leave unused).
    Replicas 0..stride-1 get distinct ports; beyond that they repeat, on other leader nodes."""
    if replica < 0:
        raise ReplicaError(f"replica index must be >= 0, got {replica}")
    return base + replica % stride
