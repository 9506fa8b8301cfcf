"""Start-up that does not multiply by the ranks: the model staged once per node, the vLLM /
torch.compile cache node-local per run, and each rank's start-up split as vLLM logs it.

`model.stage=node` copies the model directory once per node to node-local scratch
(`cluster.local_scratch`, default `$TMPDIR`, else /tmp) and the ranks of the node load from
there: a thousand ranks read the shared filesystem once per node, not once per rank. The copy is
made under a lock (`flock` on `<dest>.lock`) into a temp folder beside it and renamed into place,
so the staged folder exists only complete: the first rank of a node copies, the others wait on
the lock and reuse it; a copy killed half way leaves only a temp folder, removed by the next.

The scratch path may name its node, `{node}` (Slurm's node name, `SLURMD_NODENAME`, else the
host name): nodes that share one /tmp (a test cluster on one machine) then stage once each.

vLLM's cache (torch.compile artifacts: `VLLM_CACHE_ROOT`, vllm/envs.py) is set per rank to
`<scratch>/hpcinfer-vllm-cache/<run>` unless the environment sets it: node-local and private to
the run, so ranks on many nodes never write one shared cache at once (concurrent writers have
corrupted it elsewhere); the ranks of one node share it, as vLLM's own locking expects. One part
of it outlives the run: `modelinfos/`, where vLLM keeps what it learnt of a model class (keyed by
a hash of the class's source file, written by an atomic rename). On a miss vLLM starts a Python
process that imports vLLM and the model's module to learn it (~6 s of CPU, more than the rest of
an eager engine's start on CPU), so a run-private cache would pay that in every rank of every run:
`<run>/modelinfos` is a link to the node's `<scratch>/hpcinfer-vllm-cache/modelinfos`.

Node scratch does not fill up with old runs: a rank marks the run cache and the staged model it
uses as in use (`hold`: a shared `flock` on `<entry>.inuse`, held until the process ends, kill -9
included, whose mtime says when the entry was last used), and at its start removes the entries of
the node's `hpcinfer-vllm-cache/` and `hpcinfer-models/` unused for `KEEP_DAYS` that no process
holds (`sweep`: an exclusive non-blocking `flock` on the marker; the entry renamed away, then
deleted). A run resumed after that compiles again, or stages its model again: nothing is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

if TYPE_CHECKING:
    from hpcinfer.config import RunConfig
    from hpcinfer.rundir.paths import RunDir

MODELS = "hpcinfer-models"
CACHE = "hpcinfer-vllm-cache"
KEEP_DAYS = 7.0  # a node's run caches and staged models unused this long are removed (sweep)
INUSE = ".inuse"
_held: list = []  # this process's in-use markers (open, locked) until it ends


def node_name(env: Mapping[str, str] = os.environ) -> str:
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def local_scratch(configured: Optional[str], env: Mapping[str, str] = os.environ) -> Path:
    """The node-local scratch folder: `configured` ({node} replaced), else $TMPDIR, else /tmp."""
    path = configured or env.get("TMPDIR") or "/tmp"
    return Path(path.replace("{node}", node_name(env))).expanduser()


@dataclass
class Staged:
    path: Path  # where the ranks of this node load the model from
    copied: bool  # this rank made the copy (False: it was there, or another rank made it)
    seconds: float  # how long this rank spent staging (copying, or waiting for the copy)
    waited: float = 0.0  # of which waiting for the lock


def _fingerprint(src: Path) -> str:
    """A name for a model directory's copy: its real path, and its files' sizes and mtimes (a
    model replaced in place gets a new copy)."""
    h = hashlib.sha1(str(src.resolve()).encode())
    for p in sorted(src.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def stage_model(src: Path, scratch: Path, use: Callable[[Path], None] = lambda dest: None) -> Staged:
    """Copy model directory `src` to `<scratch>/hpcinfer-models/<name>-<fingerprint>` once (see the
    module docstring); the staged path, whether this call copied, and the time it took. `use(dest)`
    is called first (`hold`: the copy is not swept away while this rank loads it)."""
    t0 = time.monotonic()
    src = Path(src)
    root = scratch / MODELS
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{src.resolve().name}-{_fingerprint(src)}"
    use(dest)
    if dest.is_dir():  # staged before: no lock needed (it exists only complete)
        return Staged(dest, False, time.monotonic() - t0)
    with open(f"{dest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waited = time.monotonic() - t0
        try:
            if dest.is_dir():  # another rank of this node copied it while this one waited
                return Staged(dest, False, time.monotonic() - t0, waited)
            for old in root.glob(f"{dest.name}.tmp-*"):  # a copy killed half way
                shutil.rmtree(old, ignore_errors=True)
            tmp = root / f"{dest.name}.tmp-{os.getpid()}"
            shutil.copytree(src, tmp, symlinks=False)
            os.rename(tmp, dest)
            return Staged(dest, True, time.monotonic() - t0, waited)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cache_env(scratch: Path, run: str, env: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The environment for a node-local vLLM cache private to the run: {} when already set."""
    if env.get("VLLM_CACHE_ROOT"):
        return {}
    return {"VLLM_CACHE_ROOT": str(scratch / CACHE / run)}


