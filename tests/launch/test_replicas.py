"""Replicas spanning nodes (tp x pp > gpus_per_node): the replica variables and engine arguments
(launch/env.py), the config rules, the Slurm job layout and task mapping
(launch/slurm/), the plan, and the local launcher's processes (leader + headless).
"""

from __future__ import annotations

import pytest
from conftest import bare_plan, plan_for

from hpcinfer.cli import compose
from hpcinfer.config import nodes_per_rank, validate
from hpcinfer.errors import ConfigError
from hpcinfer.launch import local
from hpcinfer.launch.env import (
    HEADLESS,
    REPLICA_VARS,
    VLLM_DP_VARS,
    WORKER,
    ReplicaError,
    replica_engine_args,
    replica_env,
)
from hpcinfer.launch.slurm.entry import task_process
from hpcinfer.launch.slurm.layout import job_layout, rank_groups, slurm_jobs
from hpcinfer.launch.slurm.task import replica_port, slurm_task, task_replica
from hpcinfer.planning.devices import Devices, node_slices
from hpcinfer.planning.render import format_plan

LLAMA = ["model=llama", "model.path=org/llama"]  # 32 heads: tp up to 32


# ---- replica.py --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "per_rank,per_node,nodes",
    [(1, 8, 1), (8, 8, 1), (16, 8, 2), (32, 8, 4), (2, 1, 2), (4, None, 1), (4, 0, 1), (6, 2, 3)],
)
def test_nodes_per_rank(per_rank, per_node, nodes):
    assert nodes_per_rank(per_rank, per_node) == nodes


@pytest.mark.parametrize("per_rank,per_node", [(12, 8), (3, 2), (9, 4)])
def test_nodes_per_replica_needs_whole_nodes(per_rank, per_node):
    with pytest.raises(
        ValueError,
        match=f"{per_rank} GPUs per rank is neither at most cluster.gpus_per_node={per_node} nor a multiple of it",
    ):
        nodes_per_rank(per_rank, per_node)


def test_replica_env_and_engine_args_round_trip():
    env = replica_env(2, 1, "10.0.0.7", 20008)
    assert env == {
        "HPCINFER_NNODES": "2",
        "HPCINFER_NODE_RANK": "1",
        "HPCINFER_REPLICA_ADDR": "10.0.0.7",
        "HPCINFER_REPLICA_PORT": "20008",
    }
    assert replica_engine_args({"PATH": "/bin", **env}) == {
        "nnodes": 2,
        "node_rank": 1,
        "master_addr": "10.0.0.7",
        "master_port": 20008,
    }


def test_single_node_replica_has_no_variables_and_no_extra_engine_args():
    assert replica_env(1, 0, "127.0.0.1", 29500) == {}
    assert replica_engine_args({"PATH": "/bin"}) == {}
    assert replica_engine_args({"HPCINFER_NNODES": "1", "HPCINFER_NODE_RANK": "0"}) == {}


@pytest.mark.parametrize(
    "args,quoted",
    [
        ((0, 0, "10.0.0.1", 1), "nnodes=0 is not >= 1"),
        ((2, 2, "10.0.0.1", 1), "node_rank=2 is not in [0, nnodes=2)"),
        ((2, -1, "10.0.0.1", 1), "node_rank=-1 is not in [0, nnodes=2)"),
        ((2, 0, "10.0.0.1", 0), "port=0 is not in [1, 65535]"),
        ((2, 0, "10.0.0.1", None), "port=None is not an integer"),
        ((2, 0, "node7", 29500), "addr='node7' is not an IP address"),
        ((True, 0, "10.0.0.1", 29500), "nnodes=True is not an integer"),
    ],
)
def test_replica_env_rejects(args, quoted):
    with pytest.raises(ReplicaError) as e:
        replica_env(*args)
    assert quoted in str(e.value)


