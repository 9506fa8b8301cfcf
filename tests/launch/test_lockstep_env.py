"""The VLLM_DP_* environment of vLLM's lockstep data-parallel path (MoE with expert parallelism)."""

import pytest
from conftest import bare_plan, check_group, plan_for

from hpcinfer.launch.env import VLLM_DP_VARS, LockstepError, lockstep_devices, lockstep_env
from hpcinfer.launch.slurm.task import master_port


def test_lockstep_env():
    assert lockstep_env(3, 1, 4, "10.0.0.1", 23936) == {
        "VLLM_DP_RANK": "3",
        "VLLM_DP_RANK_LOCAL": "1",
        "VLLM_DP_SIZE": "4",
        "VLLM_DP_MASTER_IP": "10.0.0.1",
        "VLLM_DP_MASTER_PORT": "23936",
    }


def test_lockstep_env_edges():
    assert lockstep_env(0, 0, 1, "127.0.0.1", 1)["VLLM_DP_SIZE"] == "1"
    assert lockstep_env(5, 5, 6, "127.0.0.1", 65535)["VLLM_DP_RANK_LOCAL"] == "5"
    assert lockstep_env(0, 0, 2, "fd00:0:0::1", 29500)["VLLM_DP_MASTER_IP"] == "fd00::1"  # IPv6, normalized


@pytest.mark.parametrize(
    "args,quoted",
    [
        ((True, 0, 2, "10.0.0.1", 29500), "rank=True is not an integer"),
        ((0, 0, 2.0, "10.0.0.1", 29500), "size=2.0 is not an integer"),
        ((0, "0", 2, "10.0.0.1", 29500), "local_rank='0' is not an integer"),
        ((0, 0, 2, "10.0.0.1", "29500"), "master_port='29500' is not an integer"),
        ((0, 0, 0, "10.0.0.1", 29500), "size=0 is not >= 1"),
        ((2, 0, 2, "10.0.0.1", 29500), "rank=2 is not in [0, size=2)"),
        ((-1, 0, 2, "10.0.0.1", 29500), "rank=-1 is not in [0, size=2)"),
        ((1, 2, 4, "10.0.0.1", 29500), "local_rank=2 is not in [0, rank=1]"),
        ((1, -1, 4, "10.0.0.1", 29500), "local_rank=-1 is not in [0, rank=1]"),
        ((0, 0, 2, "10.0.0.1", 0), "master_port=0 is not in [1, 65535]"),
        ((0, 0, 2, "10.0.0.1", 65536), "master_port=65536 is not in [1, 65535]"),
        ((0, 0, 2, "gpu01", 29500), "master_ip='gpu01' is not an IP address (a host name? resolve it first)"),
        ((0, 0, 2, "10.0.0.1 ", 29500), "master_ip='10.0.0.1 ' is not an IP address"),
        ((0, 0, 2, "", 29500), "master_ip='' is not an IP address"),
        ((0, 0, 2, None, 29500), "master_ip=None is not a string"),
        ((0, 0, 2, "0.0.0.0", 29500), "master_ip='0.0.0.0' is the unspecified address"),
    ],
)
def test_lockstep_env_rejects(args, quoted):
    with pytest.raises(LockstepError) as e:
        lockstep_env(*args)
    assert quoted in str(e.value)


def test_lockstep_env_reports_every_problem_at_once():
    with pytest.raises(LockstepError) as e:
        lockstep_env(5, 6, 2, "node1", 70000)
    for part in ("rank=5", "local_rank=6", "master_port=70000", "master_ip='node1'"):
        assert part in str(e.value)


# ---- lockstep_devices, a group smaller than the job's tasks ----


def test_lockstep_devices_keep_the_node_gpus_visible():
    assert lockstep_devices(["0", "1", "2", "3"], 1, 2) == "0,1,2,3"  # vLLM picks 2,3 for local rank 1
    assert lockstep_devices(["4", "5"], 0, 2) == "4,5"
    assert lockstep_devices(None, 3, 2) is None  # nothing set: all GPUs visible, leave it so
    with pytest.raises(LockstepError, match="needs its node's first 4 GPUs visible"):
        lockstep_devices(["6", "7"], 1, 2)  # Slurm bound the task to its own GPUs


# ---- the local backend's ranks ----


def _local(overrides, devices, base):
    from hpcinfer.cli import compose
    from hpcinfer.launch.local import rank_processes

    cfg = compose(overrides)
    plan = plan_for(cfg, devices, rows=40)
    return [
        rank_processes(base, cfg, plan, r, group=list(range(cfg.dp)), master_port=29611)[0].env for r in range(cfg.dp)
    ]


