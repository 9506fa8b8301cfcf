"""Rank processes forked from one process that has imported vLLM already, instead of each one
starting Python and importing vLLM anew.

`from vllm import LLM` costs about 11 s of CPU (torch, torch._inductor, transformers, vLLM's
config), more than everything else a small rank does before generating. A local launch of 8 ranks
paid it 8 times on the same machine, and again for each restart. Here the launcher starts one
server process (`python -m hpcinfer.launch.forkserver`) that imports `PRELOAD` once; each rank
process is then a fork of it, with its own environment, log and session, running its module as
`python -m` would (`runpy`, as `__main__`).

A fork equals a fresh process only where nothing the fork inherits depends on the environment it
was imported under. So:
- the server is started with the environment of the first process it forks (the run's: offline
  flags, thread counts, the user's variables); a later process is forked only when its
  environment differs from that one in `PER_PROCESS` variables alone, which vLLM and hpcinfer read
  when the engine starts, never at import (vLLM's `envs` reads lazily until its engine caches
  them, after the fork); any other difference (say OMP_NUM_THREADS, which OpenMP reads when torch
  loads it) gets a fresh process (`spawn` returns None; supervisor.spawn starts it anew);
- nothing but the main thread runs in the server, and CUDA is not initialized there (both checked
  once the imports are done; otherwise the server leaves and every process starts fresh). vLLM's
  import loads the CUDA driver on a GPU machine (libcuda.so mapped, seen on the lent H200 machine)
  but does not initialize it (cuInit, which reads CUDA_VISIBLE_DEVICES): `driver_initialized` asks
  the driver itself. So CUDA_VISIBLE_DEVICES is per process: a GPU rank forked from the server
  sees only its own GPUs, as vLLM's workers forked after the same imports do.

A server may be started before its first process is known (`start`, with the environment its
processes are expected to have): the local launcher starts it on a GPU machine before planning,
so that vLLM's import (~20 s on the lent H200 machine) runs while the run is planned. Its log is
then a temp file until the run directory exists (`log_to`), copied there when the server ends.

The protocol is one JSON object per line: the launcher writes {module, argv, env, log,
new_session} to the server's stdin; the server answers {"pid": n} once the child has its own
session, and {"pid": n, "exit": code} when it ends (code as subprocess gives it: -signal when
killed). The server reaps its children, ignores the terminal's, the launcher's and Slurm's signals
(INT, TERM, HUP, USR1, USR2: the launcher stops the ranks itself; a local launch may run inside an
allocation) and leaves when its stdin closes (the launcher ended). Its own
output goes to logs/forkserver.log.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional

# what a rank process imports before its engine starts (the rank's own module: pyarrow, omegaconf, hpcinfer)
PRELOAD = ("vllm.entrypoints.llm", "hpcinfer.rank.worker")

REAP_S = 0.05  # how soon an ended child is reported (the launcher then finalizes): a run's wall waits for it

# Read when a rank's engine starts, not at import: a fork may differ from the server in these alone.
PER_PROCESS_PREFIXES = ("HPCINFER_", "VLLM_DP_")
PER_PROCESS = frozenset(
    {
        "VLLM_CPU_OMP_THREADS_BIND",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
        "VLLM_HOST_IP",
        "CUDA_VISIBLE_DEVICES",  # read when CUDA starts: never in the server (`driver_initialized`)
    }
)


def forkable(server_env: Mapping[str, str], env: Mapping[str, str]) -> bool:
    """Whether a process with `env` may be forked from a server started with `server_env`: they
    differ in per-process variables alone. Pure."""
    names = set(server_env) | set(env)
    return all(
        server_env.get(k) == env.get(k)
        for k in names
        if k not in PER_PROCESS and not k.startswith(PER_PROCESS_PREFIXES)
    )


class ForkedProcess:
    """A process the server forked, with the part of `subprocess.Popen` a supervisor uses
    (pid, returncode, poll, wait, send_signal, kill, terminate)."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self.server.wait_exit(self.pid, timeout):
            raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The launcher's side: the server process, started by `start` or on the first `spawn`, and
    the exits it reports (read by a thread). Use as a context manager: leaving it ends the server
    (not the processes it forked). `log`: where its output goes (None: a temp file until `log_to`)."""

    def __init__(self, log: Optional[Path] = None, preload=PRELOAD):
        self.log, self.preload = log, tuple(preload)
        self._temp_log: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self.env: Dict[str, str] = {}
        self._exits: Dict[int, int] = {}
        self._started: List[int] = []
        self._cond = threading.Condition()
        self._gone = False
        self._lock = threading.Lock()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._keep_log()

    def log_to(self, log: Path) -> None:
        """Where the log goes from now on: a server started without one (before the run directory
        existed) wrote to a temp file, copied there when the server ends."""
        if self.log is None or self.log == self._temp_log:
            self.log = log

    def _keep_log(self) -> None:
        temp, self._temp_log = self._temp_log, None
        if temp is None:
            return
        with contextlib.suppress(OSError):
            if self.log is not None and self.log != temp:
                with open(temp, "rb") as src, open(self.log, "ab") as dst:
                    dst.write(src.read())
            temp.unlink()

    def start(self, env: Mapping[str, str]) -> None:
        """Start the server now, for processes whose environment will be `env` (but for
        per-process variables): it imports while the caller goes on."""
        with self._lock:
            if self.proc is None:
                self._start(env)

    def _start(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        if self.log is None:
            fd, name = tempfile.mkstemp(prefix="hpcinfer-forkserver-", suffix=".log")
            os.close(fd)
            self.log = self._temp_log = Path(name)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, *self.preload],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        threading.Thread(target=self._read, name="hpcinfer-forkserver", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                msg = json.loads(line)
                with self._cond:
                    if "exit" in msg:
                        self._exits[msg["pid"]] = msg["exit"]
                    else:
                        self._started.append(msg["pid"])
                    self._cond.notify_all()
        finally:  # the server ended, or said what this side cannot read: either way it is gone
            with self._cond:
                self._gone = True
                self._cond.notify_all()

    def spawn(self, module: str, argv: List[str], env: Mapping[str, str], log: Path, new_session: bool):
        """Fork `python -m module *argv` with `env`, its output appended to `log`; a ForkedProcess,
        or None when `env` cannot be forked from this server (start that process fresh)."""
        with self._lock:
            if self.proc is None:
                self._start(env)
            elif not forkable(self.env, env):
                return None
            request = {"module": module, "argv": argv, "env": dict(env), "log": str(log), "new_session": new_session}
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
            except OSError:
                return None  # the server is gone (see its log): start this process fresh
            with self._cond:
                self._cond.wait_for(lambda: self._started or self._gone)
                if not self._started:
                    return None
                return ForkedProcess(self, self._started.pop(0))

    def exit_code(self, pid: int) -> Optional[int]:
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
            if self._gone and not _alive(pid):
                return self._exits.setdefault(pid, 255)  # the server died before it could say
            return None

    def wait_exit(self, pid: int, timeout: Optional[float]) -> bool:
        """Whether `pid` ended within `timeout` (a server that died tells no more: look every 0.2 s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while pid not in self._exits and not (self._gone and not _alive(pid)):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.2 if left is None else min(0.2, left))
            return True


