"""Who a rank process is and what it may use, from the environment its launcher gave it.

`context_from_env` turns the HPCINFER_* variables (rank, world size, hosts, devices; written by
launch/env.py) into a `RankContext`; `pin_to_cores` keeps a CPU rank on its cores.

A replica spanning nodes (one rank, one vLLM engine, over tp x pp GPUs on several nodes, through
vLLM's multiprocessing backend) runs one process per node: node 0 is the leader
(`python -m hpcinfer.rank.worker`: the engine, the shard loop, the outputs), nodes 1..k-1 run
vLLM's workers headless (`python -m hpcinfer.rank.headless`). Each of those processes gets

  HPCINFER_NNODES        nodes of the replica (>= 2)
  HPCINFER_NODE_RANK     this process's node in the replica (0 = the leader)
  HPCINFER_REPLICA_ADDR  IP address of the leader's node (vLLM's master_addr)
  HPCINFER_REPLICA_PORT  the replica's torch.distributed rendezvous port there (vLLM's master_port)

and `replica_engine_args` turns them into vLLM's extra engine arguments, the same on every node
(a single-node replica gets none). This module is rank/'s only door to launch/env.py: the
variables' names and their validation.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

from hpcinfer.launch.env import REPLICA_VARS, ReplicaError, replica_env


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
        nnodes, node_rank, port = (int(env[k]) for k in ("HPCINFER_NNODES", "HPCINFER_NODE_RANK",
                                                           "HPCINFER_REPLICA_PORT"))
    except ValueError:
        raise ReplicaError("HPCINFER_NNODES, HPCINFER_NODE_RANK and HPCINFER_REPLICA_PORT must be integers, got "
                           + ", ".join(f"{k}={env[k]!r}" for k in REPLICA_VARS)) from None
    replica_env(nnodes, node_rank, env["HPCINFER_REPLICA_ADDR"], port)  # validates
    return {"nnodes": nnodes, "node_rank": node_rank, "master_addr": env["HPCINFER_REPLICA_ADDR"],
            "master_port": port}


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


def pin_to_cores(cores: List[str]) -> None:
    """Restrict this process (and the engine's children) to its rank's CPU cores."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cores})
