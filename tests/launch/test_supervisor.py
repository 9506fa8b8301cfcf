"""The one supervisor (launch/supervisor.py) under both launchers: restarts within rank_retries and a
replica's leader/headless lifetime, through the local launcher's loop (`local.run_ranks`) and a
Slurm task's entry (`entry.run_task`). The rank processes are small fake scripts (named as such:
no vLLM) that behave like the worker and `hpcinfer.rank.headless` as far as the supervisor can
see: the leader records its attempt's state in ranks/<r>.json, the headless one waits for the real
LeaderWatch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from conftest import plan_for

from hpcinfer.cli import compose
from hpcinfer.config import to_yaml
from hpcinfer.launch import local, supervisor
from hpcinfer.launch.env import WORKER, free_port
from hpcinfer.launch.slurm import entry
from hpcinfer.planning.devices import Devices
from hpcinfer.rundir.files import atomic_write_json
from hpcinfer.rundir.paths import RunDir

FAKE_LEADER = """import json, os, sys, time
from hpcinfer.rundir.files import atomic_write_json
run, rank = sys.argv[1], int(os.environ["HPCINFER_RANK"])
open(f"{run}/starts-leader", "a").write("x")
me = {"rank": rank, "token": f"h:{os.getpid()}:{time.time()}", "host": "h", "pid": os.getpid(), "started_at": time.time()}
record = lambda state: atomic_write_json(f"{run}/ranks/{rank}.json", {**me, "state": state})
record("running")
while os.environ.get("FAKE_HEADLESS_HERE") and len(open(f"{run}/starts-leader").read()) > (
        len(open(f"{run}/starts-headless").read()) if os.path.exists(f"{run}/starts-headless") else 0):
    time.sleep(0.05)  # a real leader runs a while: its headless node (started beside it) sees this attempt start
time.sleep(0.3)
if os.environ.get("FAKE_LEADER_FAILS_ONCE") and not os.path.exists(f"{run}/failed-once"):
    open(f"{run}/failed-once", "w").close()
    record("failed")
    sys.exit(1)
if os.environ.get("FAKE_LEADER_SUPERSEDED"):  # started again elsewhere meanwhile: stops without writing
    open(f"{run}/ranks/{rank}.owner", "w").write("elsewhere:1:0.0")
    atomic_write_json(f"{run}/ranks/{rank}.json", {**me, "token": "elsewhere:1:0.0", "host": "elsewhere", "pid": 1, "state": "running"})
    sys.exit(1)
if os.environ.get("FAKE_LEADER_HANGS"):
    time.sleep(120)
record("done")
"""
FAKE_HEADLESS = """import os, sys
from hpcinfer.rank.headless import LeaderWatch, exit_code
from hpcinfer.rundir.paths import RunDir
run = sys.argv[1]
open(f"{run}/starts-headless", "a").write("x")
if os.environ.get("FAKE_HEADLESS_FAILS"):
    sys.exit(3)