@pytest.mark.parametrize(
    "env,quoted",
    [
        ({"HPCINFER_NNODES": "2", "HPCINFER_NODE_RANK": "0"}, "HPCINFER_REPLICA_ADDR, HPCINFER_REPLICA_PORT not set"),
        (
            {
                "HPCINFER_NNODES": "two",
                "HPCINFER_NODE_RANK": "0",
                "HPCINFER_REPLICA_ADDR": "10.0.0.1",
                "HPCINFER_REPLICA_PORT": "1",
            },
            "HPCINFER_NNODES='two'",
        ),
        (
            {
                "HPCINFER_NNODES": "2",
                "HPCINFER_NODE_RANK": "5",
                "HPCINFER_REPLICA_ADDR": "10.0.0.1",
                "HPCINFER_REPLICA_PORT": "1",
            },
            "node_rank=5 is not in [0, nnodes=2)",
        ),
    ],
)
def test_replica_engine_args_rejects(env, quoted):
    with pytest.raises(ReplicaError, match=None) as e:
        replica_engine_args(env)
    assert quoted in str(e.value)


def test_node_slices():
    assert node_slices(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert node_slices(["4", "5"], 2) == [["4"], ["5"]]
    assert node_slices(["0"], 2) == [["0"], ["0"]]  # one CPU core: shared
    with pytest.raises(ValueError, match="cannot split"):
        node_slices([], 2)


def test_task_replica_and_ports():
    assert [task_replica(p, 2) for p in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert [task_replica(p, 1) for p in range(3)] == [(0, 0), (1, 0), (2, 0)]
    ports = [replica_port(20008, i) for i in range(8)]
    assert ports == list(range(20008, 20016)) and replica_port(20008, 8) == 20008


def test_ranks_strip_inherited_replica_variables():
    from hpcinfer.launch.env import RankContext, rank_env

    base = {"PATH": "/bin", **replica_env(2, 1, "10.0.0.1", 9)}
    env = rank_env(
        base,
        RankContext(0, 1, 0, ["h"], "127.0.0.1", 1, "cuda", ["0"]),
        workers_per_rank=1,
        cpu_kvcache_gib=1,
        offline=False,
    )
    assert not any(k in env for k in REPLICA_VARS)


# ---- config ------------------------------------------------------------------------------------
def test_slurm_replicas_spanning_whole_nodes_are_valid():
    validate(compose(["cluster=slurm", *LLAMA, "tp=16", "cluster.gpus_per_node=8"]))
    validate(compose(["cluster=slurm", *LLAMA, "tp=8", "pp=2", "dp=4", "cluster.gpus_per_node=8"]))


def test_slurm_replica_of_a_partial_node_is_refused():
    with pytest.raises(
        ConfigError,
        match="tp=4 x pp=3: 12 GPUs per rank is neither at most cluster.gpus_per_node=8 nor a multiple of it",
    ):
        validate(compose(["cluster=slurm", *LLAMA, "tp=4", "pp=3", "cluster.gpus_per_node=8"]))


def test_spanning_with_ranks_per_node_or_lockstep_is_refused():
    with pytest.raises(
        ConfigError,
        match="cluster.ranks_per_node=2 cannot be set when a rank spans nodes "
        "\\(tp=16 x pp=1 = 16 per rank over 2 nodes of cluster.gpus_per_node=8\\)",
    ):
        validate(compose(["cluster=slurm", *LLAMA, "tp=16", "cluster.gpus_per_node=8", "cluster.ranks_per_node=2"]))
    validate(compose(["cluster=slurm", *LLAMA, "tp=16", "cluster.gpus_per_node=8", "cluster.ranks_per_node=1"]))
    with pytest.raises(
        ConfigError,
        match="ep=true runs the ranks as one vLLM data-parallel group, which hpcinfer "
        "does not combine with replicas spanning nodes",
    ):
        validate(compose(["model=tiny_moe", "ep=true", "tp=2", "cluster.gpus_per_node=1"]))


def test_local_gpus_per_node():
    validate(compose(["tp=2", "cluster.gpus_per_node=1"]))
    validate(compose(["tp=4", "cluster.gpus_per_node=2"]))
    with pytest.raises(ConfigError, match="cluster.gpus_per_node must be >= 1 or null"):
        validate(compose(["cluster.gpus_per_node=0"]))
    with pytest.raises(ConfigError, match="neither at most cluster.gpus_per_node=3"):
        validate(compose(["tp=4", "cluster.gpus_per_node=3"]))


# ---- Slurm layout ------------------------------------------------------------------------------
def test_job_layout_of_spanning_ranks():
    j = job_layout(3, 1, nodes_per_rank=2)
    assert (j.groups, j.ranks_per_group, j.nodes_per_job, j.tasks_per_node, j.nodes_per_rank) == (1, 3, 6, 1, 2)
    assert j.tasks_per_job == 6 and j.idle_tasks(3) == 0 and j.nodes == 6


def test_job_layout_of_spanning_ranks_with_limits():
    j = job_layout(5, 1, max_nodes_per_job=4, nodes_per_rank=2)  # 2 ranks (4 nodes) per job
    assert (j.groups, j.ranks_per_group, j.nodes_per_job) == (3, 2, 4)
    assert j.idle_tasks(5) == 2  # the last job runs one rank on 2 of its 4 nodes
    assert rank_groups(list(range(5)), j) == [[0, 1], [2, 3], [4]]
    assert job_layout(4, 1, array=2, nodes_per_rank=4).nodes_per_job == 8
    assert job_layout(2, 1, nodes=4, nodes_per_rank=2).nodes_per_job == 4
    for kwargs, msg in [
        (dict(max_nodes_per_job=1), "a rank spans 2 nodes but cluster.max_nodes_per_job=1"),
        (dict(nodes=3), "cluster.nodes=3 is not a multiple of the 2 nodes each rank spans"),
        (dict(nodes=2), "cluster.nodes=2 node\\(s\\) x 1 rank per 2 nodes cannot hold the 2 rank"),
        (dict(nodes=6), "cluster.nodes=6 is more nodes than the 2 rank\\(s\\) of a job need"),
    ]:
        with pytest.raises(ValueError, match=msg):
            job_layout(2, 1, nodes_per_rank=2, **kwargs)


def test_slurm_jobs_and_places_of_spanning_ranks():
    cfg = compose(["cluster=slurm", *LLAMA, "tp=16", "dp=3", "cluster.gpus_per_node=8"])
    plan = _plan(cfg, Devices(gpus=[str(i) for i in range(8)]))
    assert plan.jobs.nodes_per_rank == 2 and plan.nodes == 6 and plan.nodes_per_rank == 2
    assert [(rp.job, rp.node, rp.devices) for rp in plan.rank_plans] == [
        (0, 0, [str(i) for i in range(8)]),
        (0, 2, [str(i) for i in range(8)]),
        (0, 4, [str(i) for i in range(8)]),
    ]
    text = format_plan(plan)
    assert "replicas   each rank spans 2 nodes of 8 GPU(s)" in text
    assert "  rank 1    job 0 nodes 2 (leader), 3 (headless), gpu 0,1,2,3,4,5,6,7 on each" in text


def test_lockstep_must_be_one_job():
    cfg = compose(
        [
            "cluster=slurm",
            "model=tiny_moe",
            "ep=true",
            "dp=16",
            "cluster.gpus_per_node=4",
            "cluster.max_nodes_per_job=2",
        ]
    )
    with pytest.raises(ConfigError, match="ep=true ranks run in lockstep as one vLLM group, so they must be one job"):
        slurm_jobs(cfg, 16)


def test_local_plan_shows_each_node_of_a_rank():
    plan = _plan(compose(["tp=2", "dp=2", "cluster.gpus_per_node=1"]), Devices(gpus=["0", "1", "2", "3"]))
    assert plan.nodes_per_rank == 2
    text = format_plan(plan)
    assert "  rank 0    node 0 leader gpu 0; node 1 headless gpu 1" in text
    assert "  rank 1    node 0 leader gpu 2; node 1 headless gpu 3" in text
    assert _plan(compose(["tp=2"]), Devices(gpus=["0", "1"])).nodes_per_rank == 1


def _plan(cfg, devices, rows=30):
    return plan_for(cfg, devices, rows)


# ---- Slurm tasks -------------------------------------------------------------------------------
def _slurm(procid, ntasks, job="300", **extra):
    return {
        "SLURM_JOB_ID": job,
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NODEID": str(procid),
        "SLURM_JOB_NODELIST": "g[1-4]",
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        **extra,
    }


def test_slurm_tasks_of_spanning_ranks():
    """2 ranks x 2 nodes: tasks 0,1 are rank 0 (leader on g1), tasks 2,3 rank 1 (leader on g3)."""
    cfg = compose(["cluster=slurm", *LLAMA, "tp=16", "dp=2", "cluster.gpus_per_node=8"])
    plan = bare_plan(2, job_layout(2, 1, nodes_per_rank=2), per_rank=16)
    hosts = ["g1", "g2", "g3", "g4"]
    addresses = {"g1": "10.0.0.1", "g2": "10.0.0.2", "g3": "10.0.0.3", "g4": "10.0.0.4"}
    seen = []
    for procid in range(4):
        task = slurm_task(_slurm(procid, 4))
        index, node_rank = task_replica(task.procid, 2)
        p = task_process(
            _slurm(procid, 4), cfg, plan, task, index, hosts, "10.0.0.1", 20008, {0}, resolve=addresses.get
        )
        env, args = p.env, replica_engine_args(p.env)
        assert (p.module, p.node_rank) == (WORKER if node_rank == 0 else HEADLESS, node_rank)
        seen.append((env["HPCINFER_RANK"], env["CUDA_VISIBLE_DEVICES"], args))
        assert env["VLLM_HOST_IP"] == addresses[hosts[procid]]  # its own node's address
        assert not any(k in env for k in VLLM_DP_VARS)
    assert [s[0] for s in seen] == ["0", "0", "1", "1"]
    assert {s[1] for s in seen} == {"0,1,2,3,4,5,6,7"}  # each node's 8 GPUs
    assert [s[2] for s in seen] == [
        {"nnodes": 2, "node_rank": 0, "master_addr": "10.0.0.1", "master_port": 20008},
        {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 20008},
        {"nnodes": 2, "node_rank": 0, "master_addr": "10.0.0.3", "master_port": 20009},
        {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.3", "master_port": 20009},
    ]


def test_slurm_cpu_nodes_span_by_workers_per_node():
    cfg = compose(["cluster=slurm_cpu", "tp=2", "dp=2", "cluster.workers_per_node=1"])
    plan = _plan(cfg, Devices(cpus=[0]))
    assert (plan.jobs.nodes_per_rank, plan.jobs.nodes_per_job, plan.jobs.tasks_per_node) == (2, 4, 1)
    assert "  rank 1    job 0 nodes 2 (leader), 3 (headless), cpu its task's on each" in format_plan(plan)
    for overrides, msg in [
        (["cluster=slurm", "cluster.workers_per_node=1"], "is for CPU nodes"),
        (["cluster=slurm_cpu", "cluster.workers_per_node=0"], "must be >= 1"),
        (
            ["cluster=slurm_cpu", "tp=4", "cluster.workers_per_node=3"],
            "neither at most cluster.workers_per_node=3 nor a multiple of it",
        ),
    ]:
        with pytest.raises(ConfigError, match=msg):
            validate(compose(overrides))
    validate(compose(["cluster=slurm_cpu", "tp=2"]))  # no workers_per_node: one node runs them all


def test_slurm_cpu_tasks_of_a_spanning_rank_take_their_own_cores():
    cfg = compose(["cluster=slurm_cpu", "tp=2", "dp=2", "cluster.workers_per_node=1"])
    plan = bare_plan(2, job_layout(2, 1, nodes_per_rank=2), kind="cpu", per_rank=2)
    cores = []
    for procid in range(4):
        env = _slurm(procid, 4)
        env.pop("CUDA_VISIBLE_DEVICES")
        out = task_process(
            env,
            cfg,
            plan,
            slurm_task(env),
            procid // 2,
            ["g1", "g2", "g3", "g4"],
            "10.0.0.1",
            20008,
            {0, 1, 2, 3},
            resolve=lambda h: "10.0.0.9",
        ).env
        cores.append((out["VLLM_CPU_OMP_THREADS_BIND"], out["VLLM_ENABLE_V1_MULTIPROCESSING"]))
    assert cores == [("0", "0"), ("1", "0"), ("2", "0"), ("3", "0")]  # one worker per node: in process


def test_slurm_replica_variables_only_for_spanning_ranks_and_the_users_host_ip_stays():
    single = compose(["cluster=slurm", "dp=2"])
    env = task_process(
        _slurm(1, 2),
        single,
        bare_plan(2, job_layout(2, 8), per_rank=1),
        slurm_task(_slurm(1, 2)),
        1,
        ["g1", "g2"],
        "10.0.0.1",
        20008,
        {0},
        resolve=lambda h: "10.0.0.9",
    ).env
    assert not any(k in env for k in (*REPLICA_VARS, "VLLM_HOST_IP"))
    spanning = compose(["cluster=slurm", *LLAMA, "tp=16", "dp=2", "cluster.gpus_per_node=8"])
    user = _slurm(1, 4, VLLM_HOST_IP="10.1.1.1")
    env = task_process(
        user,
        spanning,
        bare_plan(2, job_layout(2, 1, nodes_per_rank=2), per_rank=16),
        slurm_task(user),
        0,
        ["g1", "g2", "g3", "g4"],
        "10.0.0.1",
        20008,
        {0},
        resolve=lambda h: "10.0.0.9",
    ).env
    assert env["HPCINFER_NNODES"] == "2" and env["VLLM_HOST_IP"] == "10.1.1.1"  # the user's own setting stays


# ---- local backend: the processes of a rank ---------------------------------------------------
def _launches(overrides, devices, rank=0, base=None):
    cfg = compose(overrides)
    plan = _plan(cfg, devices)
    base = {"PATH": "/bin", "VLLM_DP_RANK": "3", **replica_env(2, 1, "10.9.9.9", 5)} if base is None else base
    return local.rank_processes(
        base, cfg, plan, rank, group=list(range(plan.ranks)), master_port=29400, replica_port=29500, host="box"
    )


def test_a_spanning_replica_is_a_leader_and_headless_processes_each_on_its_gpus():
    ls = _launches(["tp=4", "dp=2", "cluster.gpus_per_node=2"], Devices(gpus=[str(i) for i in range(8)]), rank=1)
    assert [(x.module, x.node_rank) for x in ls] == [(WORKER, 0), (HEADLESS, 1)]
    assert [x.env["CUDA_VISIBLE_DEVICES"] for x in ls] == ["4,5", "6,7"]
    for x in ls:
        assert replica_engine_args(x.env) == {
            "nnodes": 2,
            "node_rank": x.node_rank,
            "master_addr": "127.0.0.1",
            "master_port": 29500,
        }
        assert x.env["HPCINFER_RANK"] == "1" and not any(k in x.env for k in VLLM_DP_VARS)
        assert x.env["VLLM_HOST_IP"] == "127.0.0.1"


def test_a_spanning_replica_on_cpu_splits_the_cores_and_workers():
    ls = _launches(["tp=2", "cluster.gpus_per_node=1"], Devices(cpus=[0, 1]))
    assert [x.env["VLLM_CPU_OMP_THREADS_BIND"] for x in ls] == ["0", "1"]
    assert [x.env["HPCINFER_DEVICES"] for x in ls] == ["0", "1"]


def test_a_single_node_rank_is_one_worker_without_replica_or_dp_variables():
    ls = _launches(["tp=2", "dp=2"], Devices(gpus=["0", "1", "2", "3"]), rank=1)
    assert [(x.module, x.env["CUDA_VISIBLE_DEVICES"]) for x in ls] == [(WORKER, "2,3")]
    assert not any(k in ls[0].env for k in (*REPLICA_VARS, *VLLM_DP_VARS))
