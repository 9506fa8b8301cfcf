"""The local launcher: every rank is a process on this machine (`python -m hpcinfer.rank.worker`, a
fork of one process that imported vLLM once where it can be: forkserver.py; on GPUs that process
starts before planning, `prestart`),
with the same environment contract a Slurm task gets (launch/env.py), each on its own devices;
then finalize runs here. Ranks log to logs/rank-<r>.log; a failed rank does not stop the others.

Two kinds of ranks get more (`rank_processes`, pure):
- MoE ranks with ep=true form vLLM's lockstep data-parallel group: VLLM_DP_RANK = VLLM_DP_RANK_LOCAL
  = the rank's place among the ranks started together, VLLM_DP_SIZE = their number, master
  127.0.0.1 and a free port; each sees all their GPUs, since vLLM puts DP local rank l on visible
  GPUs l x tp*pp.. itself. Every other rank gets no VLLM_DP_* at all.
- A rank with tp x pp above cluster.gpus_per_node is a replica spanning "nodes": one process per
  node's share of its devices, the leader a worker, the others `hpcinfer.rank.headless`
  (logs/rank-<r>-node-<n>.log), joined through 127.0.0.1 and a free port; supervisor.py keeps
  them alive and restarted as a unit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from hpcinfer.config import RunConfig
from hpcinfer.errors import EXIT_FAILED, EXIT_OK, RunIncomplete, exit_on_signal
from hpcinfer.launch import supervisor
from hpcinfer.launch.base import Launcher, Placement, unfinished_ranks
from hpcinfer.launch.env import Lockstep, Process, ProcessSpec, RankContext, Replica, free_port, process, rank_env
from hpcinfer.launch.forkserver import PRELOAD, ForkServer
from hpcinfer.launch.progress import ProgressDisplay, snapshot
from hpcinfer.launch.supervisor import RankSupervisor
from hpcinfer.planning.devices import Devices, NodeMemory, detect, machine_memory, node_slices, split
from hpcinfer.rundir.files import tail
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import Plan

LOOPBACK = "127.0.0.1"


@dataclass
class RankOutcome:
    rank: int
    returncode: int
    log: str


class LocalLauncher(Launcher):
    """Ranks as processes on this machine (cluster=local)."""

    preload = PRELOAD  # what the fork server imports (tests: something light)

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.server: Optional[ForkServer] = None
        self._devices: Optional[Devices] = None

    def devices(self) -> Devices:
        if self._devices is None:  # nvidia-smi once per submission (prestart, then planning)
            self._devices = detect(gpus=self.cfg.cluster.gpus)
        return self._devices

    def prestart(self) -> None:
        """On a GPU machine, start the fork server now with the environment the ranks will have
        (but for per-process variables: forkserver.py), so that vLLM's import overlaps planning.
        Not on CPU cores, where the ranks' thread settings depend on the plan (the server then
        starts with the first rank). Whatever goes wrong here is left to planning to report."""
        try:
            devices = self.devices()
        except Exception:
            return
        if not devices.gpus:
            return
        m = self.cfg.model
        offline = m.builtin is not None or (m.path is not None and os.path.isdir(os.path.expanduser(m.path)))
        # every offered GPU visible, as the launcher sees them (a rank sees its own: CUDA_VISIBLE_DEVICES
        # is per process), so that vLLM's import finds the platform a rank will find
        ctx = RankContext(0, 1, 0, ["localhost"], LOOPBACK, 0, "cuda", list(devices.gpus))
        env = rank_env(
            os.environ, ctx, workers_per_rank=1, cpu_kvcache_gib=self.cfg.cluster.cpu_kvcache_gib, offline=offline
        )
        self.server = ForkServer(preload=self.preload)
        self.server.start(env)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def gpus_offered(self, devices: Devices) -> Optional[int]:
        return len(devices.gpus) or None  # 0: a CPU machine, where ranks run on cores

    def place(self, ranks: int, devices: Devices) -> Placement:
        c, notes = self.cfg.cluster, []
        if not devices.gpus and ranks * self.cfg.gpus_per_rank > len(devices.cpus):
            notes.append(f"no GPU: {ranks * self.cfg.gpus_per_rank} CPU worker(s) share {len(devices.cpus)} core(s)")
        if not devices.gpus and c.gpu_memory_gib is not None:
            notes.append(f"cluster.gpu_memory_gib={c.gpu_memory_gib!r} has no effect: this machine has no GPU")
        if devices.gpus and c.cpu_kvcache_gib != type(c).cpu_kvcache_gib:
            notes.append(f"cluster.cpu_kvcache_gib={c.cpu_kvcache_gib!r} has no effect: the ranks run on GPUs")
        # every rank (each process of a rank spanning "nodes" too) shares this machine's memory
        return Placement(
            split(devices, ranks, self.cfg.gpus_per_rank),
            [None] * ranks,
            [None] * ranks,
            notes=notes,
            node_ranks=ranks * self.cfg.nodes_per_rank,
        )

    def node_memory(self) -> Optional[NodeMemory]:
        return machine_memory()

    def start(self, rd: RunDir, plan: Plan) -> int:
        """Run the ranks with unfinished shards here, then finalize."""
        from hpcinfer.finalize import finalize

        for o in run_ranks(rd, self.cfg, plan, unfinished_ranks(rd, plan), server=self.server):
            if o.returncode != 0:
                log(f"rank {o.rank} failed (exit {o.returncode}); last lines of {o.log}:\n{tail(o.log)}")
        try:
            summary = finalize(str(rd.path), self.cfg)  # the config in hand: not read again
        except RunIncomplete as e:
            log(f"incomplete, nothing published: {e}")
            log(f"fix the cause and re-run with run_dir={rd.path} to continue")
            return EXIT_FAILED
        tps = summary["output_tokens_per_second"]
        log(
            f"done: {summary['rows']} rows ({summary['rows_failed']} with errors), {summary['output_tokens']} output "
            f"tokens in {summary['generation_seconds']:.1f}s of generation"
            + (f" ({tps:,.0f} tok/s)" if tps else "")
            + f", {summary['wall_seconds']:.1f}s wall"
        )
        return EXIT_OK


def log(msg: str) -> None:
    print(f"hpcinfer: {msg}", file=sys.stderr, flush=True)


def rank_processes(
    base: Mapping[str, str],
    cfg: RunConfig,
    plan: Plan,
    rank: int,
    *,
    group: Sequence[int],
    master_port: int,
    replica_port: Optional[int] = None,
    host: str = "localhost",
) -> List[Process]:
    """The processes that run `rank` here, the leader first (pure). `group`: the ranks started
    together (a lockstep group's members); `master_port`: the run's master (and lockstep) port;
    `replica_port`: the rendezvous port of this rank when it spans nodes."""
    k = plan.nodes_per_rank
    devices = plan.rank_plans[rank].devices
    lockstep = None
    if cfg.lockstep:  # never spanning nodes (config.validate)
        dp_rank = list(group).index(rank)
        lockstep = Lockstep(
            dp_rank,
            dp_rank,
            len(group),
            LOOPBACK,
            master_port,
            visible=[d for r in group for d in plan.rank_plans[r].devices],
        )
    return [
        process(
            base,
            ProcessSpec(
                RankContext(rank, plan.ranks, rank, [host], LOOPBACK, master_port, plan.device_kind, share),
                workers=plan.gpus_per_rank // k,
                cpu_kvcache_gib=cfg.cluster.cpu_kvcache_gib,
                offline=os.path.isdir(plan.engine_args["model"]),
                replica=Replica(k, node_rank, LOOPBACK, replica_port, LOOPBACK) if k > 1 else None,
                lockstep=lockstep,
            ),
        )
        for node_rank, share in enumerate(node_slices(devices, k) if k > 1 else [devices])
    ]


def run_ranks(
    rd: RunDir, cfg: RunConfig, plan: Plan, ranks: List[int], poll_s: float = 0.5, server: Optional[ForkServer] = None
) -> List[RankOutcome]:
    """Start `ranks`, show progress until all have ended (each supervised: restarted up to
    cfg.rank_retries times, a replica's processes as a unit); return their exit codes. The rank
    processes are forks of `server` (one started already: LocalLauncher.prestart), else of one
    started here with the first rank, where their environments allow (forkserver.py)."""
    port, host = free_port(), socket.gethostname()

    def processes(rank: int) -> List[Process]:
        return rank_processes(
            os.environ,
            cfg,
            plan,
            rank,
            group=ranks,
            master_port=port,
            host=host,
            replica_port=free_port() if plan.nodes_per_rank > 1 else None,
        )

    # the ranks are forks of one process that imported vLLM once (forkserver.py)
    with contextlib.nullcontext(server) if server is not None else ForkServer(rd.forkserver_log()) as server:
        server.log_to(rd.forkserver_log())
        start = functools.partial(supervisor.spawn, new_session=True, server=server)
        supervisors = {
            r: RankSupervisor(rd, r, functools.partial(processes, r), cfg.rank_retries, start, say=log).start()
            for r in ranks
        }
        ended: Dict[int, int] = {}
        display = ProgressDisplay(plan.rows)
        previous = {sig: signal.signal(sig, exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while len(ended) < len(supervisors):
                for r, sup in supervisors.items():
                    if r not in ended:
                        code = sup.poll()
                        if code is not None:
                            ended[r] = code
                snap = snapshot(rd, plan.rows)
                display.update(snap)
                # ranks whose records say the attempt started here ended exit within moments: look
                # again soon, not a whole poll later (every run's wall waited up to poll_s for its last rank)
                ending = all(
                    snap.ended_at.get(r, 0.0) >= sup.started_at for r, sup in supervisors.items() if r not in ended
                )
                time.sleep(poll_s / 25 if ending else poll_s)
        except BaseException:  # Ctrl-C, SIGTERM/SIGHUP (scancel, a closed terminal): take the ranks down too
            for sup in supervisors.values():
                sup.stop()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            display.update(snapshot(rd, plan.rows), final=True)
        return [RankOutcome(r, code, str(rd.rank_log(r))) for r, code in sorted(ended.items())]
