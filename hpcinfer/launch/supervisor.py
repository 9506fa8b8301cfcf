"""Supervising a rank's processes on one machine, for both launchers.

A rank is one process, or, for a replica spanning nodes, a leader (`hpcinfer.rank.worker`, node 0)
and headless processes (`hpcinfer.rank.headless`, nodes 1..k-1). The local launcher runs all of a
rank's processes here; a Slurm task runs the one process its node holds of its rank. Either way a
`RankSupervisor` keeps the same rules:

- **restarts**: a leader that failed (not one stopped by a signal: then its launcher is going down
  too) is started again, with its headless processes, up to `rank_retries` times; it continues
  from its durable parts;
- **leader lifetime**: a replica lives as a unit. When the leader ends, its headless processes
  end too (they watch its record and leave by themselves, else they are stopped); when a headless
  process fails while its leader runs, the leader is killed (and so restarted like any failed
  rank). A supervisor that holds only headless processes (a Slurm task on a replica's other node)
  starts them again each time the leader is restarted after a failure.
- **superseded**: a leader that ended while a newer attempt of its rank, started by another
  launcher, owns the rank (a requeued job runs it elsewhere, this node was cut off) is neither
  recorded nor restarted here: its record and claims are the newer attempt's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional, Set

from hpcinfer.launch.env import Process
from hpcinfer.launch.forkserver import ForkServer
from hpcinfer.rank.headless import LeaderWatch
from hpcinfer.rank.worker import should_restart, superseded_by
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import FAILED

HEADLESS_GRACE_S = 15.0  # a headless process leaves within ~2 s of its leader's end; then it is stopped
STOP_GRACE_S = 30.0  # as Slurm's KillWait: time for a rank to write its finished rows to a slow shared filesystem


def spawn(rd: RunDir, rank: int, p: Process, new_session: bool, server: Optional[ForkServer] = None):
    """Start `python -m <module> <run_dir>` for a process of `rank`, logging to its log file: a
    fork of `server` when given and it can fork this process (forkserver.py), else a new process.
    `new_session`: its own process group (the local launcher stops groups); a Slurm task's
    processes stay in the step's, so that Slurm's signals reach them."""
    log = rd.node_log(rank, p.node_rank)
    forked = server.spawn(p.module, [str(rd.path)], p.env, log, new_session) if server is not None else None
    if forked is not None:
        return forked
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", p.module, str(rd.path)],
            env=p.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


class RankSupervisor:
    """The processes of one rank on this machine (see the module docstring). `processes()` gives
    them anew for each start (ports may change); `poll()` advances the rules and returns the
    rank's exit code once it has ended for good."""

    def __init__(
        self,
        rd: RunDir,
        rank: int,
        processes: Callable[[], List[Process]],
        retries: int,
        start: Callable[[RunDir, int, Process], subprocess.Popen],
        say: Callable[[str], None] = print,
    ):
        self.rd, self.rank, self.processes, self.retries, self.retries_left = rd, rank, processes, retries, retries
        self._start, self.say = start, say
        self.leader: Optional[subprocess.Popen] = None
        self.headless: List[subprocess.Popen] = []
        self.watch: Optional[LeaderWatch] = None
        self.pids: Set[int] = set()  # the leaders started here: a newer attempt of the rank is none of them
        self.started_at = 0.0  # when the latest start here began (time.time())

    def start(self) -> RankSupervisor:
        self.started_at = time.time()
        todo = self.processes()
        leader_here = any(p.node_rank == 0 for p in todo)
        self.watch = None if leader_here else LeaderWatch(self.rd, self.rank)  # before the headless one starts
        started = [(p, self._start(self.rd, self.rank, p)) for p in todo]
        self.leader = next((proc for p, proc in started if p.node_rank == 0), None)
        if self.leader is not None:
            self.pids.add(self.leader.pid)
        self.headless = [proc for p, proc in started if p.node_rank != 0]
        return self

    @property
    def running(self) -> List[subprocess.Popen]:
        return [p for p in ([self.leader] if self.leader else []) + self.headless if p.poll() is None]

    def poll(self) -> Optional[int]:
        """None while the rank goes on (restarting it when the rules say so); its exit code once ended."""
        return self._poll_leader() if self.leader is not None else self._poll_headless()

    def _poll_leader(self) -> Optional[int]:
        code = self.leader.poll()
        if code is None:
            if any(h.poll() not in (None, 0) for h in self.headless):  # the replica cannot go on: fail it
                self.say(f"a headless process of rank {self.rank} failed; stopping its leader")
                signal_process(self.leader, signal.SIGKILL)
            return None
        reap(self.headless)
        other = superseded_by(self.rd, self.rank, self.pids)
        if other is not None:
            self.say(f"rank {self.rank} was started again elsewhere ({other}): not recorded nor restarted here")
            return code
        if should_restart(self.rd, self.rank, code, self.retries_left):
            self.retries_left -= 1
            self.say(
                f"rank {self.rank} failed (exit {code}); restarting it "
                f"({self.retries - self.retries_left} of {self.retries})"
            )
            self.start()
            return None
        return code

    def _poll_headless(self) -> Optional[int]:
        """Only headless processes here (a Slurm task on a replica's other node)."""
        if any(h.poll() is None for h in self.headless):
            return None
        codes = [h.returncode for h in self.headless]
        outcome = self.watch.ended() if self.watch else None
        if outcome == FAILED and self.retries_left > 0:
            self.retries_left -= 1
            self.say(f"rank {self.rank}: its leader failed; headless node(s) join its restart")
            self.start()
            return None
        return 1 if outcome == FAILED or (any(codes) and outcome is None) else 0

    def wait(self, poll_s: float = 0.5) -> int:
        """Poll until the rank has ended for good; its exit code."""
        while True:
            code = self.poll()
            if code is not None:
                return code
            time.sleep(poll_s)

    def stop(self) -> None:
        stop(self.running)


def reap(procs: List[subprocess.Popen], grace_s: float = HEADLESS_GRACE_S) -> None:
    """Let a replica's headless processes leave on their own (its leader has ended), then stop them."""
    deadline = time.time() + grace_s
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    stop(procs)


def stop(procs: List[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """Terminate processes (their process groups where they lead one: the engine's children too),
    then kill stragglers."""
    for p in procs:
        if p.poll() is None:
            signal_process(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            signal_process(p, signal.SIGKILL)
            p.wait()


def signal_process(p: subprocess.Popen, sig: int) -> None:
    """Signal `p`'s process group when it leads one, else `p` alone."""
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
    except ProcessLookupError:
        pass
