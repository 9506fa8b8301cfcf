"""LocalLauncher's planning side: placement notes for values this machine ignores, node memory."""

from hpcinfer.cli import compose
from hpcinfer.launch.local import LocalLauncher
from hpcinfer.planning.devices import Devices

CPUS = Devices(cpus=[0, 1, 2, 3])
GPUS = Devices(gpus=["0", "1"], cpus=[0, 1], gpu_memory_gib=80.0)


def test_every_rank_shares_this_machines_memory():
    assert LocalLauncher(compose(["dp=3"])).place(3, CPUS).node_ranks == 3
    # a rank spanning "nodes" runs one process per node on this machine: each counts
    spanning = compose(["tp=2", "cluster.gpus_per_node=1", "dp=2"])
    assert LocalLauncher(spanning).place(2, CPUS).node_ranks == 4


def test_node_memory_is_this_machines():
    mem = LocalLauncher(compose([])).node_memory()
    assert (
        mem is not None and mem.gib > 0 and mem.source == "this machine's memory (MemTotal)" and mem.ranks_key == "dp"
    )


def test_values_this_machine_ignores_are_noted():
    notes = LocalLauncher(compose(["cluster.gpu_memory_gib=80"])).place(1, CPUS).notes
    assert notes == ["cluster.gpu_memory_gib=80.0 has no effect: this machine has no GPU"]
    notes = LocalLauncher(compose(["cluster.cpu_kvcache_gib=4"])).place(1, GPUS).notes
    assert notes == ["cluster.cpu_kvcache_gib=4 has no effect: the ranks run on GPUs"]
    assert LocalLauncher(compose(["cluster.gpu_memory_gib=80"])).place(1, GPUS).notes == []
    assert LocalLauncher(compose(["cluster.cpu_kvcache_gib=4"])).place(1, CPUS).notes == []
    assert LocalLauncher(compose([])).place(1, GPUS).notes == []  # the default is not the user's
