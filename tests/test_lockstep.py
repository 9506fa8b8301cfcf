"""The VLLM_DP_* environment of vLLM's lockstep data-parallel path (MoE with expert parallelism)."""
import pytest
from conftest import check_group

from hpcinfer.launch.env import VLLM_DP_VARS, LockstepError, lockstep_devices, lockstep_env
from hpcinfer.launch.slurm.nodelist import expand_nodelist
from hpcinfer.launch.slurm.task import lockstep_env_from_slurm, master_port


def test_ranks_uses_the_same_variable_names():
    assert VLLM_DP_VARS is VLLM_DP_VARS
    assert set(VLLM_DP_VARS) == {"VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP",
                                 "VLLM_DP_MASTER_PORT"}


# ---- lockstep_env ----

def test_lockstep_env():
    assert lockstep_env(3, 1, 4, "10.0.0.1", 23936) == {
        "VLLM_DP_RANK": "3", "VLLM_DP_RANK_LOCAL": "1", "VLLM_DP_SIZE": "4",
        "VLLM_DP_MASTER_IP": "10.0.0.1", "VLLM_DP_MASTER_PORT": "23936"}


def test_lockstep_env_edges():
    assert lockstep_env(0, 0, 1, "127.0.0.1", 1)["VLLM_DP_SIZE"] == "1"
    assert lockstep_env(5, 5, 6, "127.0.0.1", 65535)["VLLM_DP_RANK_LOCAL"] == "5"
    assert lockstep_env(0, 0, 2, "fd00:0:0::1", 29500)["VLLM_DP_MASTER_IP"] == "fd00::1"  # IPv6, normalized


@pytest.mark.parametrize("args,quoted", [
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
])
def test_lockstep_env_rejects(args, quoted):
    with pytest.raises(LockstepError) as e:
        lockstep_env(*args)
    assert quoted in str(e.value)


def test_lockstep_env_reports_every_problem_at_once():
    with pytest.raises(LockstepError) as e:
        lockstep_env(5, 6, 2, "node1", 70000)
    for part in ("rank=5", "local_rank=6", "master_port=70000", "master_ip='node1'"):
        assert part in str(e.value)


# ---- lockstep_env_from_slurm ----

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
         "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
DNS = {"gpu07": "10.0.0.7", "gpu08": "10.0.0.8"}


def fake_resolve(host):
    if host not in DNS:
        raise ValueError(f"cannot resolve host {host!r}")
    return DNS[host]


def from_slurm(env, **kw):
    kw.setdefault("resolve", fake_resolve)
    kw.setdefault("hosts", lambda nodelist: {"gpu[07-08]": ["gpu07", "gpu08"]}[nodelist])
    return lockstep_env_from_slurm(env, **kw)


def test_from_slurm():
    assert from_slurm(SLURM) == {"VLLM_DP_RANK": "3", "VLLM_DP_RANK_LOCAL": "1", "VLLM_DP_SIZE": "4",
                                 "VLLM_DP_MASTER_IP": "10.0.0.7", "VLLM_DP_MASTER_PORT": str(master_port(4242))}


def test_from_slurm_with_the_default_host_expansion():
    env = lockstep_env_from_slurm({**SLURM, "SLURM_JOB_NODELIST": "gpu08,gpu07"}, resolve=fake_resolve)
    assert env["VLLM_DP_MASTER_IP"] == "10.0.0.8"  # the first host of the list, not the smallest name


def test_from_slurm_array_jobs_take_the_port_of_the_array_job_id():
    env = from_slurm({**SLURM, "SLURM_ARRAY_JOB_ID": "4000", "SLURM_ARRAY_TASK_ID": "3"})
    assert env["VLLM_DP_MASTER_PORT"] == str(master_port(4000)) != str(master_port(4242))


