"""LocalLauncher's planning side: placement notes for values this machine ignores."""

from hpcinfer.cli import compose
from hpcinfer.launch.local import LocalLauncher
from hpcinfer.planning.devices import Devices

CPUS = Devices(cpus=[0, 1, 2, 3])
GPUS = Devices(gpus=["0", "1"], cpus=[0, 1], gpu_memory_gib=80.0)


def test_values_this_machine_ignores_are_noted():
    notes = LocalLauncher(compose(["cluster.gpu_memory_gib=80"])).place(1, CPUS).notes
    assert notes == ["cluster.gpu_memory_gib=80.0 has no effect: this machine has no GPU"]
    notes = LocalLauncher(compose(["cluster.cpu_kvcache_gib=4"])).place(1, GPUS).notes
    assert notes == ["cluster.cpu_kvcache_gib=4 has no effect: the ranks run on GPUs"]
    assert LocalLauncher(compose(["cluster.gpu_memory_gib=80"])).place(1, GPUS).notes == []
    assert LocalLauncher(compose(["cluster.cpu_kvcache_gib=4"])).place(1, CPUS).notes == []
    assert LocalLauncher(compose([])).place(1, GPUS).notes == []  # the default is not the user's
