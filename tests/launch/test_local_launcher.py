"""LocalLauncher's planning side: placement notes for values this machine ignores, node memory."""

import os
import tempfile

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


def prestarted(monkeypatch, tmp_path, devices, overrides=()):
    """A LocalLauncher prestarted on `devices` (its fork server preloading a small module)."""
    monkeypatch.setattr("hpcinfer.launch.local.detect", lambda gpus=None: devices)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # whether a rank is offline is the launcher's to say
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(LocalLauncher, "preload", ("colorsys",))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the server's temp log, until the run directory exists
    launcher = LocalLauncher(compose(list(overrides)))
    launcher.prestart()
    return launcher


def test_on_gpus_the_fork_server_starts_before_planning_with_the_ranks_environment(monkeypatch, tmp_path):
    (tmp_path / "forkee.py").write_text(
        "import os, sys; print('gpus', os.environ['CUDA_VISIBLE_DEVICES'], 'colorsys' in sys.modules)\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    launcher = prestarted(monkeypatch, tmp_path, GPUS)
    server = launcher.server
    assert server is not None and server.proc is not None  # started: importing while planning goes on
    # every offered GPU visible to its imports; offline, as the ranks of a built-in model are
    assert server.env["CUDA_VISIBLE_DEVICES"] == "0,1" and server.env["HF_HUB_OFFLINE"] == "1"
    temp = server.log
    assert temp is not None and temp.parent == tmp_path
    # a rank's environment differs in its devices and identity alone: it is forked, seeing its own GPU
    rank_env = {**server.env, "CUDA_VISIBLE_DEVICES": "1", "HPCINFER_RANK": "1"}
    p = server.spawn("forkee", [], rank_env, tmp_path / "rank-1.log", True)
    assert p is not None and p.wait(timeout=30) == 0
    assert (tmp_path / "rank-1.log").read_text() == "gpus 1 True\n"
    run_log = tmp_path / "run" / "forkserver.log"
    run_log.parent.mkdir()
    server.log_to(run_log)  # the run directory exists now
    launcher.close()
    assert "imported colorsys" in run_log.read_text() and "forked forkee" in run_log.read_text()
    assert not temp.exists()


def test_no_prestart_on_cpu_cores_and_a_refused_config_leaves_no_server_log(monkeypatch, tmp_path):
    assert prestarted(monkeypatch, tmp_path, CPUS).server is None  # the ranks' threads depend on the plan
    launcher = prestarted(monkeypatch, tmp_path, GPUS, ["model=llama", "model.path=org/hub-model"])
    assert launcher.server is not None and "HF_HUB_OFFLINE" not in launcher.server.env  # a hub id: online
    temp = launcher.server.log
    launcher.close()  # planning refused the run: no run directory, no log left behind
    assert temp is not None and not temp.exists()
