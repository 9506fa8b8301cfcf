"""What a machine offers: GPUs as cluster.gpus limits them (planning/devices.py)."""

import pytest

from hpcinfer.errors import ConfigError
from hpcinfer.planning.devices import Devices, offered


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
