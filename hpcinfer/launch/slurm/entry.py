"""What runs inside the Slurm jobs that launcher.py submits through submitit.

`RankTask` runs in every task of a worker job (`run_task(run_dir, ranks)`). It works out who the
task is (task SLURM_PROCID runs ranks[SLURM_PROCID]), which devices are its own, and the master
address (first host of SLURM_JOB_NODELIST) and port (from the job id): a `ProcessSpec`, turned into
the rank's process by launch/env.py exactly as the local launcher does, and supervised by the same
`RankSupervisor` (restarts). Dense models get no VLLM_DP_* variables; MoE models with ep=true get
the lockstep ones and see their node's GPUs. A rank spanning k nodes (tp x pp > gpus_per_node) is
k tasks, one per node: task SLURM_PROCID runs node SLURM_PROCID % k of rank
ranks[SLURM_PROCID // k]; node 0 (the leader, on the replica's first host) runs the worker, the
others `hpcinfer.rank.headless`.
"""

from __future__ import annotations

import functools
import os
import subprocess
from typing import Callable, Collection, List, Mapping, Optional, Tuple

from hpcinfer.config import RunConfig, load_run_config
from hpcinfer.launch import supervisor
from hpcinfer.launch.env import Lockstep, Process, ProcessSpec, RankContext, Replica, process
from hpcinfer.launch.slurm.nodelist import hostnames, resolve_address
from hpcinfer.launch.slurm.task import (
    SlurmTask,
    check_master_port,
    master_port,
    replica_port,
    slurm_task,
    task_cpus,
    task_gpus,
    task_rank,
    task_replica,
)
from hpcinfer.launch.supervisor import RankSupervisor
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import STOPPED, Plan


def task_process(
    env: Mapping[str, str],
    cfg: RunConfig,
    plan: Plan,
    task: SlurmTask,
    rank: int,
    hosts: List[str],
    master_addr: str,
    port: int,
    affinity: Collection[int],
    group_size: Optional[int] = None,
    resolve: Callable[[str], str] = resolve_address,
) -> Process:
    """This task's process of `rank` (pure given `resolve`). `group_size`: the ranks of this job (a
    lockstep group's size; default the plan's ranks). A rank spanning nodes: the leader is the
    replica's first node (this task's node - its node rank, one task per node), the rendezvous
    port the job's master port shifted by the rank's place in the job (replica_port), and this
    node's own address (VLLM_HOST_IP, unless set) resolved as the leader's is, for vLLM's queues
    between the nodes (its own guess takes the default route's)."""
    nodes = plan.nodes_per_rank
    index, node_rank = task_replica(task.procid, nodes)
    per_node = plan.gpus_per_rank // nodes  # a rank spanning nodes: its GPUs (CPU: workers) on this node
    if plan.device_kind == "cuda":
        devices = task_gpus(env.get("CUDA_VISIBLE_DEVICES"), task.localid, per_node)
    else:
        devices = task_cpus(sorted(affinity), cfg.cluster.cpus_per_task, slot=rank * nodes + task.procid % nodes)
    replica = lockstep = None
    if nodes > 1:
        replica = Replica(
            nodes,
            node_rank,
            resolve(hosts[task.nodeid - node_rank]),
            replica_port(port, index),
            None if env.get("VLLM_HOST_IP") else resolve(hosts[task.nodeid]),
        )
    if cfg.lockstep:  # vLLM's lockstep data-parallel group: the job's tasks (one job: validated at submit)
        visible = env.get("CUDA_VISIBLE_DEVICES")
        lockstep = Lockstep(
            task.procid,
            task.localid,
            plan.ranks if group_size is None else group_size,
            master_addr,
            master_port(task.array_job_id or task.job_id),
            visible=visible.split(",") if visible and visible.strip() else None,
        )
    return process(
        env,
        ProcessSpec(
            RankContext(rank, plan.ranks, task.localid, list(hosts), master_addr, port, plan.device_kind, devices),
            workers=per_node,
            cpu_kvcache_gib=cfg.cluster.cpu_kvcache_gib,
            offline=os.path.isdir(plan.engine_args["model"]),
            replica=replica,
            lockstep=lockstep,
        ),
    )


def master(task: SlurmTask) -> Tuple[list, str, int]:
    """(hosts, master address, master port) of the task's job."""
    hosts = hostnames(task.nodelist)
    addr = resolve_address(hosts[0])
    port = master_port(task.job_id)  # SLURM_JOB_ID: shared by the tasks of one job, unique per array element
    return hosts, addr, port


def run_task(run_dir: str, ranks: List[int]) -> Optional[int]:
    """One task of a worker job that runs `ranks`: run its process of its rank to the end,
    supervised (restarts). Returns the rank (None for a task without one, or one stopped by a
    signal); raises when the rank failed, so that Slurm records the task as failed."""
    rd = RunDir(run_dir)
    task = slurm_task(os.environ)
    plan, cfg = rd.read_plan(), load_run_config(rd.config)
    index, node_rank = task_replica(task.procid, plan.nodes_per_rank)
    rank = task_rank(index, ranks)
    if rank is None:
        print(f"task {task.procid} of job {task.job_id} has no rank: nothing to do", flush=True)
        return None
    hosts, addr, port = master(task)
    if task.procid == 0:
        check_master_port(addr, port)
    proc = task_process(os.environ, cfg, plan, task, rank, hosts, addr, port, os.sched_getaffinity(0), len(ranks))
    if proc.node_rank == 0 and plan.nodes_per_rank > 1 and task.procid:
        check_master_port(proc.env["HPCINFER_REPLICA_ADDR"], int(proc.env["HPCINFER_REPLICA_PORT"]))
    log = rd.node_log(rank, proc.node_rank)
    what = f"rank {rank}" + (f": headless node {proc.node_rank}" if proc.node_rank else "")
    print(
        f"{what}: job {task.job_id} task {task.procid} on {hosts[task.nodeid]} (restart {task.restart_count}), "
        f"log {log}",
        flush=True,
    )
    sup = _supervisor[0] = RankSupervisor(
        rd, rank, lambda: [proc], cfg.rank_retries, functools.partial(supervisor.spawn, new_session=False)
    ).start()
    code = sup.wait(poll_s=1.0)
    if proc.node_rank:
        if code:
            raise RuntimeError(f"{what} failed (its leader failed or it did, exit {code}); see {log}")
        return None
    record = rd.read_rank(rank)
    if code != 0 and record is not None and record.state == STOPPED:  # a signal (preemption, time limit, scancel)
        print(f"rank {rank} stopped by a signal; its finished rows are durable", flush=True)
        return None
    if code != 0:
        raise RuntimeError(f"rank {rank} failed (exit {code}); see {log}")
    return rank


_supervisor: List[Optional[RankSupervisor]] = [None]  # this task's, for RankTask.checkpoint


class RankTask:
    """What submitit runs in each task of a worker job: `run_task`, made checkpointable. Slurm's
    USR2 before a time limit or a preemption reaches the worker (it makes its finished rows
    durable and stops) and submitit's handler, which calls `checkpoint` and requeues the job; the
    requeued job resumes from the durable parts. `checkpoint` first lets the worker finish its
    last write."""

    def __call__(self, run_dir: str, ranks: List[int]) -> Optional[int]:
        return run_task(run_dir, ranks)

    def checkpoint(self, run_dir: str, ranks: List[int]):
        import submitit

        sup = _supervisor[0]
        for proc in sup.running if sup is not None else []:  # let the worker finish its last write
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(RankTask(), run_dir, ranks)
