"""Helpers shared by the benchmarks in bench/: the work directory, a measured child process,
the machine/versions header and the result table. Not a benchmark itself."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
MIB = 1024**2


def parse_args(doc: str, argv: Optional[List[str]], **int_options: int) -> Tuple[argparse.Namespace, List[str]]:
    """The benchmark's options: `--NAME N` for each of int_options (its default), --tmp and --keep.
    Returns the parsed options and the argument list they came from."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in int_options.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--tmp", default=None, help="parent of the temp directory (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    argv = sys.argv[1:] if argv is None else argv
    return ap.parse_args(argv), argv


@contextlib.contextmanager
def work_dir(prefix: str, tmp: Optional[str], keep: bool) -> Iterator[Path]:
    """A fresh temp directory under `tmp` (default: the system temp dir), removed at the end
    unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Measured:
    seconds: float  # wall time of the child, start to exit
    max_rss_bytes: int  # the child's own peak resident set (wait4's ru_maxrss)
    stdout: str
    stderr: str
    returncode: int


# Started from the benchmark, a child's ru_maxrss would start at the benchmark's own peak: Python
# starts children with vfork, and exec records the high-water mark of the memory it replaces.
# So a small launcher process starts the measured command and reports its rusage.
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump(dict(seconds=time.perf_counter() - t0, max_rss_kib=usage.ru_maxrss,
                   returncode=os.waitstatus_to_exitcode(status)), f)
"""


def run_measured(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> Measured:
    """Run a command (argv[0] an absolute path) and return its wall time and its own peak RSS,
    measured by LAUNCHER with os.wait4 on exactly that process."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "rusage.json")
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, report, *argv],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        if not os.path.exists(report):
            sys.exit(f"the launcher failed:\n{proc.stderr[-3000:]}")
        with open(report) as f:
            r = json.load(f)
    return Measured(r["seconds"], r["max_rss_kib"] * 1024, proc.stdout, proc.stderr, r["returncode"])


def check_ok(m: Measured, what: str) -> None:
    if m.returncode != 0:
        sys.exit(f"{what} failed with exit code {m.returncode}:\n{m.stderr[-3000:]}")


def machine_lines() -> List[Tuple[str, str]]:
    """nproc, RAM, CPU model and the versions every benchmark table is reported with."""
    import pyarrow

    import hpcinfer

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return [
        ("machine", f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {ram:.1f} GiB RAM, {cpu}"),
        (
            "versions",
            f"python {platform.python_version()}, pyarrow {pyarrow.__version__}, hpcinfer {hpcinfer.__version__}",
        ),
        ("date", time.strftime("%Y-%m-%d %H:%M")),
    ]


def print_table(title: str, rows: Sequence[Tuple[str, str]]) -> None:
    """One result table: a title, then `name | value` rows (Markdown, pasteable into docs)."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n")
    print(f"| {'what'.ljust(width)} | value |")
    print(f"| {'-' * width} | --- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print()


def verdict(value: float, target: float, unit: str) -> str:
    ratio = value / target
    return f"{'PASS' if value < target else 'FAIL'}: {value:,.2f} {unit} is {ratio:.2f}x the target (< {target:,.2f} {unit})"


def free_bytes(path: str | os.PathLike) -> int:
    return shutil.disk_usage(path).free


def words(rng, n: int, length: int) -> List[str]:
    """`n` deterministic pseudo-text strings of about `length` characters (random words from a
    fixed vocabulary, so they compress like text, not like repeated bytes)."""
    vocab = ["".join(chr(97 + c) for c in rng.integers(0, 26, int(k))) for k in rng.integers(2, 10, 4096)]
    per_row = max(1, length // 6)  # ~5 letters and a space per word
    idx = rng.integers(0, len(vocab), (n, per_row))
    return [" ".join(vocab[j] for j in row)[:length] for row in idx]


def static_rank_script(params: str, result: str) -> str:
    """The script of one rank of vLLM's static data-parallel split
    (examples/offline_inference/data_parallel.py), run as `python -c SCRIPT ARGS_JSON`: rank r of
    `world` takes its contiguous slice of the Parquet `data`, builds `vllm.LLM(**engine_args)`,
    waits for every rank at the barrier folder, then times one `generate`. `params`: an expression
    of the SamplingParams (or their list) over `t`, `lo`, `hi`, `args`; `result`: more fields of
    its RESULT line, an expression of a dict over `outs`."""
    return r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
rank, world, barrier = args["rank"], args["world"], args["barrier"]
from vllm import LLM, SamplingParams
import pyarrow.parquet as pq
t = pq.read_table(args["data"])
n = t.num_rows
lo, hi = rank * n // world, (rank + 1) * n // world   # contiguous, as data_parallel.py splits
prompts = t.column("prompt").to_pylist()[lo:hi]
llm = LLM(**args["engine_args"])
open(os.path.join(barrier, f"ready.{rank}"), "w").close()
while len([f for f in os.listdir(barrier) if f.startswith("ready.")]) < world:
    time.sleep(0.01)
t0 = time.time()
outs = llm.generate(prompts, __PARAMS__, use_tqdm=False)
t1 = time.time()
print("RESULT " + json.dumps({"rank": rank, "start": t0, "end": t1, "lo": lo, **(__RESULT__)}), flush=True)
core = getattr(llm.llm_engine, "engine_core", None)
if core is not None and hasattr(core, "shutdown"):
    core.shutdown()
os._exit(0)
""".replace("__PARAMS__", params).replace("__RESULT__", result)


def run_static_ranks(script: str, envs: List[Dict[str, str]], barrier: Path, **args) -> List[dict]:
    """Start one `static_rank_script` process per environment in `envs` (rank r gets envs[r]; all
    at once, meeting at `barrier`), with `args` (data, engine_args, ...); their RESULT dicts, in
    input order of their slices. Exits naming the rank's error when one fails."""
    import json
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(dict(rank=r, world=len(envs), barrier=str(barrier), **args))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, env in enumerate(envs)
    ]
    ranks = []
    for p in procs:
        out, err = p.communicate()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            sys.exit(f"a static rank failed:\n{err[-3000:]}")
        ranks.append(json.loads(lines[-1][len("RESULT ") :]))
    return sorted(ranks, key=lambda r: r["lo"])
