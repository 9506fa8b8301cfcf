"""What a Slurm partition offers against what a run's jobs ask (launch/slurm/partition.py, pure),
and SlurmLauncher.check / node_memory around it (the sinfo command replaced)."""

from __future__ import annotations

import subprocess

import pytest

from hpcinfer.cli import compose
from hpcinfer.errors import UserError
from hpcinfer.launch.slurm import launcher as slurm_launcher
from hpcinfer.launch.slurm.launcher import SlurmLauncher
from hpcinfer.launch.slurm.layout import slurm_jobs
from hpcinfer.launch.slurm.partition import (
    NodeNeeds,
    SlurmNode,
    check_partition,
    gres_gpus,
    largest_memory_mb,
    mem_mb,
    parse_sinfo_nodes,
    partition_errors,
    partition_nodes,
)

# `sinfo -a -N -h -o '%N|%P|%c|%m|%G'` on the test cluster of slurm/cluster.sh (Slurm 22.05.8,
# 4 CPU nodes of 2 CPUs and RealMemory=4096), captured as is.
TEST_CLUSTER = """\
n1|debug*|2|4096|(null)
n2|debug*|2|4096|(null)
n3|debug*|2|4096|(null)
n4|debug*|2|4096|(null)
"""

# Hand-written, in sinfo's formats: GPU nodes in two partitions (a node listed once per partition),
# GRES with types and socket bindings, a MIG node, and CPU nodes without RealMemory (Slurm's 1).
GPU_CLUSTER = """\
g1|gpu*|64|515000|gpu:h100:8(S:0-1)
g2|gpu*|64|515000|gpu:h100:8(S:0-1)
g1|long|64|515000|gpu:h100:8(S:0-1)
s1|small|32|256000|gpu:a100:2(S:0),gpu:a100:2(S:1),nvme:1
m1|mig|64|500000|gpu:1g.10gb:7,gpu:2g.20gb:2
c1|cpu|128|1|(null)
c2|cpu|128|1|(null)
"""


# ---- parsing ------------------------------------------------------------------------------------
def test_parse_the_test_clusters_sinfo():
    nodes = parse_sinfo_nodes(TEST_CLUSTER)
    assert [n.name for n in nodes] == ["n1", "n2", "n3", "n4"]
    assert nodes[0] == SlurmNode("n1", "debug", True, 2, 4096, 0)


def test_parse_gpu_nodes_and_partitions():
    nodes = parse_sinfo_nodes(GPU_CLUSTER + "garbage line\n\n")
    assert len(nodes) == 7
    assert {(n.name, n.partition, n.default) for n in nodes if n.name == "g1"} == {
        ("g1", "gpu", True),
        ("g1", "long", False),
    }
    assert {n.name: n.gpus for n in nodes} == {"g1": 8, "g2": 8, "s1": 4, "m1": 9, "c1": 0, "c2": 0}


@pytest.mark.parametrize(
    "gres, gpus",
    [
        ("(null)", 0),
        ("", 0),
        ("gpu:8", 8),
        ("gpu:h100:8(S:0-1)", 8),
        ("gpu:a100:4(S:0,1),nvme:1", 4),
        ("gpu:a100:2(S:0),gpu:v100:2(S:1)", 4),
        ("nvme:1,gpu:tesla", 1),
        ("mps:400,shard:8", 0),
    ],
)
def test_gres_gpus(gres, gpus):
    assert gres_gpus(gres) == gpus


@pytest.mark.parametrize(
    "value, mb",
    [("200G", 204800), ("64000", 64000), ("512M", 512), ("1T", 1048576), ("2048K", 2), ("4gb", 4096), ("0", None)],
)
def test_mem_mb(value, mb):
    assert mem_mb(value) == mb


def test_mem_mb_unparsable_or_unset_is_none():
    assert mem_mb(None) is None and mem_mb("lots") is None


# ---- which partition ----------------------------------------------------------------------------
def test_the_default_partition_is_resolved():
    assert partition_nodes(parse_sinfo_nodes(TEST_CLUSTER), None)[0] == "debug"
    name, nodes = partition_nodes(parse_sinfo_nodes(GPU_CLUSTER), None)
    assert name == "gpu" and [n.name for n in nodes] == ["g1", "g2"]
    assert [n.name for n in partition_nodes(parse_sinfo_nodes(GPU_CLUSTER), "long")[1]] == ["g1"]


def test_a_missing_partition_is_named():
    with pytest.raises(UserError, match="cluster.partition='nosuch' does not exist"):
        partition_nodes(parse_sinfo_nodes(TEST_CLUSTER), "nosuch")


def test_no_default_partition():
    with pytest.raises(UserError, match=r"no default partition; set cluster.partition to one of \['cpu', 'mig'\]"):
        partition_nodes(parse_sinfo_nodes("c1|cpu|8|100|(null)\nm1|mig|8|100|gpu:2\n"), None)


