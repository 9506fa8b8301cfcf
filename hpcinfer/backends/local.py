"""The local backend: every rank is a `python -m hpcinfer.worker` process on this machine, with
the same rank/world/master contract a Slurm task gets (see ranks.rank_env), each on its own
devices. Ranks log to logs/rank-<r>.log; a failed rank does not stop the others."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List

from ..config import RunConfig
from ..errors import exit_on_signal
from ..planner import Plan
from ..progress import ProgressDisplay, snapshot
from ..ranks import free_port, rank_env
from ..rundir import RunDir
from ..worker import record_exit


@dataclass
class RankOutcome:
    rank: int
    returncode: int
    log: str


def launch_env(cfg: RunConfig, plan: Plan, rank: int, master_port: int) -> dict:
    return rank_env(
        os.environ, rank=rank, world_size=plan.ranks, local_rank=rank, hosts=[socket.gethostname()],
        master_addr="127.0.0.1", master_port=master_port, device_kind=plan.device_kind,
        devices=plan.rank_plans[rank].devices, workers_per_rank=plan.gpus_per_rank,
        cpu_kvcache_gib=cfg.cluster.cpu_kvcache_gib, offline=os.path.isdir(plan.engine_args["model"]))


def run_ranks(rd: RunDir, cfg: RunConfig, plan: Plan, poll_s: float = 0.5) -> List[RankOutcome]:
    """Start every rank, show progress until all have exited, return their exit codes."""
    port = free_port()
    procs = []
    for rp in plan.rank_plans:
        with open(rd.rank_log(rp.rank), "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "hpcinfer.worker", str(rd.path)],
                                          env=launch_env(cfg, plan, rp.rank, port), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    display = ProgressDisplay(plan.rows)
    previous = {sig: signal.signal(sig, exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while any(p.poll() is None for p in procs):
            display.update(snapshot(rd, plan.rows))
            time.sleep(poll_s)
    except BaseException:  # Ctrl-C, SIGTERM/SIGHUP (scancel, a closed terminal): take the ranks down too
        _stop(procs)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        display.update(snapshot(rd, plan.rows), final=True)
    for r, p in enumerate(procs):
        record_exit(rd, r, p.returncode)
    return [RankOutcome(r, p.returncode, str(rd.rank_log(r))) for r, p in enumerate(procs)]


def _stop(procs: List[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Terminate every rank's process group (the engine's children too), then kill stragglers."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
