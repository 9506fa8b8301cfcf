"""A headless node of a replica spanning nodes (rank/headless.py): its engine arguments, and how
it knows that the leader attempt it serves has ended (LeaderWatch: the attempt is the leader's
RankRecord.token)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from conftest import bare_plan

from hpcinfer.cli import compose
from hpcinfer.config import engine_args
from hpcinfer.launch.env import REPLICA_VARS, replica_env
from hpcinfer.rank.headless import LeaderWatch, exit_code, headless_args
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DONE, FAILED, STARTING, STOPPED, RankRecord


@pytest.fixture
def rd(tmp_path):
    rd = RunDir(tmp_path)
    rd.create()
    return rd


# ---- headless: when the leader has ended -------------------------------------------------------
def leader(rd, state, token, started_at=10.0, pid=1):
    rd.write_rank(RankRecord(0, token=token, state=state, host="h", pid=pid, started_at=started_at))


def test_leader_watch_sees_the_end_of_the_attempt_it_serves(rd):
    watch = LeaderWatch(rd, 0)
    assert watch.ended() is None  # no leader yet
    leader(rd, STARTING, "A")
    assert watch.ended() is None
    leader(rd, DONE, "A")
    assert watch.ended() == DONE and exit_code(DONE) == 0
    for state in (FAILED, STOPPED):
        leader(rd, state, "A")
        assert watch.ended() == state and exit_code(state) == 1


def test_leader_watch_ignores_an_earlier_attempts_end(rd):
    leader(rd, FAILED, "A", 10.0, pid=7)  # the attempt before a restart
    watch = LeaderWatch(rd, 0)
    assert watch.ended() is None
    leader(rd, STARTING, "B", 20.0, pid=8)
    assert watch.ended() is None
    leader(rd, FAILED, "B", 20.0, pid=8)
    assert watch.ended() == FAILED


def test_leader_watch_tells_attempts_by_their_token_alone(rd):
    leader(rd, FAILED, "A")
    watch = LeaderWatch(rd, 0)
    leader(rd, FAILED, "B")  # same host, pid and start time: another attempt all the same
    assert watch.ended() == FAILED


def test_leader_watch_waits(rd):
    watch = LeaderWatch(rd, 0)
    assert watch.wait(0.1, poll_s=0.02) is None
    threading.Timer(0.1, lambda: leader(rd, DONE, "A", 1.0)).start()
    assert watch.wait(10, poll_s=0.02) == DONE


def test_leader_watch_counts_an_old_end_when_no_new_attempt_comes(rd):
    leader(rd, FAILED, "A")  # the leader failed before this node started, and is not restarted
    watch = LeaderWatch(rd, 0, stale_s=0.2)
    assert watch.ended() is None
    assert watch.wait(10, poll_s=0.02) == FAILED


def test_headless_args_are_the_leaders_plus_the_nodes(rd):
    from hpcinfer.config import to_yaml
    from hpcinfer.rundir.files import atomic_write_json

    cfg = compose(["tp=2", "cluster.gpus_per_node=1"])
    rd.config.write_text(to_yaml(cfg))
    atomic_write_json(rd.plan, dataclasses.replace(bare_plan(1), engine_args={"model": "/models/tiny"}).to_json())
    env = {
        "HPCINFER_RANK": "0",
        "HPCINFER_WORLD_SIZE": "1",
        "HPCINFER_DEVICE_KIND": "cpu",
        **replica_env(2, 1, "127.0.0.1", 29123),
    }
    ctx, args = headless_args(str(rd.path), env)
    assert ctx.rank == 0
    assert args == {
        **engine_args(cfg, "/models/tiny"),
        "nnodes": 2,
        "node_rank": 1,
        "master_addr": "127.0.0.1",
        "master_port": 29123,
    }
    with pytest.raises(RuntimeError, match="non-leader nodes"):
        headless_args(str(rd.path), {**env, "HPCINFER_NODE_RANK": "0"})
    with pytest.raises(RuntimeError, match="non-leader nodes"):
        headless_args(str(rd.path), {k: v for k, v in env.items() if k not in REPLICA_VARS})
