"""The launcher interface: where a run's ranks run. One implementation per cluster kind
(`launch/local.py`, `launch/slurm/launcher.py`), chosen by `hpcinfer.launch.launcher_for`, the only
place that looks at the cluster kind. Everything that differs between clusters is a method here:

- on the submitting machine, while planning (nothing written): `devices` (what a node offers),
  `gpus_offered` (the count checked against the layout), `place` (each rank's devices and, on
  Slurm, its job and node), `node_memory` (what the CPU ranks of a node share); then, before
  submit writes anything, `check` (the cluster is reachable and offers what the plan needs);
- running: `start` runs the ranks that have work left here and finalizes (local), or queues them
  with a finalize job (Slurm) and returns; `follow` then waits for a queued run when asked to;
- `jobs`, for `status`: the cluster's jobs of a run (none locally).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hpcinfer.config import RunConfig
from hpcinfer.errors import EXIT_OK
from hpcinfer.planning.devices import Devices, NodeMemory
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import JobLayout, Plan


@dataclass
class Placement:
    """Where each rank of a run goes (index = rank)."""

    devices: List[List[str]]  # GPU ids or CPU cores (on Slurm: as numbered on its node)
    job: List[Optional[int]]  # Slurm: the rank's job (array element); None locally
    node: List[Optional[int]]  # Slurm: the rank's (first) node within its job; None locally
    nodes: int = 1  # nodes of the whole run
    jobs: Optional[JobLayout] = None  # Slurm: how ranks are grouped into jobs and nodes
    notes: List[str] = field(default_factory=list)
    # ranks on the fullest node, sharing its memory (a rank spanning nodes counts on each of its
    # nodes with its share of the workers); None: unknown (the CPU memory check is then skipped)
    node_ranks: Optional[int] = None


class Launcher(abc.ABC):
    """Starts a run's ranks on one kind of cluster (see the module docstring)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # ---- planning, on the submitting machine -------------------------------------------
    @abc.abstractmethod
    def devices(self) -> Devices:
        """The devices of one node, as the ranks will see them."""

    @abc.abstractmethod
    def gpus_offered(self, devices: Devices) -> Optional[int]:
        """GPUs the whole run may use, checked against dp x tp x pp (None: unknown, not checked)."""

    @abc.abstractmethod
    def place(self, ranks: int, devices: Devices) -> Placement:
        """Each of `ranks` ranks' devices (and Slurm job and node). ConfigError when they do not fit."""

    def node_memory(self) -> Optional[NodeMemory]:
        """The memory of one node, which the ranks placed on it share: checked against their weights
        and KV caches when they run on CPU (None: unknown, not checked; the plan says so)."""
        return None

    def check(self, plan: Plan) -> None:  # noqa: B027  (optional: most launchers have nothing to check)
        """Before anything is written (submit, not plan): UserError when the cluster cannot run `plan`
        (unreachable, or its nodes do not offer what the layout needs)."""

    # ---- running ----------------------------------------------------------------------------
    def prestart(self) -> None:  # noqa: B027  (optional: only the local launcher has work to start early)
        """Before planning (submit): start what the ranks will need and can be started without
        the plan, so that it overlaps planning. `close` ends it if the run does not start."""

    def close(self) -> None:  # noqa: B027
        """After the submission, whatever its outcome: end what `prestart` started."""

    @abc.abstractmethod
    def start(self, rd: RunDir, plan: Plan) -> Optional[int]:
        """Start the ranks with work left (`unfinished_ranks`). Returns the run's exit code when it
        ran to its end here, or None when it was queued (then `follow`)."""

    def follow(self, rd: RunDir, plan: Plan) -> int:
        """After `start` queued the run: its exit code (waiting for it when the config says so)."""
        return EXIT_OK

    def jobs(self, rd: RunDir) -> Optional[Dict[str, Any]]:
        """For `status`: {"of_rank": {rank: job id}, "states": {job id: state}, "summary": {...}}
        of the run's last submission; None where ranks are not cluster jobs."""
        return None


def unfinished_ranks(rd: RunDir, plan: Plan) -> List[int]:
    """The ranks to start: static, those with a shard not done (all of them for a new run); when
    shards are claimed (dynamic) or ranks step in lockstep (MoE with ep), all of them while any
    shard is not done."""
    done = rd.done_shards()
    if plan.schedule == "dynamic" or plan.ep:
        return [rp.rank for rp in plan.rank_plans] if len(done) < plan.shards else []
    return [rp.rank for rp in plan.rank_plans if any(s not in done for s in rp.shards)]
