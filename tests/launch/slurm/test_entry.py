"""What a Slurm task makes of its environment: its rank, devices and the worker's environment.
Dense models never get VLLM_DP_*; MoE models with ep=true get a consistent lockstep group."""

from __future__ import annotations

from conftest import bare_plan, check_group

from hpcinfer.cli import compose
from hpcinfer.launch.env import VLLM_DP_VARS
from hpcinfer.launch.slurm.entry import task_process, task_rank
from hpcinfer.launch.slurm.layout import job_layout
from hpcinfer.launch.slurm.task import slurm_task


def plan(ranks, jobs, kind="cuda", per_rank=2):
    return bare_plan(ranks, jobs, kind, per_rank)


def slurm_env(procid, localid, ntasks, nodeid, job="77", **extra):
    return {
        "SLURM_JOB_ID": job,
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NODEID": str(nodeid),
        "SLURM_JOB_NODELIST": "g[1-2]",
        "PATH": "/usr/bin",
        "VLLM_DP_RANK": "5",
        **extra,
    }


def build(cfg, p, env, ranks=None):
    task = slurm_task(env)
    rank = task_rank(task.procid, list(range(p.ranks)) if ranks is None else ranks)
    if rank is None:
        return None, None
    return rank, task_process(env, cfg, p, task, rank, ["g1", "g2"], "10.0.0.1", 20008, {0, 1, 2, 3}).env


def test_dense_tasks_get_their_gpus_and_no_vllm_dp_vars():
    cfg = compose(["cluster=slurm", "dp=8", "tp=2"])
    p = plan(8, job_layout(8, 4))  # 2 nodes x 4 tasks, 2 GPUs each
    seen = {}
    for procid in range(8):
        env = slurm_env(procid, procid % 4, 8, procid // 4, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
        rank, out = build(cfg, p, env)
        assert rank == procid
        assert not any(k in out for k in VLLM_DP_VARS)
        assert out["HPCINFER_RANK"] == str(rank) and out["HPCINFER_MASTER_ADDR"] == "10.0.0.1"
        seen.setdefault(procid // 4, []).append(out["CUDA_VISIBLE_DEVICES"])
    assert seen[0] == seen[1] == ["0,1", "2,3", "4,5", "6,7"]


def test_gpus_restricted_by_slurm_are_kept():
    cfg = compose(["cluster=slurm", "dp=2", "tp=2"])
    _, out = build(cfg, plan(2, job_layout(2, 4)), slurm_env(1, 1, 2, 0, CUDA_VISIBLE_DEVICES="6,7"))
    assert out["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_a_job_runs_its_rank_list_and_idle_tasks_get_none():
    cfg = compose(["cluster=slurm", "dp=5"])
    p = plan(5, job_layout(5, 8, array=3), per_rank=1)  # groups of 2: ranks 0-1, 2-3, 4 (+1 idle task)
    assert build(cfg, p, slurm_env(1, 1, 2, 0), ranks=[2, 3])[0] == 3
    assert build(cfg, p, slurm_env(0, 0, 2, 0), ranks=[4])[0] == 4
    assert build(cfg, p, slurm_env(1, 1, 2, 0), ranks=[4]) == (None, None)


def test_cpu_tasks_spread_over_unconfined_cores():
    cfg = compose(["cluster=slurm_cpu", "dp=4"])  # cpus_per_task=1
    p = plan(4, job_layout(4, 1), kind="cpu", per_rank=1)
    cores = [build(cfg, p, slurm_env(r, 0, 4, r))[1]["VLLM_CPU_OMP_THREADS_BIND"] for r in range(4)]
    assert cores == ["0", "1", "2", "3"]


def test_moe_with_ep_gets_one_consistent_lockstep_group():
    cfg = compose(["cluster=slurm", "model=tiny_moe", "ep=true", "dp=4"])
    p = plan(4, job_layout(4, 2), per_rank=1)  # 2 nodes x 2 tasks
    envs = [build(cfg, p, slurm_env(r, r % 2, 4, r // 2, CUDA_VISIBLE_DEVICES="0,1"))[1] for r in range(4)]
    check_group(envs)
    assert [e["VLLM_DP_RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["VLLM_DP_RANK_LOCAL"] for e in envs] == ["0", "1", "0", "1"]
    assert {e["VLLM_DP_MASTER_IP"] for e in envs} == {"10.0.0.1"} and {e["VLLM_DP_SIZE"] for e in envs} == {"4"}


def test_moe_without_ep_is_dense_path():
    cfg = compose(["cluster=slurm", "model=tiny_moe", "dp=2"])
    _, out = build(cfg, plan(2, job_layout(2, 8), per_rank=1), slurm_env(0, 0, 2, 0))
    assert not any(k in out for k in VLLM_DP_VARS)
