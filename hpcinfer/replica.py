"""Replicas that span nodes: one hpcinfer rank (one vLLM engine) over tp x pp GPUs on several
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
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from .lockstep import ip_problem, is_int

REPLICA_VARS = ("HPCINFER_NNODES", "HPCINFER_NODE_RANK", "HPCINFER_REPLICA_ADDR", "HPCINFER_REPLICA_PORT")


class ReplicaError(ValueError):
    """Settings of a spanning replica that are missing, invalid or inconsistent."""


def nodes_per_replica(gpus_per_rank: int, gpus_per_node, what: str = "cluster.gpus_per_node") -> int:
    """Nodes one replica of `gpus_per_rank` GPUs (CPU: engine workers) spans: 1 when it fits a node
    (or the node size is unknown: None or 0), else gpus_per_rank / gpus_per_node. ValueError,
    naming the node size as `what`, when it is neither at most a node nor a whole number of nodes
    (vLLM needs nnodes to divide the replica's world size, and a replica sharing a node with
    another could not place its devices)."""
    if not gpus_per_node or gpus_per_rank <= gpus_per_node:
        return 1
    if gpus_per_rank % gpus_per_node:
        raise ValueError(f"{gpus_per_rank} GPUs per rank is neither at most {what}={gpus_per_node} "
                         f"nor a multiple of it (a replica larger than a node spans whole nodes)")
    return gpus_per_rank // gpus_per_node


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


def node_slices(devices: Sequence[str], nnodes: int) -> List[List[str]]:
    """A replica's devices (GPU ids or CPU cores) cut into its nodes' consecutive equal shares;
    with fewer devices than nodes (CPU cores), nodes share them round-robin."""
    if nnodes < 1 or not devices:
        raise ReplicaError(f"cannot split devices {list(devices)} over {nnodes} node(s)")
    if len(devices) < nnodes:
        return [[devices[i % len(devices)]] for i in range(nnodes)]
    per = len(devices) // nnodes
    return [list(devices[i * per:(i + 1) * per]) for i in range(nnodes)]


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
