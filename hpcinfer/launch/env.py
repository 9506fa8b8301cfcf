"""The environment of a rank's processes: the contract between a launcher and the code inside a
rank. Pure: every function here maps values to variables or back (`pin_to_cores` aside).

Both sides are here: what a launcher writes and what the rank process reads back
(`context_from_env`, `replica_engine_args`). A launcher works out, for each process it starts, a `ProcessSpec` (who the rank is, its devices,
the run's master address and port, and, where they apply, its place in a replica spanning nodes
and in a lockstep group); `process` turns it into the process to start: its module and its full
environment. The local launcher and a Slurm task differ only in how they fill the spec.

  HPCINFER_RANK, _WORLD_SIZE, _LOCAL_RANK, _HOSTS, _MASTER_ADDR, _MASTER_PORT, _DEVICE_KIND, _DEVICES
      every rank process (`rank_env`); on CPU also vLLM's CPU settings (`cpu_engine_env`)
  HPCINFER_NNODES, _NODE_RANK, _REPLICA_ADDR, _REPLICA_PORT
      each process of a replica spanning nodes (`replica_env`): one rank (one vLLM engine) over
      tp x pp devices on k nodes, through vLLM's multiprocessing backend (engine arguments nnodes,
      node_rank, master_addr, master_port); node 0, the leader, runs `hpcinfer.rank.worker`, the
      others `hpcinfer.rank.headless`
  VLLM_DP_RANK, _RANK_LOCAL, _SIZE, _MASTER_IP, _MASTER_PORT
      only MoE ranks with ep=true, which vLLM runs as one lockstep data-parallel group
      (`lockstep_env`); vLLM rejects dense models on that path, so every other rank has them
      removed, as it has inherited replica variables removed: a launcher adds what applies.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from hpcinfer.planning.sharding import partition

VLLM_DP_VARS = ("VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT")


class LockstepError(ValueError):
    """Lockstep data-parallel settings that are missing, invalid or inconsistent."""


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def ip_problem(master_ip: object) -> Optional[str]:
    """Why `master_ip` is not a usable IP literal, or None."""
    if not isinstance(master_ip, str):
        return f"master_ip={master_ip!r} is not a string"
    try:
        ip = ipaddress.ip_address(master_ip)
    except ValueError:
        return f"master_ip={master_ip!r} is not an IP address (a host name? resolve it first)"
    if ip.is_unspecified:
        return f"master_ip={master_ip!r} is the unspecified address, not a host to connect to"
    return None


def lockstep_env(rank: int, local_rank: int, size: int, master_ip: str, master_port: int) -> Dict[str, str]:
    """The five `VLLM_DP_*` variables of one rank, as strings. LockstepError quotes every bad value."""
    args = {"rank": rank, "local_rank": local_rank, "size": size, "master_port": master_port}
    problems = [f"{k}={v!r} is not an integer" for k, v in args.items() if not is_int(v)]
    if not problems:
        if size < 1:
            problems.append(f"size={size} is not >= 1")
        elif not 0 <= rank < size:
            problems.append(f"rank={rank} is not in [0, size={size})")
        if not 0 <= local_rank <= rank:
            problems.append(f"local_rank={local_rank} is not in [0, rank={rank}]")
        if not 1 <= master_port <= 65535:
            problems.append(f"master_port={master_port} is not in [1, 65535]")
    bad_ip = ip_problem(master_ip)
    if bad_ip:
        problems.append(bad_ip)
    if problems:
        raise LockstepError("bad lockstep data-parallel settings: " + "; ".join(problems))
    return {
        "VLLM_DP_RANK": str(rank),
        "VLLM_DP_RANK_LOCAL": str(local_rank),
        "VLLM_DP_SIZE": str(size),
        "VLLM_DP_MASTER_IP": str(ipaddress.ip_address(master_ip)),
        "VLLM_DP_MASTER_PORT": str(master_port),
    }


def lockstep_devices(visible: Optional[Sequence[str]], local_rank: int, gpus_per_rank: int) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES of a lockstep rank. vLLM places the workers of DP local rank l itself,
    on visible GPUs l x gpus_per_rank .. + gpus_per_rank - 1 (v1/worker/gpu_worker.py,
    init_device), so a rank must see its node's GPUs, not only its own: `visible` (the node's
    GPUs in rank order) is kept whole; None (nothing set: all GPUs visible) stays unset (None).
    LockstepError when fewer than (l + 1) x gpus_per_rank GPUs are visible."""
    if visible is None:
        return None
    need = (local_rank + 1) * gpus_per_rank
    if len(visible) < need:
        raise LockstepError(
            f"lockstep rank with VLLM_DP_RANK_LOCAL={local_rank} and {gpus_per_rank} GPU(s) per rank "
            f"needs its node's first {need} GPUs visible (vLLM picks GPU {local_rank} x "
            f"{gpus_per_rank} + i itself), but only {list(visible)} are; give the ranks of a "
            "node all its GPUs (no per-task GPU binding)"
        )
    return ",".join(visible)


