"""What a machine offers: GPUs as cluster.gpus limits them, and its memory (planning/devices.py)."""

import pytest

from hpcinfer.errors import ConfigError
from hpcinfer.planning.devices import Devices, machine_memory, meminfo_total_gib, offered

# /proc/meminfo of this 24 GiB CPU machine (the first lines, as captured)
MEMINFO = """\
MemTotal:       24731184 kB
MemFree:         9874124 kB
MemAvailable:   24149528 kB
Buffers:          182716 kB
"""


def test_offered_limits_the_gpus():
    d = Devices(gpus=["0", "1", "2", "3"], cpus=[0, 1])
    assert offered(d, None) == d
    assert offered(d, 2).gpus == ["0", "1"] and offered(d, 2).cpus == [0, 1]
    assert offered(d, 0).gpus == []  # cluster.gpus=0: ranks on CPU cores
    assert offered(Devices(cpus=[0]), 0).gpus == []


def test_more_gpus_than_visible_are_refused():
    """cluster.gpus=4 on a machine without GPUs used to run on the CPU without a word."""
    with pytest.raises(ConfigError, match=r"cluster.gpus=4, but this machine has no GPU visible .*cluster.gpus=0"):
        offered(Devices(cpus=[0, 1]), 4)
    with pytest.raises(ConfigError, match=r"cluster.gpus=8, but this machine has 2 GPU\(s\) visible .*cluster.gpus=2"):
        offered(Devices(gpus=["0", "1"]), 8)


def test_meminfo_total():
    assert meminfo_total_gib(MEMINFO) == pytest.approx(24731184 / 1024**2)
    assert meminfo_total_gib("MemFree: 1 kB\n") is None


def test_machine_memory(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text(MEMINFO)
    mem = machine_memory(str(p))
    assert mem.gib == pytest.approx(23.59, abs=0.01)
    assert mem.source == "this machine's memory (MemTotal)" and mem.ranks_key == "dp"
    assert machine_memory(str(tmp_path / "absent")) is None
