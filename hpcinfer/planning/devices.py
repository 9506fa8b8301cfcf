"""The devices a run can use on one machine, and how ranks (and a rank's nodes) split them.

Detection (nvidia-smi, CUDA_VISIBLE_DEVICES, CPU affinity) is at the edge; `split` and
`node_slices` are pure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from typing import List, Mapping, Optional, Sequence

from hpcinfer.errors import ConfigError
from hpcinfer.planning.sharding import partition


@dataclass(frozen=True)
class Devices:
    """What one machine offers: GPU ids (as CUDA_VISIBLE_DEVICES names them) or, with no GPU,
    CPU cores."""

    gpus: List[str] = field(default_factory=list)
    cpus: List[int] = field(default_factory=list)
    gpu_memory_gib: Optional[float] = None  # per GPU
    gpu_name: Optional[str] = None

    @property
    def kind(self) -> str:
        return "cuda" if self.gpus else "cpu"


@dataclass(frozen=True)
class NodeMemory:
    """The memory of one node that CPU ranks share (this machine, a Slurm node), for the plan's
    memory check: GiB, where the number comes from, and the key that sets how many ranks share a
    node (for the hint when they do not fit)."""

    gib: float
    source: str  # e.g. "this machine's memory (MemTotal)", "cluster.mem=4G"
    ranks_key: str = "dp"


def meminfo_total_gib(text: str) -> Optional[float]:
    """MemTotal of a /proc/meminfo text, in GiB (None when absent). Pure."""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemTotal":
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) * 1024 / 1024**3  # kB
    return None


def machine_memory(path: str = "/proc/meminfo") -> Optional[NodeMemory]:
    """This machine's memory: MemTotal (not MemAvailable: the plan asks whether the layout can fit
    this machine at all, the same answer whatever else runs now; vLLM itself checks what is
    available when each engine starts). None where /proc/meminfo cannot be read."""
    try:
        with open(path) as f:
            gib = meminfo_total_gib(f.read())
    except OSError:
        return None
    return NodeMemory(gib, "this machine's memory (MemTotal)", "dp") if gib else None


def detect(env: Mapping[str, str] | None = None, gpus: Optional[int] = None) -> Devices:
    """This machine's devices. `gpus` limits how many GPUs are offered (None: all visible; more
    than are visible: ConfigError, see `offered`)."""
    env = os.environ if env is None else env
    cpus = sorted(os.sched_getaffinity(0))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    names, mem, model = _nvidia_smi()
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    else:
        ids = [str(i) for i in range(len(names))]
    return offered(Devices(gpus=ids, cpus=cpus, gpu_memory_gib=mem, gpu_name=model), gpus)


def offered(devices: Devices, gpus: Optional[int]) -> Devices:
    """`devices` limited to the first `gpus` GPUs (cluster.gpus; None: all). ConfigError when more
    GPUs are asked for than there are: they would silently not be there (on a machine without
    GPUs the run would go to the CPU). Pure."""
    if gpus is None:
        return devices
    if gpus > len(devices.gpus):
        seen = "(nvidia-smi, CUDA_VISIBLE_DEVICES)"
        if not devices.gpus:
            raise ConfigError(
                f"cluster.gpus={gpus}, but this machine has no GPU visible {seen}; for ranks on CPU cores "
                "use cluster.gpus=0 or null"
            )
        raise ConfigError(
            f"cluster.gpus={gpus}, but this machine has {len(devices.gpus)} GPU(s) visible {seen}; "
            f"use cluster.gpus={len(devices.gpus)} or less, or null for all"
        )
    return replace(devices, gpus=devices.gpus[:gpus])


def _nvidia_smi() -> tuple[list[str], Optional[float], Optional[str]]:
    if not shutil.which("nvidia-smi"):
        return [], None, None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return [], None, None
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    if not rows:
        return [], None, None
    return [r[0] for r in rows], float(rows[0][2]) / 1024, rows[0][1]


def split(devices: Devices, ranks: int, per_rank: int) -> List[List[str]]:
    """Each rank's devices. GPUs: consecutive groups of `per_rank` (the caller has checked there
    are enough). CPU: the cores split into `ranks` near-equal contiguous groups; with more ranks
    than cores, ranks share cores round-robin."""
    if devices.gpus:
        if ranks * per_rank > len(devices.gpus):
            raise ValueError(f"{ranks} ranks x {per_rank} GPUs > {len(devices.gpus)} GPUs")
        return [devices.gpus[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    cpus = [str(c) for c in devices.cpus]
    if ranks >= len(cpus):
        return [[cpus[r % len(cpus)]] for r in range(ranks)]
    return [cpus[lo:hi] for lo, hi in partition(len(cpus), ranks)]


def node_slices(devices: Sequence[str], nnodes: int) -> List[List[str]]:
    """A replica's devices (GPU ids or CPU cores) cut into its nodes' consecutive equal shares;
    with fewer devices than nodes (CPU cores), nodes share them round-robin."""
    if nnodes < 1 or not devices:
        raise ValueError(f"cannot split devices {list(devices)} over {nnodes} node(s)")
    if len(devices) < nnodes:
        return [[devices[i % len(devices)]] for i in range(nnodes)]
    per = len(devices) // nnodes
    return [list(devices[i * per : (i + 1) * per]) for i in range(nnodes)]
