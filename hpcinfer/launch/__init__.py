"""Starting a run's ranks: on the submitting machine (planning their places, submitting) and inside
a Slurm task (which rank it is, its environment, supervising its process).

    base.py        the Launcher interface; `unfinished_ranks`
    local.py       LocalLauncher: every rank a process on this machine
    slurm/         SlurmLauncher (launcher.py: sbatch parameters, submission, waiting), the job
                   layout (layout.py), squeue/sacct (queue.py), node lists (nodelist.py), a task's
                   identity (task.py) and the in-task entry (entry.py)
    env.py         the rank environment contract (pure): ProcessSpec -> Process (module + env)
    supervisor.py  one rank's processes on a machine: restarts, a replica's leader/headless lifetime
    forkserver.py  local ranks on CPU forked from one process that imported vLLM once
    progress.py    progress shown while a run goes (rows, tokens/s, ETA)

`launcher_for` below is the one place that looks at the cluster kind. May import: config, errors,
secrets, rundir/, planning/ (its pure helpers and Devices), and rank/ only for what a supervisor
needs of a rank (its exit, its leader's end).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcinfer.config import RunConfig
    from hpcinfer.launch.base import Launcher


def launcher_for(cfg: RunConfig) -> Launcher:
    """The launcher of `cfg.cluster`: the only place that branches on the cluster kind."""
    from hpcinfer.config import SlurmClusterConfig

    if isinstance(cfg.cluster, SlurmClusterConfig):
        from hpcinfer.launch.slurm.launcher import SlurmLauncher

        return SlurmLauncher(cfg)
    from hpcinfer.launch.local import LocalLauncher

    return LocalLauncher(cfg)