def share_modelinfos(cache_root: Path) -> None:
    """Make `<cache_root>/modelinfos` a link to the node's shared `modelinfos/` beside it (see the
    module docstring); nothing when it exists (another rank of the node made it)."""
    shared = cache_root.parent / "modelinfos"
    shared.mkdir(parents=True, exist_ok=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.symlink(shared, cache_root / "modelinfos")


def run_id(rd: RunDir) -> str:
    """A name for the run on a node's scratch: its folder's name and a hash of its path."""
    return f"{rd.path.name}-{hashlib.sha1(str(rd.path.resolve()).encode()).hexdigest()[:8]}"


def prepare(rd: RunDir, cfg: RunConfig, args: Dict[str, Any], say: Callable[[str], None]):
    """Before the engine starts: point vLLM's cache where `model.compile_cache` says (unless the
    environment sets VLLM_CACHE_ROOT) and, with model.stage=node, stage the model. The engine
    arguments to use and the start-up times measured here."""
    scratch = local_scratch(getattr(cfg.cluster, "local_scratch", None))
    if cfg.model.compile_cache == "node":
        node_cache = cache_env(scratch, run_id(rd))
        os.environ.update(node_cache)
        if node_cache:
            with contextlib.suppress(OSError):  # only a cost if it fails: vLLM learns the model again
                hold(Path(node_cache["VLLM_CACHE_ROOT"]))
                share_modelinfos(Path(node_cache["VLLM_CACHE_ROOT"]))
    elif not os.environ.get("VLLM_CACHE_ROOT"):
        os.environ["VLLM_CACHE_ROOT"] = str(Path(cfg.cache_path).expanduser() / "vllm")
    with contextlib.suppress(OSError):
        Path(os.environ["VLLM_CACHE_ROOT"]).mkdir(parents=True, exist_ok=True)
    startup: Dict[str, float] = {}
    model = args.get("model")
    if cfg.model.stage == "node":
        if isinstance(model, str) and os.path.isdir(model):
            staged = stage_model(Path(model), scratch, hold)
            args = {k: (str(staged.path) if k in ("model", "tokenizer") and v == model else v) for k, v in args.items()}
            startup.update(stage_seconds=round(staged.seconds, 3), staged_here=float(staged.copied))
            how = "copied" if staged.copied else f"reused (waited {staged.waited:.1f} s)"
            say(f"model staged on {node_name()} at {staged.path}: {how} in {staged.seconds:.1f} s")
        else:
            say(f"model.stage=node: {model!r} is not a local directory; it is loaded as it is")
    for root in (scratch / CACHE, scratch / MODELS):
        for gone in sweep(root, KEEP_DAYS * 86400, skip={"modelinfos"}):
            say(f"removed {gone}: unused for {KEEP_DAYS:g} days")
    return args, startup


def hold(entry: Path) -> None:
    """Mark `entry` (a run's cache, a staged model; it need not exist yet) in use by this process
    until it ends, and used now: a shared flock on `<entry>.inuse`, its mtime set to now. Call it
    before using or creating the entry: a sweep that removed it first left no marker to lock."""
    marker = Path(f"{entry}{INUSE}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.fstat(fd).st_ino == os.stat(marker).st_ino:  # not unlinked by a sweep meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.utime(marker)
    _held.append(fd)


def sweep(root: Path, keep_s: float, skip=frozenset(), now: Optional[float] = None) -> list:
    """Remove the entries of `root` (a node's run caches or staged models) last used more than
    `keep_s` ago (their marker's mtime, else their own) that no process holds; the removed paths.
    A held entry, a copy in progress (`*.tmp-<pid>`) and `skip` are left alone; what a sweep
    killed half way left (`*.tmp-removing-*`) goes."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = [e for e in root.iterdir() if e.is_dir() and e.name not in skip]
    except OSError:
        return removed
    for entry in entries:
        if ".tmp-" in entry.name:
            if ".tmp-removing-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)
            continue
        marker = Path(f"{entry}{INUSE}")
        if now - _last_used(entry, marker) < keep_s:
            continue
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # in use
            os.close(fd)
            continue
        try:  # nobody uses it now; a rank that starts meanwhile waits, then finds it gone (hold)
            trash = root / f"{entry.name}.tmp-removing-{os.getpid()}"
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
            os.unlink(marker)  # under the lock: a rank waiting on it sees a new marker (hold)
            removed.append(entry)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _last_used(entry: Path, marker: Path) -> float:
    """When `entry` was last used: its marker's mtime, else (no rank has held it) its own."""
    try:
        return marker.stat().st_mtime
    except FileNotFoundError:
        return entry.stat().st_mtime


@contextlib.contextmanager
def compile_lock(rd: RunDir, cfg: RunConfig, args: Optional[Dict[str, Any]] = None):
    """Around the engine's start: the first rank that compiles into vLLM's cache (node-local or
    shared) does so alone, and the others start once it is written, to reuse it. Nothing for an
    eager engine (it compiles nothing)."""
    root = os.environ.get("VLLM_CACHE_ROOT")
    if not root or (args or {}).get("enforce_eager"):
        yield
        return
    key = hashlib.sha1(json.dumps(args or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    Path(root).mkdir(parents=True, exist_ok=True)
    ready = Path(root) / f"hpcinfer-compiled-{key}"
    if ready.exists():
        yield
        return
    with open(Path(root) / "hpcinfer-compile.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if ready.exists():  # another rank compiled while this one waited: reuse (unlock first)
                fcntl.flock(lock, fcntl.LOCK_UN)
                yield
                return
            yield
            ready.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---- the start-up split, from vLLM's log lines ----------------------------------------------
PATTERNS = {
    # "... GiB memory and 3.4 seconds" (gpu_model_runner); vLLM 0.26's V2 runner: "... GiB and 4.1 seconds"
    "weights_seconds": r"Model loading took [\d.]+ ?GiB (?:memory )?and ([\d.]+) seconds",
    "load_weights_seconds": r"Loading weights took ([\d.]+) seconds",
    # "... and initial profiling/warmup run together took 21.3 s"; vLLM 0.26: "torch.compile took 4.27 s in total"
    "compile_seconds": r"torch\.compile (?:and initial profiling/warmup run together )?took ([\d.]+) s",
    "graph_capture_seconds": r"Graph capturing finished in ([\d.]+) secs",
    "init_engine_seconds": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def startup_split(log: str) -> Dict[str, float]:
    """What vLLM logged of its start-up (the last of each; absent ones are left out: on CPU there
    is no graph capture, and eager engines compile nothing)."""
    out = {}
    for key, pattern in PATTERNS.items():
        found = re.findall(pattern, log)
        if found:
            out[key] = float(found[-1])
    if "weights_seconds" not in out and "load_weights_seconds" in out:
        out["weights_seconds"] = out["load_weights_seconds"]
    out.pop("load_weights_seconds", None)
    return out


def read_from(path: Path, offset: int) -> str:
    """The text of `path` from byte `offset` on ('' when it does not exist)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    return ""


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
