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
from typing import Dict, List

from ..config import RunConfig
from ..errors import exit_on_signal
from ..planner import Plan
from ..progress import ProgressDisplay, snapshot
from ..ranks import free_port, rank_env
from ..rundir import RunDir
from ..worker import should_restart


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


def run_ranks(rd: RunDir, cfg: RunConfig, plan: Plan, ranks: List[int], poll_s: float = 0.5) -> List[RankOutcome]:
    """Start `ranks`, show progress until all have ended, restarting a failed rank up to
    cfg.rank_retries times (it continues from its durable parts); return their exit codes."""
    port = free_port()

    def start(rank: int) -> subprocess.Popen:
        with open(rd.rank_log(rank), "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "hpcinfer.worker", str(rd.path)],
                                    env=launch_env(cfg, plan, rank, port), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    procs = {r: start(r) for r in ranks}
    retries = {r: cfg.rank_retries for r in ranks}
    ended: Dict[int, int] = {}
    display = ProgressDisplay(plan.rows)
    previous = {sig: signal.signal(sig, exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while len(ended) < len(procs):
            for r, p in procs.items():
                if r in ended or p.poll() is None:
                    continue
                if should_restart(rd, r, p.returncode, retries[r]):
                    retries[r] -= 1
                    print(f"hpcinfer: rank {r} failed (exit {p.returncode}); restarting it "
                          f"({cfg.rank_retries - retries[r]} of {cfg.rank_retries})", file=sys.stderr, flush=True)
                    procs[r] = start(r)
                else:
                    ended[r] = p.returncode
            display.update(snapshot(rd, plan.rows))
            time.sleep(poll_s)
    except BaseException:  # Ctrl-C, SIGTERM/SIGHUP (scancel, a closed terminal): take the ranks down too
        _stop(list(procs.values()))
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        display.update(snapshot(rd, plan.rows), final=True)
    return [RankOutcome(r, code, str(rd.rank_log(r))) for r, code in sorted(ended.items())]


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
