"""[from slurm_task] What runs inside the Slurm jobs that backends/slurm.py submits through submitit.

`run_ranks(run_dir, ranks)` runs in every task of a worker job. It works out who the task is
(task SLURM_PROCID runs ranks[SLURM_PROCID]), which devices are its own, and the master
address (first host of SLURM_JOB_NODELIST) and port (from the job id), then runs
`python -m hpcinfer.worker <run_dir>` with the rank's environment (ranks.rank_env), exactly as
the local backend does. Dense models get no VLLM_DP_* variables; MoE models with ep=true get the
lockstep ones (lockstep.lockstep_env_from_slurm) and see their node's GPUs. A rank spanning k nodes
(tp x pp > gpus_per_node) is k tasks, one per node (replica.py): task SLURM_PROCID runs node
SLURM_PROCID % k of rank ranks[SLURM_PROCID // k]; node 0 (the leader, on the replica's first host)
runs the worker, the others `python -m hpcinfer.headless`. `run_finalize(run_dir)` is the finalize job.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Tuple

from hpcinfer.config import RunConfig, load_run_config
from hpcinfer.errors import RunIncomplete
from hpcinfer.launch.env import lockstep_devices, rank_env, replica_env
from hpcinfer.launch.slurm.nodelist import hostnames, resolve_address
from hpcinfer.launch.slurm.task import (
    SlurmTask,
    check_master_port,
    lockstep_env_from_slurm,
    master_port,
    replica_port,
    slurm_task,
    task_cpus,
    task_gpus,
    task_rank,
    task_replica,
)
from hpcinfer.rank.headless import LeaderWatch
from hpcinfer.rank.worker import should_restart
from hpcinfer.rundir.files import atomic_write_json
from hpcinfer.rundir.merge import finalize
from hpcinfer.rundir.paths import RunDir


def task_env(env: Mapping[str, str], cfg: RunConfig, plan: dict, task: SlurmTask, rank: int,
             hosts, master_addr: str, port: int, affinity, group_size: Optional[int] = None) -> Dict[str, str]:
    """The worker's environment for this task. Pure given its inputs. `group_size`: the ranks of
    this job (a lockstep group's size; default the plan's ranks)."""
    nodes = cfg.nodes_per_rank
    per_node = plan["gpus_per_rank"] // nodes  # a rank spanning nodes: its GPUs (CPU: workers) on this node
    if plan["device_kind"] == "cuda":
        devices = task_gpus(env.get("CUDA_VISIBLE_DEVICES"), task.localid, per_node)
    else:
        devices = task_cpus(sorted(affinity), cfg.cluster.cpus_per_task, slot=rank * nodes + task.procid % nodes)
    out = rank_env(env, rank=rank, world_size=plan["ranks"], local_rank=task.localid, hosts=hosts,
                   master_addr=master_addr, master_port=port, device_kind=plan["device_kind"], devices=devices,
                   workers_per_rank=per_node, cpu_kvcache_gib=cfg.cluster.cpu_kvcache_gib,
                   offline=os.path.isdir(plan["engine_args"]["model"]))
    if cfg.lockstep:  # vLLM's lockstep data-parallel group (one job: validated at submit)
        out.update(lockstep_env_from_slurm(env, resolve=lambda _host: master_addr, hosts=lambda _nodes: list(hosts),
                                           size=plan["ranks"] if group_size is None else group_size))
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if plan["device_kind"] == "cuda" and visible and visible.strip():
            out["CUDA_VISIBLE_DEVICES"] = str(lockstep_devices(visible.split(","), task.localid, per_node))
        elif plan["device_kind"] == "cuda":  # Slurm left all the node's GPUs visible: keep it so
            out.pop("CUDA_VISIBLE_DEVICES", None)
    return out


def replica_task_env(base: Mapping[str, str], task: SlurmTask, hosts: List[str], nodes: int, node_rank: int,
                     index: int, port: int, resolve=resolve_address) -> Dict[str, str]:
    """The replica variables of a task of a rank spanning `nodes` nodes ({} for one node): the
    leader is the replica's first node (this task's node - node_rank, one task per node), the
    port the job's master port shifted by the rank's place `index` in the job (replica_port).
    VLLM_HOST_IP (unless `base` sets it): this node's address, resolved as the leader's is, which
    vLLM's message queues between the nodes use (its own guess takes the default route's)."""
    if nodes == 1:
        return {}
    out = replica_env(nodes, node_rank, resolve(hosts[task.nodeid - node_rank]), replica_port(port, index))
    if not base.get("VLLM_HOST_IP"):
        out["VLLM_HOST_IP"] = resolve(hosts[task.nodeid])
    return out


def master(task: SlurmTask) -> Tuple[list, str, int]:
    """(hosts, master address, master port) of the task's job."""
    hosts = hostnames(task.nodelist)
    addr = resolve_address(hosts[0])
    port = master_port(task.job_id)  # SLURM_JOB_ID: shared by the tasks of one job, unique per array element
    return hosts, addr, port