def test_from_slurm_every_task_of_a_job_agrees():
    envs = [from_slurm({**SLURM, "SLURM_PROCID": str(p), "SLURM_LOCALID": str(p % 2), "SLURM_NODEID": str(p // 2)})
            for p in range(4)]
    check_group(envs)
    assert [e["VLLM_DP_RANK"] for e in envs] == ["0", "1", "2", "3"]


def test_from_slurm_names_all_missing_variables():
    with pytest.raises(LockstepError) as e:
        from_slurm({"SLURM_JOB_ID": "1", "SLURM_NODEID": "0"})
    for var in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST"):
        assert var in str(e.value)


def test_from_slurm_master_that_does_not_resolve():
    with pytest.raises(LockstepError, match="master host 'gpu99' does not resolve"):
        from_slurm({**SLURM, "SLURM_JOB_NODELIST": "gpu99,gpu07"}, hosts=lambda nl: nl.split(","))


def test_from_slurm_resolver_returning_a_name_is_caught():
    with pytest.raises(LockstepError, match="master_ip='gpu07.local' is not an IP address"):
        from_slurm(SLURM, resolve=lambda host: host + ".local")


@pytest.mark.parametrize("change,quoted", [({"SLURM_PROCID": "x"}, "SLURM_PROCID='x'"),
                                           ({"SLURM_JOB_NODELIST": "gpu[2-1]"}, "'gpu[2-1]'"),
                                           ({"SLURM_JOB_ID": "abc"}, "job id 'abc'")])
def test_from_slurm_bad_values(change, quoted):
    with pytest.raises(LockstepError) as e:
        lockstep_env_from_slurm({**SLURM, **change}, resolve=fake_resolve, hosts=expand_nodelist)
    assert quoted in str(e.value)


# ---- lockstep_devices, a group smaller than the job's tasks ----

def test_lockstep_devices_keep_the_node_gpus_visible():
    assert lockstep_devices(["0", "1", "2", "3"], 1, 2) == "0,1,2,3"  # vLLM picks 2,3 for local rank 1
    assert lockstep_devices(["4", "5"], 0, 2) == "4,5"
    assert lockstep_devices(None, 3, 2) is None  # nothing set: all GPUs visible, leave it so
    with pytest.raises(LockstepError, match="needs its node's first 4 GPUs visible"):
        lockstep_devices(["6", "7"], 1, 2)  # Slurm bound the task to its own GPUs


def test_from_slurm_group_size_of_the_ranks_that_run():
    env = from_slurm({**SLURM, "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, size=3)  # task 3 has no rank
    assert (env["VLLM_DP_RANK"], env["VLLM_DP_SIZE"]) == ("2", "3")
    with pytest.raises(LockstepError, match=r"rank=3 is not in \[0, size=3\)"):
        from_slurm(SLURM, size=3)


# ---- the local backend's ranks ----

def _local(overrides, devices, base):
    from hpcinfer.cli import compose
    from hpcinfer.config import engine_args, validate
    from hpcinfer.launch.local import rank_launches
    from hpcinfer.planning.inputs import InputFile
    from hpcinfer.planning.layout import make_plan, model_shape
    from hpcinfer.planning.sharding import make_shards

    cfg = compose(overrides)
    validate(cfg)
    shards = make_shards([InputFile("/x.parquet", 40)], cfg.dp, 1024)
    plan = make_plan(cfg, model_shape(cfg.model), devices, engine_args(cfg, "/m"), shards, 40, 1, cfg.dp)
    return [rank_launches(base, cfg, plan, r, group=list(range(cfg.dp)), master_port=29611)[0].env
            for r in range(cfg.dp)]


PARENT = {"PATH": "/bin", "VLLM_DP_RANK": "9", "VLLM_DP_SIZE": "12", "VLLM_DP_MASTER_IP": "10.1.1.1"}


def test_local_moe_ep_ranks_form_one_group_seeing_all_gpus():
    from hpcinfer.planning.devices import Devices

    envs = _local(["model=tiny_moe", "ep=true", "dp=2", "tp=2"], Devices(gpus=["0", "1", "2", "3"]), PARENT)
    check_group(envs)
    assert [(e["VLLM_DP_RANK"], e["VLLM_DP_RANK_LOCAL"], e["VLLM_DP_SIZE"]) for e in envs] == [("0", "0", "2"),
                                                                                              ("1", "1", "2")]
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


# ---- the Slurm task's ranks ----

def _slurm_task_env(overrides, procid, localid, visible):
    from hpcinfer.cli import compose
    from hpcinfer.launch.slurm.entry import task_env
    from hpcinfer.launch.slurm.task import slurm_task

    cfg = compose(["cluster=slurm", *overrides])
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NTASKS": "4",
           "SLURM_NODEID": str(procid // 2), "SLURM_JOB_NODELIST": "gpu[07-08]", "PATH": "/bin", **PARENT}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    plan = {"ranks": 4, "device_kind": "cuda", "gpus_per_rank": 2, "engine_args": {"model": "/nonexistent"}}
    return task_env(env, cfg, plan, slurm_task(env), procid, ["gpu07", "gpu08"], "10.0.0.7", master_port(4242),
                    {0})


def test_slurm_moe_ep_tasks_use_lockstep_env_from_slurm_and_see_their_node():
    envs = [_slurm_task_env(["model=tiny_moe", "ep=true", "dp=4", "tp=2"], p, p % 2, "0,1,2,3") for p in range(4)]
    check_group(envs)
    for p, env in enumerate(envs):
        expect = from_slurm({**SLURM, "SLURM_PROCID": str(p), "SLURM_LOCALID": str(p % 2), "SLURM_NODEID": str(p // 2)})
        assert {k: env[k] for k in VLLM_DP_VARS} == expect
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and env["HPCINFER_DEVICES"] == ["0,1", "2,3"][p % 2]
    unset = _slurm_task_env(["model=tiny_moe", "ep=true", "dp=4", "tp=2"], 1, 1, None)
    assert "CUDA_VISIBLE_DEVICES" not in unset  # Slurm set nothing: every GPU stays visible


def test_slurm_dense_tasks_get_no_vllm_dp_vars_and_their_own_gpus():
    env = _slurm_task_env(["dp=4", "tp=2"], 1, 1, "0,1,2,3")
    assert not any(k in env for k in VLLM_DP_VARS) and env["CUDA_VISIBLE_DEVICES"] == "2,3"
