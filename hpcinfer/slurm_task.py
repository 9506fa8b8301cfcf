"""What runs inside the Slurm jobs that backends/slurm.py submits through submitit.

`run_ranks(run_dir, ranks)` runs in every task of a worker job. It works out who the task is
(task SLURM_PROCID runs ranks[SLURM_PROCID]), which devices are its own, and the master
address (first host of SLURM_JOB_NODELIST) and port (from the job id), then runs
`python -m hpcinfer.worker <run_dir>` with the rank's environment (ranks.rank_env), exactly as
the local backend does. Dense models get no VLLM_DP_* variables; MoE models with ep=true get the
lockstep ones (lockstep.py). `run_finalize(run_dir)` is the finalize job.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Tuple

from .config import RunConfig, load_run_config
from .errors import RunIncomplete
from .lockstep import lockstep_env
from .merge import finalize
from .nodelist import hostnames, resolve_address
from .ranks import rank_env
from .rundir import RunDir, atomic_write_json
from .slurm_ranks import SlurmTask, check_master_port, master_port, slurm_task, task_cpus, task_gpus, task_rank
from .worker import should_restart


def task_env(env: Mapping[str, str], cfg: RunConfig, plan: dict, task: SlurmTask, rank: int,
             hosts, master_addr: str, port: int, affinity) -> Dict[str, str]:
    """The worker's environment for this task. Pure given its inputs."""
    per_rank = plan["gpus_per_rank"]
    if plan["device_kind"] == "cuda":
        devices = task_gpus(env.get("CUDA_VISIBLE_DEVICES"), task.localid, per_rank)
    else:
        devices = task_cpus(sorted(affinity), cfg.cluster.cpus_per_task, slot=rank)
    out = rank_env(env, rank=rank, world_size=plan["ranks"], local_rank=task.localid, hosts=hosts,
                   master_addr=master_addr, master_port=port, device_kind=plan["device_kind"], devices=devices,
                   workers_per_rank=per_rank, cpu_kvcache_gib=cfg.cluster.cpu_kvcache_gib,
                   offline=os.path.isdir(plan["engine_args"]["model"]))
    if cfg.ep and cfg.model.moe:  # vLLM's lockstep data-parallel group (one job: validated at submit)
        out.update(lockstep_env(rank, task.localid, plan["ranks"], master_addr, port))
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
    rank = task_rank(task.procid, ranks)
    if rank is None:
        print(f"task {task.procid} of job {task.job_id} has no rank: nothing to do", flush=True)
        return None
    hosts, addr, port = master(task)
    if task.procid == 0:
        check_master_port(addr, port)
    env = task_env(os.environ, cfg, plan, task, rank, hosts, addr, port, os.sched_getaffinity(0))
    print(f"rank {rank}: job {task.job_id} task {task.procid} on {hosts[task.nodeid]} "
          f"(restart {task.restart_count}), log {rd.rank_log(rank)}", flush=True)
    for attempt in range(cfg.rank_retries + 1):
        with open(rd.rank_log(rank), "ab") as log:
            _worker[0] = subprocess.Popen([sys.executable, "-m", "hpcinfer.worker", str(rd.path)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
            code = _wait(_worker[0])
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