REPLICA_VARS = ("HPCINFER_NNODES", "HPCINFER_NODE_RANK", "HPCINFER_REPLICA_ADDR", "HPCINFER_REPLICA_PORT")


class ReplicaError(ValueError):
    """Settings of a spanning replica that are missing, invalid or inconsistent."""


def replica_env(nnodes: int, node_rank: int, addr: str, port: int) -> Dict[str, str]:
    """The variables of one process of a replica; {} for a single-node replica (nnodes=1).
    ReplicaError quotes every bad value."""
    problems = [
        f"{k}={v!r} is not an integer"
        for k, v in (("nnodes", nnodes), ("node_rank", node_rank), ("port", port))
        if not is_int(v)
    ]
    if not problems:
        if nnodes < 1:
            problems.append(f"nnodes={nnodes} is not >= 1")
        elif not 0 <= node_rank < nnodes:
            problems.append(f"node_rank={node_rank} is not in [0, nnodes={nnodes})")
        if not 1 <= port <= 65535:
            problems.append(f"port={port} is not in [1, 65535]")
    bad_ip = ip_problem(addr)
    if bad_ip:
        problems.append(bad_ip.replace("master_ip=", "addr=", 1))
    if problems:
        raise ReplicaError("bad settings of a replica spanning nodes: " + "; ".join(problems))
    if nnodes == 1:
        return {}
    return {
        "HPCINFER_NNODES": str(nnodes),
        "HPCINFER_NODE_RANK": str(node_rank),
        "HPCINFER_REPLICA_ADDR": addr,
        "HPCINFER_REPLICA_PORT": str(port),
    }


@dataclass(frozen=True)
class RankContext:
    """Who a rank is (what every process of it is told in HPCINFER_* variables)."""

    rank: int
    world_size: int
    local_rank: int
    hosts: List[str]
    master_addr: str
    master_port: int
    device_kind: str  # "cuda" | "cpu"
    devices: List[str]  # GPU ids or CPU cores of this rank

    @property
    def host(self) -> str:
        return socket.gethostname()


def rank_env(
    base: Mapping[str, str], ctx: RankContext, *, workers_per_rank: int, cpu_kvcache_gib: int, offline: bool
) -> Dict[str, str]:
    """The full environment of one rank process: `base` without inherited lockstep and replica
    variables, the rank's HPCINFER_* variables, and its devices. Pure."""
    env = {k: v for k, v in base.items() if k not in VLLM_DP_VARS and k not in REPLICA_VARS}
    env.update(
        {
            "HPCINFER_RANK": str(ctx.rank),
            "HPCINFER_WORLD_SIZE": str(ctx.world_size),
            "HPCINFER_LOCAL_RANK": str(ctx.local_rank),
            "HPCINFER_HOSTS": ",".join(ctx.hosts),
            "HPCINFER_MASTER_ADDR": ctx.master_addr,
            "HPCINFER_MASTER_PORT": str(ctx.master_port),
            "HPCINFER_DEVICE_KIND": ctx.device_kind,
            "HPCINFER_DEVICES": ",".join(ctx.devices),
        }
    )
    if offline:
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if ctx.device_kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ctx.devices)
        return env
    env.update(cpu_engine_env(base, ctx.devices, workers_per_rank, cpu_kvcache_gib))
    return env