# ---- what the nodes offer -----------------------------------------------------------------------
def nodes_of(text, partition):
    return partition_nodes(parse_sinfo_nodes(text), partition)[1]


def test_gpus_per_node_on_cpu_nodes():
    errs = partition_errors("debug", nodes_of(TEST_CLUSTER, "debug"), NodeNeeds(1, gpus_per_node=8))
    assert errs == [
        "cluster.gpus_per_node=8, but the nodes of partition 'debug' have no GPUs (no GRES gpu); "
        "for CPU nodes use cluster=slurm_cpu"
    ]


def test_more_gpus_per_node_than_the_nodes_have():
    errs = partition_errors("small", nodes_of(GPU_CLUSTER, "small"), NodeNeeds(1, gpus_per_node=8))
    assert errs == [
        "cluster.gpus_per_node=8, but the nodes of partition 'small' have at most 4 GPU(s) (GRES gpu:4); "
        "set cluster.gpus_per_node=4"
    ]
    assert partition_errors("gpu", nodes_of(GPU_CLUSTER, "gpu"), NodeNeeds(2, gpus_per_node=8)) == []


def test_cpus_and_memory_per_node():
    nodes = nodes_of(TEST_CLUSTER, "debug")
    needs = NodeNeeds(1, cpus_per_node=4, mem_mb=8192, cpus_key="2 task(s) x c=2", mem_key="cluster.mem=8G")
    assert partition_errors("debug", nodes, needs) == [
        "2 task(s) x c=2 asks for 4 CPUs per node, but the nodes of partition 'debug' have at most 2",
        "cluster.mem=8G asks for 8192 MB per node, but the nodes of partition 'debug' have at most 4096 MB",
    ]
    assert partition_errors("debug", nodes, NodeNeeds(4, cpus_per_node=2, mem_mb=4096)) == []


def test_memory_is_not_checked_where_slurm_does_not_know_it():
    nodes = nodes_of(GPU_CLUSTER, "cpu")  # RealMemory=1: not configured
    assert partition_errors("cpu", nodes, NodeNeeds(2, mem_mb=10**6)) == []
    assert largest_memory_mb(nodes) is None
    assert largest_memory_mb(nodes_of(TEST_CLUSTER, "debug")) == 4096


def test_a_job_needs_enough_such_nodes():
    errs = partition_errors("debug", nodes_of(TEST_CLUSTER, "debug"), NodeNeeds(5, cpus_per_node=1))
    assert errs == [
        "a job needs 5 node(s) with 1 CPU(s), but partition 'debug' has 4; use fewer nodes per job "
        "(cluster.array, cluster.max_nodes_per_job) or another partition"
    ]
    # nodes of different sizes: only those that offer everything count
    mixed = parse_sinfo_nodes("a|p*|8|100|gpu:4\nb|p*|8|100|gpu:8\nc|p*|8|100|gpu:8\n")
    assert partition_errors("p", mixed, NodeNeeds(2, gpus_per_node=8)) == []
    assert "has 2" in partition_errors("p", mixed, NodeNeeds(3, gpus_per_node=8))[0]


# ---- a run's jobs against the partition ---------------------------------------------------------
def check(overrides, text=TEST_CLUSTER, ranks=None):
    cfg = compose(overrides)
    check_partition(cfg, slurm_jobs(cfg, ranks or cfg.dp), parse_sinfo_nodes(text))


@pytest.mark.parametrize(
    "overrides",
    [
        ["cluster=slurm_cpu", "dp=4"],
        ["cluster=slurm_cpu", "dp=2", "cluster.partition=null"],
        ["cluster=slurm_cpu", "tp=2", "cluster.workers_per_node=1"],
        ["cluster=slurm_cpu", "dp=4", "cluster.array=2", "cluster.array_parallelism=2"],
        ["cluster=slurm_cpu", "dp=3", "cluster.array=3", "cluster.max_array_size=2"],
        ["cluster=slurm_cpu", "dp=2", "cluster.mem=4G", "cluster.cpus_per_task=2"],
    ],
)
def test_what_the_test_suite_submits_to_the_test_cluster_passes(overrides):
    check(overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster=slurm"], "cluster.gpus_per_node=8, but the nodes of partition 'debug' have no GPUs"),
        (["cluster=slurm", "cluster.partition=debug", "dp=2"], "for CPU nodes use cluster=slurm_cpu"),
        (["cluster=slurm_cpu", "dp=5"], "a job needs 5 node(s) with 1 CPU(s), but partition 'debug' has 4"),
        (
            ["cluster=slurm_cpu", "dp=4", "cluster.ranks_per_node=2", "cluster.cpus_per_task=2"],
            "2 task(s) per node x cluster.cpus_per_task=2 asks for 4 CPUs per node",
        ),
        (["cluster=slurm_cpu", "cluster.mem=5G"], "cluster.mem=5G asks for 5120 MB per node"),
        (["cluster=slurm_cpu", "cluster.finalize_mem=5G"], "cluster.finalize_mem=5G asks for 5120 MB"),
        (["cluster=slurm_cpu", "cluster.finalize_cpus=3"], "cluster.finalize_cpus=3 asks for 3 CPUs per node"),
        (["cluster=slurm_cpu", "cluster.partition=gpu"], "cluster.partition='gpu' does not exist"),
    ],
)
def test_what_the_test_cluster_cannot_run_is_refused(overrides, message):
    with pytest.raises(UserError) as e:
        check(overrides)
    assert message in str(e.value)