def run_ranks(run_dir: str, ranks: List[int]) -> Optional[int]:
    """One task of a worker job that runs `ranks`: run its rank's worker to the end (restarted
    up to rank_retries times). Returns the rank (None for a task without one); raises when the
    rank failed, so that Slurm records the task as failed."""
    rd = RunDir(run_dir)
    task = slurm_task(os.environ)
    plan, cfg = rd.read_plan(), load_run_config(rd.config)
    nodes = cfg.nodes_per_rank
    index, node_rank = task_replica(task.procid, nodes)
    rank = task_rank(index, ranks)
    if rank is None:
        print(f"task {task.procid} of job {task.job_id} has no rank: nothing to do", flush=True)
        return None
    hosts, addr, port = master(task)
    if task.procid == 0:
        check_master_port(addr, port)
    env = task_env(os.environ, cfg, plan, task, rank, hosts, addr, port, os.sched_getaffinity(0), len(ranks))
    env.update(replica_task_env(env, task, hosts, nodes, node_rank, index, port))
    if node_rank:
        return _run_headless(rd, cfg, task, rank, node_rank, env)
    if nodes > 1 and task.procid:
        check_master_port(env["HPCINFER_REPLICA_ADDR"], int(env["HPCINFER_REPLICA_PORT"]))
    print(f"rank {rank}: job {task.job_id} task {task.procid} on {hosts[task.nodeid]} "
          f"(restart {task.restart_count}), log {rd.rank_log(rank)}", flush=True)
    for attempt in range(cfg.rank_retries + 1):
        code = _run_module(rd.rank_log(rank), "hpcinfer.rank.worker", rd, env)
        if not should_restart(rd, rank, code, cfg.rank_retries - attempt):
            break
        print(f"rank {rank} failed (exit {code}); restarting it ({attempt + 1} of {cfg.rank_retries})", flush=True)
    state = (rd.read_optional(rd.rank_file(rank)) or {}).get("state")
    if code != 0 and state == "stopped":  # a signal (preemption, time limit, scancel): the job is going
        print(f"rank {rank} stopped by a signal; its finished rows are durable", flush=True)
        return None
    if code != 0:
        raise RuntimeError(f"rank {rank} failed (exit {code}); see {rd.rank_log(rank)}")
    return rank


def _run_headless(rd: RunDir, cfg: RunConfig, task: SlurmTask, rank: int, node_rank: int,
                  env: Dict[str, str]) -> None:
    """A non-leader node of a rank spanning nodes: `hpcinfer.headless` until the leader's rank
    has ended (it exits by itself then); again each time the leader is restarted after a failure."""
    log_path = rd.rank_log(rank).with_name(f"rank-{rank}-node-{node_rank}.log")
    print(f"rank {rank}: headless node {node_rank}: job {task.job_id} task {task.procid}, log {log_path}", flush=True)
    for attempt in range(cfg.rank_retries + 1):
        watch = LeaderWatch(rd, rank)
        code = _run_module(log_path, "hpcinfer.rank.headless", rd, env)
        outcome = watch.ended()
        if outcome != "failed" or attempt == cfg.rank_retries:
            break
        print(f"rank {rank}: its leader failed; headless node {node_rank} joins its restart", flush=True)
    if outcome == "failed" or (code != 0 and outcome is None):
        raise RuntimeError(f"rank {rank} (headless node {node_rank}) failed (exit {code}, leader {outcome}); "
                           f"see {log_path}")
    return None


def _run_module(log_path, module: str, rd: RunDir, env: Dict[str, str]) -> int:
    """Run `python -m <module> <run_dir>` to its end, logging to `log_path`; its exit code."""
    with open(log_path, "ab") as log:
        _worker[0] = subprocess.Popen([sys.executable, "-m", module, str(rd.path)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        return _wait(_worker[0])


_worker: List[Optional[subprocess.Popen]] = [None]  # this task's worker process, for RankTask.checkpoint


def _wait(proc: subprocess.Popen) -> int:
    while True:  # a signal handler may interrupt the wait: wait again
        try:
            return proc.wait()
        except InterruptedError:
            continue


class RankTask:
    """What submitit runs in each task of a worker job: `run_ranks`, made checkpointable. Slurm's
    USR2 before a time limit or a preemption reaches the worker (it makes its finished rows
    durable and stops) and submitit's handler, which calls `checkpoint` and requeues the job; the
    requeued job resumes from the durable parts. `checkpoint` first lets the worker finish its
    last write."""

    def __call__(self, run_dir: str, ranks: List[int]) -> Optional[int]:
        return run_ranks(run_dir, ranks)

    def checkpoint(self, run_dir: str, ranks: List[int]):
        import submitit

        proc = _worker[0]
        if proc is not None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(RankTask(), run_dir, ranks)


def run_finalize(run_dir: str) -> dict:
    """The finalize job: merge and verify (merge.finalize), record the outcome in finalize.json;
    raise when the run is incomplete so that the job ends FAILED."""
    rd = RunDir(run_dir)
    outcome = {"job_id": os.environ.get("SLURM_JOB_ID"), "finished_at": None, "exit_code": 0, "message": ""}
    try:
        summary = finalize(run_dir)
        outcome["message"] = f"{summary['rows']} rows ({summary['rows_failed']} with errors) -> {summary['results']}"
    except RunIncomplete as e:
        outcome.update(exit_code=1, message=f"incomplete, nothing published: {e}")
    outcome["finished_at"] = time.time()
    atomic_write_json(rd.finalize_outcome, outcome)
    print(outcome["message"], flush=True)
    if outcome["exit_code"]:
        raise RunIncomplete(outcome["message"])
    return outcome
