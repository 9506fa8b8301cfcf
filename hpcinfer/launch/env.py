"""[from lockstep] The environment of vLLM's lockstep data-parallel path (`VLLM_DP_*`).

vLLM runs data parallel in lockstep (all ranks step together, one DP group) only for MoE models
with expert parallelism; it rejects dense models, which hpcinfer runs as independent engines,
one per rank, with these variables removed (see `ranks.rank_env`). This module builds the
variables for the MoE case, from explicit values or from a Slurm task's environment, and checks
that the ranks of one group agree.

[from replica] Replicas that span nodes: one hpcinfer rank (one vLLM engine) over tp x pp GPUs on several
nodes, through vLLM's multiprocessing backend (engine arguments `nnodes`, `node_rank`,
`master_addr`, `master_port`). A replica of tp x pp = k x gpus_per_node GPUs runs one process on
each of its k nodes: node 0 is the leader (`python -m hpcinfer.worker`: the engine, the rank loop,
the outputs), nodes 1..k-1 run vLLM's workers headless (`python -m hpcinfer.headless`).

Pure. A launcher (backends/local.py, slurm_task.py) gives each process of a spanning replica
these variables (a single-node replica gets none of them):

  HPCINFER_NNODES        nodes of the replica (>= 2)
  HPCINFER_NODE_RANK     this process's node in the replica (0 = the leader)
  HPCINFER_REPLICA_ADDR  IP address of the leader's node (vLLM's master_addr)
  HPCINFER_REPLICA_PORT  the replica's torch.distributed rendezvous port there (vLLM's master_port)

and `replica_engine_args` turns them into the extra engine arguments, the same on every node.

[from ranks] Who a rank is and what it may use: the environment contract between a launcher and a worker.

A launcher (the local backend now, a Slurm task later) gives each rank process these variables;
`context_from_env` turns them into a `RankContext`. `rank_env` builds them, pure. Dense models
run one independent vLLM engine per rank, so `VLLM_DP_*` variables (vLLM's lockstep MoE data
parallel path, which rejects dense models) are removed from every rank's environment here, and
so are a spanning replica's `HPCINFER_NNODES` & co. (replica.py): launchers add what applies.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Dict, List, Mapping, Optional, Sequence

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
    return {"VLLM_DP_RANK": str(rank), "VLLM_DP_RANK_LOCAL": str(local_rank), "VLLM_DP_SIZE": str(size),
            "VLLM_DP_MASTER_IP": str(ipaddress.ip_address(master_ip)), "VLLM_DP_MASTER_PORT": str(master_port)}


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
        raise LockstepError(f"lockstep rank with VLLM_DP_RANK_LOCAL={local_rank} and {gpus_per_rank} GPU(s) per rank "
                            f"needs its node's first {need} GPUs visible (vLLM picks GPU {local_rank} x "
                            f"{gpus_per_rank} + i itself), but only {list(visible)} are; give the ranks of a "
                            "node all its GPUs (no per-task GPU binding)")
    return ",".join(visible)


REPLICA_VARS = ("HPCINFER_NNODES", "HPCINFER_NODE_RANK", "HPCINFER_REPLICA_ADDR", "HPCINFER_REPLICA_PORT")


class ReplicaError(ValueError):
    """Settings of a spanning replica that are missing, invalid or inconsistent."""


def replica_env(nnodes: int, node_rank: int, addr: str, port: int) -> Dict[str, str]:
    """The variables of one process of a replica; {} for a single-node replica (nnodes=1).
    ReplicaError quotes every bad value."""
    problems = [f"{k}={v!r} is not an integer" for k, v in
                (("nnodes", nnodes), ("node_rank", node_rank), ("port", port)) if not is_int(v)]
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
    return {"HPCINFER_NNODES": str(nnodes), "HPCINFER_NODE_RANK": str(node_rank),
            "HPCINFER_REPLICA_ADDR": addr, "HPCINFER_REPLICA_PORT": str(port)}


def node_slices(devices: Sequence[str], nnodes: int) -> List[List[str]]:
    """A replica's devices (GPU ids or CPU cores) cut into its nodes' consecutive equal shares;
    with fewer devices than nodes (CPU cores), nodes share them round-robin."""
    if nnodes < 1 or not devices:
        raise ReplicaError(f"cannot split devices {list(devices)} over {nnodes} node(s)")
    if len(devices) < nnodes:
        return [[devices[i % len(devices)]] for i in range(nnodes)]
    per = len(devices) // nnodes
    return [list(devices[i * per:(i + 1) * per]) for i in range(nnodes)]


def rank_env(base: Mapping[str, str], *, rank: int, world_size: int, local_rank: int, hosts: List[str],
             master_addr: str, master_port: int, device_kind: str, devices: List[str],
             workers_per_rank: int, cpu_kvcache_gib: int, offline: bool) -> Dict[str, str]:
    """The full environment of one rank process. Pure."""
    env = {k: v for k, v in base.items() if k not in VLLM_DP_VARS and k not in REPLICA_VARS}
    env.update({
        "HPCINFER_RANK": str(rank),
        "HPCINFER_WORLD_SIZE": str(world_size),
        "HPCINFER_LOCAL_RANK": str(local_rank),
        "HPCINFER_HOSTS": ",".join(hosts),
        "HPCINFER_MASTER_ADDR": master_addr,
        "HPCINFER_MASTER_PORT": str(master_port),
        "HPCINFER_DEVICE_KIND": device_kind,
        "HPCINFER_DEVICES": ",".join(devices),
    })
    if offline:
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if device_kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        return env
    env.update(cpu_engine_env(base, devices, workers_per_rank, cpu_kvcache_gib))
    return env


def cpu_engine_env(base: Mapping[str, str], cores: List[str], workers: int, kvcache_gib: int) -> Dict[str, str]:
    """vLLM-on-CPU settings for a rank that owns `cores` and runs `workers` (tp x pp) workers.
    Values the user already set win."""
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": base.get("OMP_NUM_THREADS", str(max(1, len(cores) // workers)))}
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