PARENT = {"PATH": "/bin", "VLLM_DP_RANK": "9", "VLLM_DP_SIZE": "12", "VLLM_DP_MASTER_IP": "10.1.1.1"}


def test_local_moe_ep_ranks_form_one_group_seeing_all_gpus():
    from hpcinfer.planning.devices import Devices

    envs = _local(["model=tiny_moe", "ep=true", "dp=2", "tp=2"], Devices(gpus=["0", "1", "2", "3"]), PARENT)
    check_group(envs)
    assert [(e["VLLM_DP_RANK"], e["VLLM_DP_RANK_LOCAL"], e["VLLM_DP_SIZE"]) for e in envs] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
    assert {e["VLLM_DP_MASTER_IP"] for e in envs} == {"127.0.0.1"}
    assert {e["VLLM_DP_MASTER_PORT"] for e in envs} == {"29611"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1,2,3", "0,1,2,3"]  # vLLM: rank 1 -> GPUs 2,3
    assert [e["HPCINFER_DEVICES"] for e in envs] == ["0,1", "2,3"]  # each rank's own, for the summary


@pytest.mark.parametrize("overrides", [["dp=2"], ["model=tiny_moe", "dp=2"]])
def test_local_dense_and_moe_without_ep_never_get_vllm_dp_vars(overrides):
    from hpcinfer.planning.devices import Devices

    for env in _local(overrides, Devices(gpus=["0", "1"]), PARENT):
        assert not any(k in env for k in VLLM_DP_VARS)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in _local(overrides, Devices(gpus=["0", "1"]), PARENT)] == ["0", "1"]


# ---- a Slurm task's lockstep variables (entry.task_process) ----

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08]", "PATH": "/bin"}


def _slurm_task_env(overrides, procid, localid, visible, group_size=None, **extra):
    from hpcinfer.cli import compose
    from hpcinfer.launch.slurm.entry import task_process
    from hpcinfer.launch.slurm.task import slurm_task

    cfg = compose(["cluster=slurm", *overrides])
    env = {
        **SLURM,
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(procid // 2),
        **PARENT,
        **extra,
    }
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    plan = bare_plan(4, per_rank=2)
    return task_process(
        env,
        cfg,
        plan,
        slurm_task(env),
        procid,
        ["gpu07", "gpu08"],
        "10.0.0.7",
        master_port(4242),
        {0},
        group_size=group_size,
    ).env


MOE = ["model=tiny_moe", "ep=true", "dp=4", "tp=2"]


def test_slurm_moe_ep_tasks_form_one_group_and_see_their_node():
    envs = [_slurm_task_env(MOE, p, p % 2, "0,1,2,3") for p in range(4)]
    check_group(envs)
    for p, env in enumerate(envs):
        assert {k: env[k] for k in VLLM_DP_VARS} == {
            "VLLM_DP_RANK": str(p),
            "VLLM_DP_RANK_LOCAL": str(p % 2),
            "VLLM_DP_SIZE": "4",
            "VLLM_DP_MASTER_IP": "10.0.0.7",
            "VLLM_DP_MASTER_PORT": str(master_port(4242)),
        }
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and env["HPCINFER_DEVICES"] == ["0,1", "2,3"][p % 2]
    unset = _slurm_task_env(MOE, 1, 1, None)
    assert "CUDA_VISIBLE_DEVICES" not in unset  # Slurm set nothing: every GPU stays visible


def test_slurm_lockstep_array_jobs_take_the_port_of_the_array_job_id():
    env = _slurm_task_env(MOE, 1, 1, "0,1,2,3", SLURM_ARRAY_JOB_ID="4000", SLURM_ARRAY_TASK_ID="3")
    assert env["VLLM_DP_MASTER_PORT"] == str(master_port(4000)) != str(master_port(4242))


def test_slurm_lockstep_group_size_of_the_ranks_that_run():
    env = _slurm_task_env(MOE, 2, 0, "0,1,2,3", group_size=3)  # task 3 has no rank
    assert (env["VLLM_DP_RANK"], env["VLLM_DP_SIZE"]) == ("2", "3")
    with pytest.raises(LockstepError, match=r"rank=3 is not in \[0, size=3\)"):
        _slurm_task_env(MOE, 3, 1, "0,1,2,3", group_size=3)


def test_slurm_dense_tasks_get_no_vllm_dp_vars_and_their_own_gpus():
    env = _slurm_task_env(["dp=4", "tp=2"], 1, 1, "0,1,2,3")
    assert not any(k in env for k in VLLM_DP_VARS) and env["CUDA_VISIBLE_DEVICES"] == "2,3"