def driver_path(maps: str) -> Optional[str]:
    """The CUDA driver library (libcuda) a process whose /proc/<pid>/maps is `maps` has loaded,
    or None (NVML and the CUDA runtime are other libraries). Pure."""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith("libcuda.so"):
            return fields[5]
    return None


CUDA_ERROR_NOT_INITIALIZED = 3


def driver_initialized(maps: str) -> bool:
    """Whether this process has initialized the CUDA driver (cuInit: CUDA_VISIBLE_DEVICES read,
    and no fork can use CUDA after it). A driver only loaded, as vLLM's import loads it on a GPU
    machine, is asked without being initialized: before cuInit every other call of the driver's
    API answers CUDA_ERROR_NOT_INITIALIZED."""
    path = driver_path(maps)
    if path is None:
        return False
    import ctypes

    count = ctypes.c_int(0)
    return ctypes.CDLL(path).cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


# --- the server ----------------------------------------------------------------------------------------


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _child(request: dict, ready: int, protocol: int) -> None:
    """In the forked child: become the requested process, then run its module as `__main__`."""
    code = 1
    try:
        for sig in (*SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if request["new_session"]:
            os.setsid()
        os.close(ready)  # the server answers the launcher only now: signals to the new session reach it
        os.close(protocol)  # the server's end of the launcher's pipe: the launcher sees EOF when the server ends
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, to in ((null, 0), (out, 1), (out, 2)):
            os.dup2(fd, to)
        os.close(null)
        os.close(out)
        os.environ.clear()
        os.environ.update(request["env"])
        import runpy

        sys.argv = [request["module"], *request["argv"]]
        # a preloaded module (the rank's own) runs anew as __main__, from its already imported
        # dependencies; left in sys.modules, runpy would warn that it runs twice
        sys.modules.pop(request["module"], None)
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _fork(request: dict, protocol: int) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(request, w, protocol)
    os.close(w)
    os.read(r, 1)  # EOF once the child has its session (or died trying)
    os.close(r)
    return pid


def serve(preload: List[str]) -> None:
    # the terminal's, the launcher's and Slurm's signals (USR2 before a preemption): the launcher
    # stops the ranks; this server leaves with it
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # the protocol gets an fd of its own; fd 1 (where vLLM's log handlers write) goes to this
    # server's log: nothing the imports or vLLM print can break a message
    protocol = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(protocol, "w")
    t0 = time.monotonic()
    for name in preload:
        __import__(name)
    print(
        f"hpcinfer forkserver: pid {os.getpid()} imported {', '.join(preload)} in {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    gc.freeze()  # what the imports made is never collected here: a child's collector leaves those pages shared
    if threading.active_count() != 1:  # a fork keeps only the forking thread: refuse to fork at all
        print(f"hpcinfer forkserver: threads after import: {threading.enumerate()}", file=sys.stderr)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as f:
            if driver_initialized(f.read()):  # a child could not choose its GPUs: refuse to fork at all
                print("hpcinfer forkserver: the imports initialized CUDA; no forks", file=sys.stderr)
                return
    children: set = set()

    def say(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    def reap() -> None:
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                say({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})

    buffer = b""
    while True:
        ready, _, _ = select.select([0], [], [], REAP_S)
        reap()
        if not ready:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:  # the launcher is gone; the children go on (init reaps them). No interpreter
            os._exit(0)  # teardown: torch's and vLLM's take seconds
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            pid = _fork(request, protocol)
            children.add(pid)
            say({"pid": pid})
            print(f"hpcinfer forkserver: forked {request['module']} as pid {pid}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
    os._exit(0)
