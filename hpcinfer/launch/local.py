"""[from backends.local] The local backend: every rank is a `python -m hpcinfer.worker` process on this machine, with
the same rank/world/master contract a Slurm task gets (see ranks.rank_env), each on its own
devices. Ranks log to logs/rank-<r>.log; a failed rank does not stop the others.

Two kinds of ranks get more (`rank_launches`, pure):
- MoE ranks with ep=true form vLLM's lockstep data-parallel group: VLLM_DP_RANK = VLLM_DP_RANK_LOCAL
  = the rank's place among the ranks started together, VLLM_DP_SIZE = their number, master
  127.0.0.1 and a free port; each sees all their GPUs, since vLLM puts DP local rank l on visible
  GPUs l x tp*pp.. itself (lockstep.lockstep_devices). Every other rank gets no VLLM_DP_* at all.
- A rank with tp x pp above cluster.gpus_per_node is a replica spanning "nodes" (replica.py): one
  process per node share of its devices, the leader a worker, the others `hpcinfer.headless`
  (logs/rank-<r>-node-<n>.log), joined through 127.0.0.1 and a free port. The replica lives and
  restarts as a unit: when its leader ends, the headless processes end too (on their own, else
  stopped); when a headless process fails while its leader runs, the leader is killed (and so
  restarted like any failed rank).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from hpcinfer.config import RunConfig
from hpcinfer.errors import exit_on_signal
from hpcinfer.launch.env import free_port, lockstep_devices, lockstep_env, node_slices, rank_env, replica_env
from hpcinfer.launch.progress import ProgressDisplay, snapshot
from hpcinfer.rank.worker import should_restart
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import Plan

HEADLESS_GRACE_S = 15.0  # a headless process leaves within ~2 s of its leader's end; then it is stopped


@dataclass
class RankOutcome:
    rank: int
    returncode: int
    log: str


@dataclass(frozen=True)
class Launch:
    """One process of a rank."""

    module: str  # "hpcinfer.rank.worker" (the rank itself; a spanning replica's leader) | "hpcinfer.rank.headless"
    node_rank: int  # its node within a replica spanning nodes (0: the leader)
    env: Dict[str, str]


def rank_launches(base: Mapping[str, str], cfg: RunConfig, plan: Plan, rank: int, *, group: Sequence[int],
                  master_port: int, replica_port: Optional[int] = None, host: str = "localhost") -> List[Launch]:
    """The processes that run `rank`, with their environments (pure). `group`: the ranks started
    together (a lockstep group's members); `master_port`: the run's master (and lockstep) port;
    `replica_port`: the rendezvous port of this rank when it spans nodes."""
    k = plan.nodes_per_rank
    devices = plan.rank_plans[rank].devices
    launches = []
    for node_rank, share in enumerate(node_slices(devices, k) if k > 1 else [devices]):
        env = rank_env(base, rank=rank, world_size=plan.ranks, local_rank=rank, hosts=[host],
                       master_addr="127.0.0.1", master_port=master_port, device_kind=plan.device_kind,
                       devices=share, workers_per_rank=plan.gpus_per_rank // k,
                       cpu_kvcache_gib=cfg.cluster.cpu_kvcache_gib, offline=os.path.isdir(plan.engine_args["model"]))
        if k > 1:
            env.update(replica_env(k, node_rank, "127.0.0.1", replica_port))
            env.setdefault("VLLM_HOST_IP", "127.0.0.1")  # vLLM's queues between the "nodes": loopback
        launches.append(Launch("hpcinfer.rank.worker" if node_rank == 0 else "hpcinfer.rank.headless", node_rank, env))
    if cfg.lockstep:  # never spanning nodes (config.validate)
        _make_lockstep(launches[0].env, plan, rank, group, master_port)
    return launches


def _make_lockstep(env: Dict[str, str], plan: Plan, rank: int, group: Sequence[int], master_port: int) -> None:
    """Turn `env` into a lockstep rank's: VLLM_DP_*, and on GPUs the devices of its whole group, of
    which vLLM picks this rank's share by VLLM_DP_RANK_LOCAL. (On CPU a lockstep group is a single
    rank, planner._experts refuses more, so the rank's own binding from rank_env stays.)"""
    dp_rank = list(group).index(rank)
    env.update(lockstep_env(dp_rank, dp_rank, len(group), "127.0.0.1", master_port))
    if plan.device_kind == "cuda":
        devices = [d for r in group for d in plan.rank_plans[r].devices]
        env["CUDA_VISIBLE_DEVICES"] = str(lockstep_devices(devices, dp_rank, plan.gpus_per_rank))


def run_ranks(rd: RunDir, cfg: RunConfig, plan: Plan, ranks: List[int], poll_s: float = 0.5) -> List[RankOutcome]:
    """Start `ranks`, show progress until all have ended, restarting a failed rank up to
    cfg.rank_retries times (it continues from its durable parts); return their exit codes."""
    port, host = free_port(), socket.gethostname()

    def start(rank: int) -> List[subprocess.Popen]:
        """The rank's processes, its leader (the worker) first."""
        launches = rank_launches(os.environ, cfg, plan, rank, group=ranks, master_port=port, host=host,
                                 replica_port=free_port() if plan.nodes_per_rank > 1 else None)
        return [_popen(rd, rank, launch) for launch in launches]

    procs = {r: start(r) for r in ranks}
    retries = {r: cfg.rank_retries for r in ranks}
    ended: Dict[int, int] = {}
    display = ProgressDisplay(plan.rows)
    previous = {sig: signal.signal(sig, exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while len(ended) < len(procs):
            for r, (p, *headless) in procs.items():
                if r in ended:
                    continue
                if p.poll() is None:
                    if any(h.poll() not in (None, 0) for h in headless):  # the replica cannot go on: fail it
                        print(f"hpcinfer: a headless process of rank {r} failed; stopping its leader",
                              file=sys.stderr, flush=True)
                        _signal_group(p, signal.SIGKILL)
                    continue
                _reap(headless)
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
        _stop([q for group in procs.values() for q in group])
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        display.update(snapshot(rd, plan.rows), final=True)
    return [RankOutcome(r, code, str(rd.rank_log(r))) for r, code in sorted(ended.items())]


def _popen(rd: RunDir, rank: int, launch: Launch) -> subprocess.Popen:
    log_path = rd.rank_log(rank)
    if launch.node_rank:
        log_path = log_path.with_name(f"rank-{rank}-node-{launch.node_rank}.log")
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", launch.module, str(rd.path)], env=launch.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _reap(procs: List[subprocess.Popen], grace_s: float = HEADLESS_GRACE_S) -> None:
    """Let a replica's headless processes leave on their own (its leader has ended), then stop them."""
    deadline = time.time() + grace_s
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    _stop(procs)


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