sys.exit(exit_code(LeaderWatch(RunDir(run), int(os.environ["HPCINFER_RANK"])).wait(60, poll_s=0.05)))
"""


@pytest.fixture
def fake_ranks(monkeypatch):
    """Both launchers start processes through supervisor.spawn: start the fake scripts instead."""

    def spawn(rd, rank, p, new_session, server=None):  # never forked: the fakes are not vLLM
        script = FAKE_LEADER if p.module == WORKER else FAKE_HEADLESS
        return subprocess.Popen([sys.executable, "-c", script, str(rd.path)], env=p.env, start_new_session=new_session)

    monkeypatch.setattr(supervisor, "spawn", spawn)


def starts(rd: RunDir, who: str) -> int:
    path = rd.path / f"starts-{who}"
    return len(path.read_text()) if path.exists() else 0


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def rank_record(rd: RunDir) -> dict:
    return json.loads(rd.rank_file(0).read_text())


SPANNING_LOCAL = ["tp=2", "cluster.gpus_per_node=1"]


def run_local(tmp_path, monkeypatch, overrides, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAKE_HEADLESS_HERE", "1")
    cfg = compose([*SPANNING_LOCAL, *overrides])
    rd = RunDir(tmp_path / "run")
    rd.create()
    t0 = time.time()
    outcomes = local.run_ranks(rd, cfg, plan_for(cfg, Devices(cpus=[0, 1]), rows=4), [0], poll_s=0.05)
    return rd, [(o.rank, o.returncode) for o in outcomes], time.time() - t0


# ---- the local launcher ----------------------------------------------------------------------
def test_local_leader_and_headless_both_end(tmp_path, monkeypatch, fake_ranks):
    rd, outcomes, _ = run_local(tmp_path, monkeypatch, ["rank_retries=0"])
    assert outcomes == [(0, 0)]
    assert (starts(rd, "leader"), starts(rd, "headless")) == (1, 1)


def test_local_failed_headless_fails_its_leader(tmp_path, monkeypatch, fake_ranks):
    rd, outcomes, seconds = run_local(
        tmp_path, monkeypatch, ["rank_retries=0"], FAKE_LEADER_HANGS="1", FAKE_HEADLESS_FAILS="1"
    )
    assert outcomes == [(0, -9)] and seconds < 60
    record = rank_record(rd)
    assert record["state"] == "failed" and "killed by signal 9" in record["error"]


def test_local_failed_leader_restarts_with_its_headless(tmp_path, monkeypatch, fake_ranks):
    rd, outcomes, _ = run_local(tmp_path, monkeypatch, ["rank_retries=1"], FAKE_LEADER_FAILS_ONCE="1")
    assert outcomes == [(0, 0)]
    assert (starts(rd, "leader"), starts(rd, "headless")) == (2, 2)  # the replica restarted as a unit


def test_local_retries_are_a_budget(tmp_path, monkeypatch, fake_ranks):
    rd, outcomes, _ = run_local(tmp_path, monkeypatch, ["rank_retries=0"], FAKE_LEADER_FAILS_ONCE="1")
    assert outcomes == [(0, 1)] and starts(rd, "leader") == 1


# ---- a Slurm task ------------------------------------------------------------------------------
SPANNING_SLURM = ["cluster=slurm_cpu", "tp=2", "cluster.workers_per_node=1"]


def slurm_task_run(tmp_path, monkeypatch, procid, overrides, **env):
    """entry.run_task as task `procid` of a job whose one rank spans 2 nodes (both this machine)."""
    cfg = compose([*SPANNING_SLURM, *overrides])
    rd = RunDir(tmp_path / "run")
    rd.create()
    rd.config.write_text(to_yaml(cfg))
    atomic_write_json(rd.plan, plan_for(cfg, Devices(cpus=[0]), rows=4).to_json())
    slurm = {
        "SLURM_JOB_ID": "4711",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NODEID": str(procid),
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    for k, v in {**slurm, **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(entry, "master", lambda task: (["localhost", "localhost"], "127.0.0.1", free_port()))
    return rd, cfg


def test_slurm_leader_task_restarts_a_failed_rank(tmp_path, monkeypatch, fake_ranks, capsys):
    rd, _ = slurm_task_run(tmp_path, monkeypatch, 0, ["rank_retries=1"], FAKE_LEADER_FAILS_ONCE="1")
    assert entry.run_task(str(rd.path), [0]) == 0
    assert starts(rd, "leader") == 2 and "restarting it (1 of 1)" in capsys.readouterr().out


def test_slurm_task_leaves_a_rank_started_again_elsewhere_alone(tmp_path, monkeypatch, fake_ranks, capsys):
    """Its rank's process ended because a newer attempt (a requeued job on another node) owns the
    rank: the newer attempt's record stays as it is (not marked failed, its claims not ended) and
    the rank is not restarted here (that would supersede the attempt that now runs it)."""
    rd, _ = slurm_task_run(tmp_path, monkeypatch, 0, ["rank_retries=2"], FAKE_LEADER_SUPERSEDED="1")
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        entry.run_task(str(rd.path), [0])
    assert starts(rd, "leader") == 1 and "started again elsewhere (elsewhere:1:0.0)" in capsys.readouterr().out
    assert (rank_record(rd)["token"], rank_record(rd)["state"]) == ("elsewhere:1:0.0", "running")


def test_slurm_leader_task_fails_once_retries_are_spent(tmp_path, monkeypatch, fake_ranks):
    rd, _ = slurm_task_run(tmp_path, monkeypatch, 0, ["rank_retries=0"], FAKE_LEADER_FAILS_ONCE="1")
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        entry.run_task(str(rd.path), [0])


def test_slurm_headless_task_joins_its_leaders_restart_and_ends_with_it(tmp_path, monkeypatch, fake_ranks):
    rd, _ = slurm_task_run(tmp_path, monkeypatch, 1, ["rank_retries=1"])

    def leader_elsewhere():  # the leader, on the other node: fails once, then its restart finishes
        def record(token, state):
            atomic_write_json(
                rd.rank_file(0),
                {"rank": 0, "token": token, "host": "h", "pid": ord(token), "started_at": ord(token), "state": state},
            )

        wait_for(lambda: starts(rd, "headless") == 1)
        record("a", "running")
        time.sleep(0.3)
        record("a", "failed")  # the headless node leaves; its task starts it again for the restart
        wait_for(lambda: starts(rd, "headless") == 2)
        record("b", "running")
        time.sleep(0.3)
        record("b", "done")

    threading.Thread(target=leader_elsewhere, daemon=True).start()
    assert entry.run_task(str(rd.path), [0]) is None  # a headless task returns no rank
    assert starts(rd, "headless") == 2 and starts(rd, "leader") == 0


def test_slurm_headless_task_fails_when_its_leader_does(tmp_path, monkeypatch, fake_ranks):
    rd, _ = slurm_task_run(tmp_path, monkeypatch, 1, ["rank_retries=0"])

    def leader_elsewhere():
        def record(state):
            atomic_write_json(
                rd.rank_file(0), {"rank": 0, "token": "a", "host": "h", "pid": 1, "started_at": 1.0, "state": state}
            )

        record("running")
        wait_for(lambda: starts(rd, "headless") == 1)
        time.sleep(0.3)
        record("failed")

    threading.Thread(target=leader_elsewhere, daemon=True).start()
    with pytest.raises(RuntimeError, match="headless node 1 failed"):
        entry.run_task(str(rd.path), [0])
