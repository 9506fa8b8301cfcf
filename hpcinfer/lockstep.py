"""The environment of vLLM's lockstep data-parallel path (`VLLM_DP_*`).

vLLM runs data parallel in lockstep (all ranks step together, one DP group) only for MoE models
with expert parallelism; it rejects dense models, which hpcinfer runs as independent engines,
one per rank, with these variables removed (see `ranks.rank_env`). This module builds the
variables for the MoE case, from explicit values or from a Slurm task's environment, and checks
that the ranks of one group agree.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .nodelist import hostnames, resolve_address
from .slurm_ranks import SlurmEnvError, master_port, slurm_task

VLLM_DP_VARS = ("VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT")
_INT_VARS = ("VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_PORT")


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


def lockstep_env_from_slurm(env: Mapping[str, str], resolve: Callable[[str], str] = resolve_address,
                            hosts: Callable[[str], List[str]] = hostnames,
                            size: Optional[int] = None) -> Dict[str, str]:
    """The `VLLM_DP_*` variables of a Slurm task: one task = one DP rank (SLURM_PROCID of
    SLURM_NTASKS, local rank SLURM_LOCALID), master = the first host of SLURM_JOB_NODELIST,
    port = `master_port` of SLURM_ARRAY_JOB_ID or SLURM_JOB_ID. `size` (default SLURM_NTASKS) is
    the group's size when the job's last tasks have no rank (they never join the group)."""
    try:
        task = slurm_task(env)
        master_host = hosts(task.nodelist)[0]
        port = master_port(task.array_job_id or task.job_id)
    except (SlurmEnvError, ValueError, IndexError) as e:
        raise LockstepError(f"no lockstep settings from this Slurm environment: {e}") from None
    try:
        master_ip = resolve(master_host)
    except (OSError, ValueError) as e:
        raise LockstepError(f"the lockstep master host {master_host!r} does not resolve: {e}") from None
    return lockstep_env(task.procid, task.localid, task.ntasks if size is None else size, master_ip, port)


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


def _disagreements(envs: Sequence[Mapping[str, str]]) -> List[str]:
    """'VAR differs: ...' for each shared variable on which the ranks do not agree."""
    out = []
    for key in ("VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT"):
        by_value: Dict[str, List[str]] = {}
        for env in envs:
            by_value.setdefault(env[key], []).append(env["VLLM_DP_RANK"])
        if len(by_value) > 1:
            out.append(f"{key} differs: " + ", ".join(f"{v!r} at rank(s) {','.join(r)}" for v, r in by_value.items()))
    return out


def check_group(envs: Sequence[Mapping[str, str]]) -> None:
    """The envs of all ranks of one DP group agree on size, master ip and port, and their ranks
    are exactly 0..size-1, each valid on its own. LockstepError names what is wrong."""
    if not envs:
        raise LockstepError("a lockstep group needs at least one rank; got none")
    for i, env in enumerate(envs):
        missing = [k for k in VLLM_DP_VARS if k not in env]
        not_int = [f"{k}={env[k]!r}" for k in _INT_VARS if k in env and not re.fullmatch(r"-?[0-9]+", env[k])]
        if missing or not_int:
            raise LockstepError(f"lockstep env #{i}: missing {missing or 'nothing'}, not integers {not_int or 'none'}")
    problems = _disagreements(envs)
    if not problems:
        ranks = [int(env["VLLM_DP_RANK"]) for env in envs]
        size = int(envs[0]["VLLM_DP_SIZE"])
        duplicates = sorted(r for r, n in Counter(ranks).items() if n > 1)
        missing_ranks = sorted(set(range(size)) - set(ranks))
        extra = sorted(set(ranks) - set(range(size)))
        for what, values in (("duplicate", duplicates), ("missing", missing_ranks), ("out-of-range", extra)):
            if values:
                problems.append(f"{what} ranks {values} (size {size})")
    if problems:
        raise LockstepError("inconsistent lockstep group: " + "; ".join(problems))
    for i, env in enumerate(envs):
        try:
            rank, local_rank, size, port = (int(env[k]) for k in _INT_VARS)
            lockstep_env(rank, local_rank, size, env["VLLM_DP_MASTER_IP"], port)
        except LockstepError as e:
            raise LockstepError(f"lockstep env #{i}: {e}") from None