def context_from_env(env: Mapping[str, str]) -> RankContext:
    """The rank's identity from its environment (see `rank_env`)."""
    try:
        return RankContext(
            rank=int(env["HPCINFER_RANK"]),
            world_size=int(env["HPCINFER_WORLD_SIZE"]),
            local_rank=int(env.get("HPCINFER_LOCAL_RANK", env["HPCINFER_RANK"])),
            hosts=[h for h in env.get("HPCINFER_HOSTS", "").split(",") if h],
            master_addr=env.get("HPCINFER_MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("HPCINFER_MASTER_PORT", "0")),
            device_kind=env.get("HPCINFER_DEVICE_KIND", "cpu"),
            devices=[d for d in env.get("HPCINFER_DEVICES", "").split(",") if d],
        )
    except KeyError as e:
        raise RuntimeError(f"not started as an hpcinfer rank: {e.args[0]} is not set") from None


def replica_engine_args(env: Mapping[str, str]) -> Dict[str, Any]:
    """vLLM's multi-node engine arguments from a process's environment (see the module doc):
    {nnodes, node_rank, master_addr, master_port}, or {} for a single-node replica."""
    present = [k for k in REPLICA_VARS if env.get(k)]
    if not present or env.get("HPCINFER_NNODES") == "1":
        return {}
    missing = [k for k in REPLICA_VARS if k not in present]
    if missing:
        raise ReplicaError(f"a replica spanning nodes needs {', '.join(REPLICA_VARS)}; {', '.join(missing)} not set")
    try:
        nnodes, node_rank, port = (
            int(env[k]) for k in ("HPCINFER_NNODES", "HPCINFER_NODE_RANK", "HPCINFER_REPLICA_PORT")
        )
    except ValueError:
        raise ReplicaError(
            "HPCINFER_NNODES, HPCINFER_NODE_RANK and HPCINFER_REPLICA_PORT must be integers, got "
            + ", ".join(f"{k}={env[k]!r}" for k in REPLICA_VARS)
        ) from None
    replica_env(nnodes, node_rank, env["HPCINFER_REPLICA_ADDR"], port)  # validates
    return {"nnodes": nnodes, "node_rank": node_rank, "master_addr": env["HPCINFER_REPLICA_ADDR"], "master_port": port}


def pin_to_cores(cores: List[str]) -> None:
    """Restrict this process (and the engine's children) to its rank's CPU cores."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cores})


def cpu_engine_env(base: Mapping[str, str], cores: List[str], workers: int, kvcache_gib: int) -> Dict[str, str]:
    """vLLM-on-CPU settings for a rank that owns `cores` and runs `workers` (tp x pp) workers.
    Values the user already set win."""
    env = {
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": base.get("OMP_NUM_THREADS", str(max(1, len(cores) // workers))),
    }
    if workers == 1:
        # One worker: run the engine in the rank's own process (starts in ~2 s instead of ~15 s).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = base.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    groups = [cores[lo:hi] or [cores[i % len(cores)]] for i, (lo, hi) in enumerate(partition(len(cores), workers))]
    env["VLLM_CPU_OMP_THREADS_BIND"] = base.get("VLLM_CPU_OMP_THREADS_BIND", "|".join(",".join(g) for g in groups))
    env["VLLM_CPU_KVCACHE_SPACE"] = base.get("VLLM_CPU_KVCACHE_SPACE") or str(kvcache_gib)
    return env


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that is free on `addr` now (bound on that address only, never 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


WORKER, HEADLESS = "hpcinfer.rank.worker", "hpcinfer.rank.headless"


@dataclass(frozen=True)
class Replica:
    """A process's place in a replica spanning `nnodes` nodes (vLLM's nnodes / node_rank /
    master_addr / master_port); `host_ip` is this node's address for vLLM's queues between the
    nodes (VLLM_HOST_IP, unless the user set it)."""

    nnodes: int
    node_rank: int
    addr: str
    port: int
    host_ip: Optional[str]  # None: the user's VLLM_HOST_IP stays


@dataclass(frozen=True)
class Lockstep:
    """A rank's place in vLLM's lockstep data-parallel group (MoE with ep=true). `visible`: the
    GPUs its node shows the group in rank order (vLLM places DP local rank l on visible GPUs
    l x tp*pp.. itself), None to leave CUDA_VISIBLE_DEVICES unset (all the node's GPUs)."""

    dp_rank: int
    local_rank: int
    size: int
    master_ip: str
    master_port: int
    visible: Optional[List[str]] = None


@dataclass(frozen=True)
class ProcessSpec:
    """Everything that distinguishes one process of a rank, as its launcher worked it out: who the
    rank is (`ctx`, with this process's own devices) and how its engine runs here."""

    ctx: RankContext
    workers: int  # engine workers of this process (tp x pp / nodes of the replica)
    cpu_kvcache_gib: int
    offline: bool  # the model is a local directory: no hub lookups
    replica: Optional[Replica] = None
    lockstep: Optional[Lockstep] = None

    @property
    def node_rank(self) -> int:
        return self.replica.node_rank if self.replica else 0


@dataclass(frozen=True)
class Process:
    """One process of a rank, ready to start: `python -m <module> <run_dir>` with `env`."""

    module: str  # WORKER (the rank; a spanning replica's leader) | HEADLESS (another node of it)
    node_rank: int  # its node within a replica spanning nodes (0: the leader)
    env: Dict[str, str]


def process(base: Mapping[str, str], spec: ProcessSpec) -> Process:
    """The process of `spec`, its environment built from `base` (the launcher's own). Pure."""
    env = rank_env(
        base, spec.ctx, workers_per_rank=spec.workers, cpu_kvcache_gib=spec.cpu_kvcache_gib, offline=spec.offline
    )
    r = spec.replica
    if r is not None and r.nnodes > 1:
        env.update(replica_env(r.nnodes, r.node_rank, r.addr, r.port))
        if r.host_ip and not env.get("VLLM_HOST_IP"):
            env["VLLM_HOST_IP"] = r.host_ip
    g = spec.lockstep
    if g is not None:
        env.update(lockstep_env(g.dp_rank, g.local_rank, g.size, g.master_ip, g.master_port))
        if spec.ctx.device_kind == "cuda":  # on CPU a lockstep group is one rank: its own binding stays
            if g.visible is None:
                env.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                env["CUDA_VISIBLE_DEVICES"] = str(lockstep_devices(g.visible, g.local_rank, spec.workers))
    return Process(WORKER if spec.node_rank == 0 else HEADLESS, spec.node_rank, env)