def test_gpu_partitions():
    check(["cluster=slurm", "dp=16"], GPU_CLUSTER)  # 2 nodes of 8 H100 in the default partition
    with pytest.raises(UserError, match="a job needs 3 node"):
        check(["cluster=slurm", "dp=24"], GPU_CLUSTER)
    check(["cluster=slurm", "dp=24", "cluster.array=3"], GPU_CLUSTER)  # 3 jobs of 1 node
    with pytest.raises(UserError, match="set cluster.gpus_per_node=4"):
        check(["cluster=slurm", "cluster.partition=small"], GPU_CLUSTER)
    check(["cluster=slurm", "cluster.partition=small", "cluster.gpus_per_node=4", "dp=4"], GPU_CLUSTER)


# ---- SlurmLauncher: sinfo at the edge -----------------------------------------------------------
@pytest.fixture
def sinfo(monkeypatch):
    """SlurmLauncher's Slurm commands answered from `calls` (sinfo: the test cluster) and recorded."""
    calls = []

    def run(args):
        calls.append(args[0])
        if args[0] == "sinfo":
            return subprocess.CompletedProcess(args, 0, TEST_CLUSTER, "")
        return subprocess.CompletedProcess(args, 1, "", "not here")

    monkeypatch.setattr(slurm_launcher, "_run", run)
    monkeypatch.setattr(slurm_launcher.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm_launcher, "check_cluster", lambda cfg: calls.append("ping"))
    return calls


def plan_of(cfg):
    from conftest import bare_plan

    return bare_plan(cfg.dp, jobs=slurm_jobs(cfg, cfg.dp))


def test_check_refuses_gpu_nodes_on_the_test_cluster(sinfo):
    cfg = compose(["cluster=slurm"])
    with pytest.raises(UserError, match="have no GPUs"):
        SlurmLauncher(cfg).check(plan_of(cfg))
    assert sinfo == ["ping", "sinfo"]


def test_check_passes_and_asks_sinfo_once(sinfo):
    cfg = compose(["cluster=slurm_cpu", "dp=4"])
    launcher = SlurmLauncher(cfg)
    assert launcher.node_memory().gib == 4.0
    launcher.check(plan_of(cfg))
    assert sinfo == ["sinfo", "ping"]


def test_node_memory(sinfo):
    mem = SlurmLauncher(compose(["cluster=slurm_cpu"])).node_memory()
    assert (mem.gib, mem.source, mem.ranks_key) == (
        4.0,
        "a node of partition 'debug' (RealMemory)",
        "cluster.ranks_per_node",
    )
    given = SlurmLauncher(compose(["cluster=slurm_cpu", "cluster.mem=3G"])).node_memory()
    assert (given.gib, given.source) == (3.0, "a node (cluster.mem=3G)")
    assert SlurmLauncher(compose(["cluster=slurm_cpu", "cluster.partition=nosuch"])).node_memory() is None
    assert sinfo == ["sinfo", "sinfo"]  # cluster.mem: sinfo not asked


def test_without_sinfo_nothing_is_known_and_a_missing_partition_still_refused(monkeypatch, capsys):
    monkeypatch.setattr(slurm_launcher.shutil, "which", lambda name: None if name == "sinfo" else "/usr/bin/x")
    monkeypatch.setattr(slurm_launcher, "check_cluster", lambda cfg: None)
    monkeypatch.setattr(slurm_launcher, "_run", lambda args: subprocess.CompletedProcess(args, 1, "", "no"))
    cfg = compose(["cluster=slurm_cpu"])
    assert SlurmLauncher(cfg).node_memory() is None
    with pytest.raises(UserError, match="cluster.partition='debug' does not exist"):
        SlurmLauncher(cfg).check(plan_of(cfg))
    monkeypatch.setattr(slurm_launcher, "_run", lambda args: subprocess.CompletedProcess(args, 0, "", ""))
    SlurmLauncher(cfg).check(plan_of(cfg))
    assert "not checked" in capsys.readouterr().err
