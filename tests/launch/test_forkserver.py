"""The fork server (launch/forkserver.py): which environments it may fork (pure), and a real server
(preloading a small module, not vLLM) forking small scripts: exit codes as subprocess gives them,
each child's own log, environment and session, a fresh start where the environment differs in
what an import reads, and a server that died."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from hpcinfer.launch.forkserver import ForkServer, driver_initialized, driver_path, forkable

BASE = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HPCINFER_RANK": "0"}


@pytest.mark.parametrize(
    "change, ok",
    [
        ({}, True),
        ({"HPCINFER_RANK": "3", "HPCINFER_NODE_RANK": "1"}, True),  # who the rank is: read at its start
        ({"VLLM_CPU_OMP_THREADS_BIND": "1", "VLLM_DP_RANK": "1", "VLLM_HOST_IP": "10.0.0.2"}, True),
        ({"OMP_NUM_THREADS": "2"}, False),  # OpenMP reads it when torch loads it: in the server
        ({"HF_HUB_OFFLINE": None}, False),  # huggingface_hub reads it at import
        ({"CUDA_VISIBLE_DEVICES": "1"}, True),  # read when CUDA starts: never in the server
        ({"SOME_USER_VARIABLE": "x"}, False),
    ],
)
def test_a_fork_differs_from_its_server_in_per_process_variables_alone(change, ok):
    env = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    assert forkable(BASE, env) is ok


MAPS = """7f1c2a000000-7f1c2a200000 r-xp 00000000 fd:01 1234 /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.1
7f1c2b000000-7f1c2b100000 r-xp 00000000 fd:01 1235 /opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12
7f1c2c000000-7f1c2c100000 r--p 00000000 00:00 0 [heap]
"""


def test_the_cuda_driver_is_told_apart_from_nvml_and_the_runtime():
    assert driver_path(MAPS) is None  # NVML (vLLM's platform check) and cudart loaded: not the driver
    driver = "7f1c2d000000-7f1c2d100000 r-xp 00000000 fd:01 9 /usr/lib64/libcuda.so.580.159.04\n"
    assert driver_path(MAPS + driver) == "/usr/lib64/libcuda.so.580.159.04"
    assert driver_path("") is None


def test_without_the_driver_loaded_cuda_is_not_initialized():
    with open("/proc/self/maps") as f:
        maps = f.read()
    if driver_path(maps) is not None:
        pytest.skip("this test process loaded the CUDA driver")
    assert not driver_initialized(maps)


SCRIPT = """import os, sys, time
print("argv", sys.argv[1:], "pgid==pid", os.getpgid(0) == os.getpid(), "x", os.environ.get("HPCINFER_RANK"), flush=True)
print("preloaded", "colorsys" in sys.modules, "name", __name__, flush=True)
mode = os.environ.get("HPCINFER_TEST_MODE")
if mode == "sleep":
    time.sleep(60)
if mode == "raise":
    raise ValueError("boom")
