"""Who a rank is and what it may use: the environment contract between a launcher and a worker.

A launcher (the local backend now, a Slurm task later) gives each rank process these variables;
`context_from_env` turns them into a `RankContext`. `rank_env` builds them, pure. Dense models
run one independent vLLM engine per rank, so `VLLM_DP_*` variables (vLLM's lockstep MoE data
parallel path, which rejects dense models) are removed from every rank's environment here, and
so are a spanning replica's `HPCINFER_NNODES` & co. (replica.py): launchers add what applies.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Mapping

from .data import partition
from .lockstep import VLLM_DP_VARS
from .replica import REPLICA_VARS


@dataclass(frozen=True)
class RankContext:
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


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that is free on `addr` now (bound on that address only, never 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def pin_to_cores(cores: List[str]) -> None:
    """Restrict this process (and the engine's children) to its rank's CPU cores."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cores})