sys.exit(int(os.environ.get("HPCINFER_TEST_CODE", "0")))
"""


@pytest.fixture
def server(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "forkee.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'pkg'}:{os.environ.get('PYTHONPATH', '')}"}
    with ForkServer(tmp_path / "forkserver.log", preload=("colorsys",)) as s:
        yield s, env, tmp_path


def test_children_run_their_module_with_their_own_env_log_and_session(server):
    s, env, d = server
    procs = [s.spawn("forkee", ["a", str(i)], {**env, "HPCINFER_RANK": str(i)}, d / f"{i}.log", True) for i in range(2)]
    assert all(p is not None for p in procs)
    assert [p.wait(timeout=30) for p in procs] == [0, 0]
    for i in range(2):
        log = (d / f"{i}.log").read_text()
        assert f"argv ['a', '{i}'] pgid==pid True x {i}" in log
        assert "preloaded True name __main__" in log  # imported once, in the server
    assert len({p.pid for p in procs}) == 2 and os.getpid() not in {p.pid for p in procs}
    server = (d / "forkserver.log").read_text()
    assert "imported colorsys" in server and server.count("forked forkee") == 2


def test_a_preloaded_module_runs_as_main_without_runpy_warning_of_a_second_copy(tmp_path):
    (tmp_path / "pkg").mkdir()  # as hpcinfer.rank.worker: a module in a package, preloaded
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "main.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print('ran', sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}", "PYTHONWARNINGS": "default"}
    with ForkServer(tmp_path / "forkserver.log", preload=("pkg.main",)) as s:
        assert s.spawn("pkg.main", ["x"], env, tmp_path / "0.log", True).wait(timeout=30) == 0
    assert (tmp_path / "0.log").read_text() == "ran ['x']\n"  # no RuntimeWarning from runpy


def test_exit_codes_are_as_subprocess_gives_them(server):
    s, env, d = server
    failed = s.spawn("forkee", [], {**env, "HPCINFER_TEST_CODE": "3"}, d / "3.log", True)
    raised = s.spawn("forkee", [], {**env, "HPCINFER_TEST_MODE": "raise"}, d / "raise.log", True)
    killed = s.spawn("forkee", [], {**env, "HPCINFER_TEST_MODE": "sleep"}, d / "kill.log", True)
    assert failed.wait(timeout=30) == 3
    assert raised.wait(timeout=30) == 1 and "ValueError: boom" in (d / "raise.log").read_text()
    assert killed.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        killed.wait(timeout=0.3)
    os.killpg(killed.pid, signal.SIGKILL)  # its own process group, as the local launcher stops ranks
    assert killed.wait(timeout=30) == -signal.SIGKILL


def test_an_env_the_server_cannot_stand_for_is_not_forked(server):
    s, env, d = server
    assert s.spawn("forkee", [], env, d / "0.log", True).wait(timeout=30) == 0
    assert s.spawn("forkee", [], {**env, "OMP_NUM_THREADS": "7"}, d / "1.log", True) is None  # start it fresh
    assert not (d / "1.log").exists()


def test_children_outlive_a_dead_server_and_its_end_is_seen(server):
    s, env, d = server
    child = s.spawn("forkee", [], {**env, "HPCINFER_TEST_MODE": "sleep"}, d / "0.log", True)
    s.proc.kill()  # the server is gone: its exits cannot be reported any more
    s.proc.wait()
    time.sleep(0.5)
    assert child.poll() is None  # the rank runs on
    assert s.spawn("forkee", [], env, d / "1.log", True) is None  # new processes start fresh
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == 255  # ended, exit unknown (its parent, the server, is gone)


def test_the_server_leaves_when_its_launcher_closes_it(server):
    s, env, d = server
    child = s.spawn("forkee", [], {**env, "HPCINFER_TEST_MODE": "sleep"}, d / "0.log", True)
    s.close()
    assert s.proc.returncode == 0
    time.sleep(0.5)
    assert child.poll() is None  # the rank is not the server's to stop
    os.kill(child.pid, signal.SIGKILL)


def test_the_server_outlives_the_signals_meant_for_the_ranks_and_its_children_do_not_inherit_that(server):
    s, env, d = server
    child = s.spawn("forkee", [], {**env, "HPCINFER_TEST_MODE": "sleep"}, d / "0.log", False)
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):  # Slurm's, a terminal's
        os.kill(s.proc.pid, sig)
    time.sleep(0.3)
    assert s.proc.poll() is None
    os.kill(child.pid, signal.SIGUSR2)  # a rank gets the default disposition (or its own handler)
    assert child.wait(timeout=30) == -signal.SIGUSR2
    assert s.spawn("forkee", [], env, d / "1.log", False).wait(timeout=30) == 0


def test_what_an_import_prints_goes_to_the_server_log_not_into_its_messages(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "forkee.py").write_text(SCRIPT)
    (tmp_path / "pkg" / "noisy.py").write_text('import sys\nprint("noise at import")\nsys.stdout.flush()\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'pkg'}:{os.environ.get('PYTHONPATH', '')}"}
    with ForkServer(tmp_path / "forkserver.log", preload=("noisy",)) as s:
        child = s.spawn("forkee", [], env, tmp_path / "0.log", True)
        assert child is not None and child.wait(timeout=30) == 0
    assert "noise at import" in (tmp_path / "forkserver.log").read_text()
    assert "noise" not in (tmp_path / "0.log").read_text()
