"""Overhead of hpcinfer against raw vLLM: interleaved pairs, the same window on both sides.

    .venv/bin/python bench/overhead.py [--rows 4000] [--max-tokens 64] [--repeats 5] [--model tiny]
        [--mode sequential|concurrent] [--warmup-rows N] [--budget-s S] [--first-pair N] [--baseline DIR]
        [--profile FILE] [--json FILE]
    .venv/bin/python bench/overhead.py --report A.json B.json ...   (the pairs of several runs, pooled)
        [--set model.path=/models/m engine.max_model_len=512 ...]   (any further config overrides)

Both sides get the same prompts (Parquet written once), the same engine arguments (hpcinfer's
`engine_args` for this config, printed) and the same rank environment (`cpu_engine_env` on CPU,
the first visible GPU on GPU), greedy with `ignore_eos`, so both generate exactly the same
number of tokens (checked on every run):

- raw: a fresh process runs `vllm.LLM(**engine_args).generate(prompts, SamplingParams(...))`;
- hpcinfer: `python -m hpcinfer.submit dp=1 data.input=<file> ...` (plan, shard, rank process,
  streaming engine with durable parts, finalize).

Method. First one untimed warm-up run per side (`--warmup-rows`, default `--rows`: torch.compile
and autotuning caches, page cache, .pyc files), then `--repeats` pairs, in one of two modes
(`--mode`):

- sequential (the default on a GPU machine): one side at a time on the whole machine, alternating
  which side goes first (raw, hpcinfer | hpcinfer, raw | ...), so a drift of the machine hits
  both alike;
- concurrent (the default on a CPU machine with a core per side): the sides of a pair run at the
  same time, each with its own equal share of the cores (`taskset`: the side's every process, and
  its engine's threads, bound there; hpcinfer's submit, rank and finalize included), the shares
  going round the sides from pair to pair. They are launched together, and each waits at a gate
  once its engine is up, just before its window (hpcinfer's rank: `HPCINFER_START_GATE`,
  `hpcinfer.rank.worker.wait_at_gate`; raw: the same few lines in its script); the gates open
  together when every side has reached its own, so the windows begin together (each pair prints
  how far apart they began and ended, and how much of them overlapped). A side's wall leaves out
  its wait at the gate (`gate_s`, kept in the JSON). Why:
  on the 2-core VMs this project runs on, the machine's speed drifts within minutes
  (`bench/cpu_drift.py`), so two runs one after the other differ by 10-30% whatever they run
  (sequential per-pair ratios 0.80-1.41 here), while two runs at the same time see the same
  drift (concurrent per-pair ratios 0.96-1.04; docs/benchmarks.md). The price: each side has
  half the cores, and the two engines share the machine's caches and memory (a core's speed
  falls ~8% while the other is busy, alike for both sides while both windows run).
Before each timed run the benchmark waits until no process holds the GPU but those that held it
before it began (`settle`: the previous run's engine core may still be freeing its memory after its
parent exited; at most 30 s, printed and kept as `settled_s`, outside both walls). Every side uses
one vLLM cache (`VLLM_CACHE_ROOT`, unless set: a folder of the run), so no side compiles in a timed
run.
Per run, two numbers:

- generation tokens/s: output tokens over one window, timed the same way on both sides with
  `time.time()` in the process that drives the engine: from the moment the prompts are handed
  over (raw: `generate` is called; hpcinfer: the rank's shard loop starts, before its first shard
  is read and tokenized) to the moment the last finished request is received from the engine
  (raw: `generate` returns; hpcinfer: the engine step that returned its last row,
  `ranks/<r>.json` `last_output_at`). Both windows include tokenizing and adding the requests.
- end-to-end wall: the side's process, start to exit, timed here (raw: imports, engine start-up,
  generate; hpcinfer: submit = config, planning, sharding, the rank process with its engine,
  durable parts, finalize).

Each run's wall is also split the same way on both sides, printed as its pair ends: to the
engine (raw: interpreter, `import vllm`, prompts read; hpcinfer: submit with planning, then the
rank process up to its engine), the engine's start-up (raw: `LLM()`; hpcinfer: the rank's engine,
which imports vLLM there), the window, and after it (engine stopped, durable parts, finalize, the
process's exit), with vLLM's own start-up lines (weights, init engine, graph capture).

Reported per pair: tokens/s ratio hpcinfer/raw and wall ratio raw/hpcinfer (both > 1 when hpcinfer
is faster); over the pairs: median, min-max and a bootstrap 95% interval of the median (10,000
resamples of the pairs). Targets: median tokens/s ratio >= 0.98; wall ratio >= 0.97 for runs of
~2 minutes of generation (the fixed costs weigh more on short runs).

`--baseline DIR` adds a third side, `base`: hpcinfer run from another checkout (e.g. the code
before a change; `git archive <commit> hpcinfer conf | tar -x -C DIR`), interleaved with the
other two, so that before and after are measured in one run under the same load. A baseline that
does not record `last_output_at` is timed to its last shard done instead (said in the output).
`--budget-s S` starts no pair that would end past S seconds (by the longest pair so far; a device
call's limit), and `--warmup-rows 0` skips the warm-ups (a machine an earlier call warmed, with the
same `VLLM_CACHE_ROOT`); `--first-pair N` numbers a later call's pairs on from an earlier call's N,
so which side goes first keeps alternating across calls (one pair per call would otherwise always
start raw first, and the second process to start may pay for the first one's exit: the report
splits the start difference by which side went first); `--json` is rewritten after every pair,
and each run's log (raw's output; hpcinfer's output and its rank's log, with vLLM's timestamped
start-up lines) is kept in the folder beside it named as the file without `.json`. Both sides
record their `import vllm` (`startup.import_seconds`), and the report splits the start difference
into the import, `LLM()` and the rest.
`--report A.json B.json ...` runs nothing: it prints the summary over the pairs of several runs'
`--json` files (e.g. one per device call on one machine), refusing files that measured something else.
`--profile FILE` runs one more, untimed, hpcinfer run under `py-spy record --subprocesses --idle`
(collapsed stacks in FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# before a script's window: with a gate (argv[3], concurrent mode), say the engine is up
# (`<gate>.ready`, holding the time `t_ready`) and wait for the gate to open, as the rank does
# (hpcinfer.rank.worker.wait_at_gate), so that the sides' windows begin together
GATE = r"""
import os
t_ready = time.time()
if len(sys.argv) > 3:
    with open(sys.argv[3] + ".ready.tmp", "w") as f:
        f.write(repr(t_ready))
    os.replace(sys.argv[3] + ".ready.tmp", sys.argv[3] + ".ready")
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.01)
"""

# the end of a script that built `llm`: as the rank, stop vLLM's engine-core processes, if any
STOP_CORE = r"""
core = getattr(llm.llm_engine, "engine_core", None)
if core is not None and hasattr(core, "shutdown") and type(core).__name__ != "InprocClient":
    core.shutdown()
"""

RAW = (
    r"""
import json, sys, time
t0 = time.time()
from vllm import LLM, SamplingParams, __version__
t_vllm = time.time()
import pyarrow.parquet as pq
args = json.loads(sys.argv[1])
prompts = pq.read_table(sys.argv[2]).column("prompt").to_pylist()
t_imp = time.time()
llm = LLM(**args["engine_args"])
params = SamplingParams(temperature=0, max_tokens=args["max_tokens"], ignore_eos=True)
"""
    + GATE
    + r"""
t1 = time.time()
outs = llm.generate(prompts, params, use_tqdm=False)
t2 = time.time()
"""
    + STOP_CORE
    + r"""
print(json.dumps({"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "window_s": t2 - t1,
                  "vllm": __version__, "t": [t0, t_imp, t1, t2, time.time()], "import_s": t_vllm - t0,
                  "gate_s": t1 - t_ready}),
      flush=True)
import os; os._exit(0)
"""
)

# `--engine-side`: hpcinfer's own engine wrapper and request building, without the rank around
# them: every request built and added at once, then stepped to the end, timed as raw is
ENGINE = (
    r"""
import json, sys, time
import pyarrow.parquet as pq
from hpcinfer.cli import compose
from hpcinfer.rank.engine import VllmEngine
from hpcinfer.rank.requests import build_requests
args = json.loads(sys.argv[1])
table = pq.read_table(sys.argv[2])
cfg = compose(args["overrides"])
engine = VllmEngine(args["engine_args"])
"""
    + GATE
    + r"""
t1 = time.time()
requests = build_requests(table, range(table.num_rows), range(table.num_rows), cfg, engine.tokenizer,
                          engine.max_model_len)
for i, r in enumerate(requests):
    engine.add(0, i, r)
tokens = 0
while engine.pending:
    tokens += sum(res.output_tokens for _, _, res in engine.step())
t2 = time.time()
engine.shutdown()
print(json.dumps({"tokens": tokens, "window_s": t2 - t1, "gate_s": t1 - t_ready}), flush=True)
import os; os._exit(0)
"""
)

EXTRA: List[str] = []  # --set overrides, for every side
START_GATE, WORKER = "HPCINFER_START_GATE", "hpcinfer/rank/worker.py"  # the rank's gate (concurrent mode)
SIDES = ("raw", "hpcinfer", "base")


def overrides(model: str, data: Path, max_tokens: int, run_dir: Optional[Path] = None) -> List[str]:
    out = [
        f"model={model}",
        f"data.input={data}",
        "sampling=greedy",
        f"sampling.max_tokens={max_tokens}",
        "sampling.ignore_eos=true",
        "dp=1",
        *EXTRA,
    ]
    return out + ([f"run_dir={run_dir}"] if run_dir else [])


def write_prompts(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = ["rivers", "compilers", "glaciers", "tea", "lighthouses", "trains", "bees", "paper"]
    prompts = [
        f"Write a short note about {topics[i % len(topics)]} number {i}, in the style of report {i % 13}."
        for i in range(rows)
    ]
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": prompts}), path)


def raw_env(cpus: Optional[List[int]] = None) -> Dict[str, str]:
    """The environment a dp=1 hpcinfer rank gets, for the raw side too (on `cpus` alone where
    given: the rank of a submit pinned to them sees only those)."""
    from hpcinfer.launch.env import cpu_engine_env
    from hpcinfer.planning.devices import detect, split

    env = dict(os.environ)
    devices = detect()
    if devices.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(split(devices, 1, 1)[0])
    else:
        env.update(cpu_engine_env(os.environ, [str(c) for c in (cpus or devices.cpus)], 1, 1))
    return env


def pinned(cpus: Optional[List[int]]) -> List[str]:
    """The argv prefix that runs a command and every process it starts on `cpus` alone."""
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


def check(r: subprocess.CompletedProcess, what: str) -> None:
    if r.returncode != 0:
        sys.exit(f"{what} failed with exit code {r.returncode}:\n{r.stderr[-4000:]}")


def keep_log(log: Optional[Path], text: str) -> None:
    """A run's vLLM log (timestamped lines: where its start went), kept beside the --json file."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)


def run_raw(
    engine_args: dict,
    data: Path,
    max_tokens: int,
    log: Optional[Path] = None,
    cpus: Optional[List[int]] = None,
    gate: Optional[Path] = None,
) -> dict:
    launched, t0 = time.time(), time.monotonic()
    r = subprocess.run(
        [*pinned(cpus), sys.executable, "-c", RAW, json.dumps({"engine_args": engine_args, "max_tokens": max_tokens})]
        + [str(data), *([str(gate)] if gate else [])],
        env=raw_env(cpus),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - t0
    keep_log(log, r.stdout + r.stderr)
    check(r, "raw vLLM")
    from hpcinfer.rank.staging import startup_split  # vLLM's start-up lines, parsed as the rank's are

    res = json.loads(r.stdout.strip().splitlines()[-1])
    started, imported, t1, t2, shut = res["t"]
    gate_s = res["gate_s"]  # waited at the gate for the other sides (0 without one)
    return {
        "tokens": res["tokens"],
        "window_s": res["window_s"],
        "wall_s": wall - gate_s,  # without the wait at the gate
        "gate_s": gate_s,
        "vllm": res["vllm"],
        "window_at": [t1, t2],
        # where the wall went: to the engine's start (interpreter, imports, prompts read), the
        # engine's start-up (LLM()), the window, after it (engine core stopped, the process's exit)
        "split": {
            "to_engine_s": imported - launched,
            "engine_s": t1 - gate_s - imported,
            "window_s": t2 - t1,
            "after_s": launched + wall - t2,
        },
        # vLLM's logged parts, and `import vllm` (the rank records its own)
        "startup": {**startup_split(r.stdout + r.stderr), "import_seconds": round(res["import_s"], 3)},
        "exit_s": launched + wall - shut,
    }


def run_engine(
    engine_args: dict,
    model: str,
    data: Path,
    max_tokens: int,
    cpus: Optional[List[int]] = None,
    gate: Optional[Path] = None,
) -> dict:
    t0 = time.monotonic()
    spec = {"engine_args": engine_args, "overrides": overrides(model, data, max_tokens)}
    r = subprocess.run(
        [*pinned(cpus), sys.executable, "-c", ENGINE, json.dumps(spec), str(data), *([str(gate)] if gate else [])],
        env={**hpcinfer_env(REPO), **raw_env(cpus)},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - t0
    check(r, "hpcinfer's engine alone")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {
        "tokens": res["tokens"],
        "window_s": res["window_s"],
        "wall_s": wall - res["gate_s"],
        "gate_s": res["gate_s"],
    }


def hpcinfer_argv(model: str, data: Path, max_tokens: int, run_dir: Path, extra: Sequence[str] = ()) -> List[str]:
    return [sys.executable, "-m", "hpcinfer.submit", *overrides(model, data, max_tokens, run_dir), *extra]


def hpcinfer_env(root: Path) -> Dict[str, str]:
    """Run hpcinfer from checkout `root` (its package and conf/), whatever is installed."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(root) + (os.pathsep + path if path else "")}


def run_hpcinfer(
    root: Path,
    model: str,
    data: Path,
    max_tokens: int,
    run_dir: Path,
    extra: Sequence[str] = (),
    log: Optional[Path] = None,
    cpus: Optional[List[int]] = None,
    gate: Optional[Path] = None,
) -> dict:
    launched, t0, cpu0 = time.time(), time.monotonic(), children_cpu_s()
    r = subprocess.run(
        [*pinned(cpus), *hpcinfer_argv(model, data, max_tokens, run_dir, extra)],
        cwd=root,
        env={**hpcinfer_env(root), **({START_GATE: str(gate)} if gate else {})},
        capture_output=True,
        text=True,
        check=False,
    )
    wall, cpu = time.monotonic() - t0, children_cpu_s() - cpu0
    rank_log = run_dir / "logs" / "rank-0.log"
    keep_log(log, r.stdout + r.stderr + (rank_log.read_text(errors="replace") if rank_log.exists() else ""))
    check(r, f"hpcinfer ({root})")
    summary = json.loads((run_dir / "summary.json").read_text())
    rank = json.loads((run_dir / "ranks" / "0.json").read_text())
    end = rank.get("last_output_at")
    # the window's end (a baseline that does not record last_output_at: its last shard done)
    last = end or rank["generation_ended_at"]
    began = rank["generation_started_at"]
    # waited at the gate for the other sides (hpcinfer.rank.worker.wait_at_gate; 0 without one)
    gate_s = began - float(ready("hpcinfer", gate).read_text()) if gate else 0.0
    engine_start = began - gate_s - rank["engine_seconds"]
    return {
        "tokens": summary["output_tokens"],
        "window_s": last - began,
        "window_end": "last output" if end else "last shard done",
        "durable_lag_s": rank["generation_ended_at"] - end if end else 0.0,  # last output -> its shard done
        # hpcinfer's fixed costs: submit (plan, shard, launch) to the rank's start, the engine's
        # start-up, the rank's end to finalize's end (summary.json written)
        "to_rank_s": rank["started_at"] - (summary["finished_at"] - summary["wall_seconds"]),
        "engine_s": rank["engine_seconds"],
        "finalize_s": summary["finished_at"] - rank["finished_at"],
        "wall_s": wall - gate_s,  # without the wait at the gate
        "gate_s": gate_s,
        # user + system of the submit and every process it waited for (ranks, finalize); None when
        # another side ran at the same time (the benchmark's children's times are one sum)
        "cpu_s": None if cpus else cpu,
        "window_at": [began, last],
        # the same split as raw's: to the engine's start (submit, planning, the rank process up to
        # its engine, `import vllm` aside: the rank imports it inside the engine's start-up), the
        # engine's start-up, the window, after it (durable parts, engine stopped, finalize, exit)
        "split": {
            "to_engine_s": engine_start - launched,
            "engine_s": rank["engine_seconds"],
            "window_s": last - began,
            "after_s": launched + wall - last,
        },
        "startup": rank.get("startup") or {},
        "rank_after_s": rank["finished_at"] - last,  # last output -> rank done
        "exit_s": launched + wall - summary["finished_at"],  # summary written -> submit's exit
    }


def split_line(side: str, r: dict) -> str:
    """One run's wall, where it went: `  raw      wall 57.2 = to engine 9.1 + engine 30.2 (...) + ...`."""
    sp, st = r["split"], r.get("startup") or {}
    vllm = ", ".join(f"{k.replace('_seconds', '')} {v:.1f}" for k, v in st.items())
    extra = ""
    if side != "raw" and "rank_after_s" in r:
        extra = f" (rank done +{r['rank_after_s']:.1f}, finalize +{r['finalize_s']:.1f}, exit +{r['exit_s']:.1f})"
    elif "exit_s" in r:
        extra = f" (process exit +{r['exit_s']:.1f})"
    return (
        f"  {side:<8} wall {r['wall_s']:.1f} s = to engine {sp['to_engine_s']:.1f} + engine start-up {sp['engine_s']:.1f}"
        f"{f' [{vllm}]' if vllm else ''} + window {sp['window_s']:.1f} + after {sp['after_s']:.1f}{extra}"
        + (f"; waited {r['settled_s']:.1f} s for the GPU before it" if r.get("settled_s", 0) >= 0.1 else "")
    )


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bootstrap_median(values: List[float], n: int = 10_000, seed: int = 0) -> tuple:
    """95% percentile bootstrap interval of the median of `values` (resampled with replacement)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def describe(ratios: List[float]) -> str:
    lo, hi = bootstrap_median(ratios)
    return (
        f"median {statistics.median(ratios):.3f}, min-max {min(ratios):.3f}-{max(ratios):.3f}, "
        f"bootstrap 95% interval of the median {lo:.3f}-{hi:.3f} ({len(ratios)} pairs)"
    )


def report_pair(i: int, order: List[str], sides: List[str], results: Dict[str, List[dict]]) -> None:
    """A pair's line (tokens/s, walls, the ratio) and each side's wall split, as soon as it ends."""
    tokens = {s: results[s][-1]["tokens"] for s in sides}
    assert len(set(tokens.values())) == 1, f"token counts differ: {tokens}"
    raw, hp = results["raw"][-1], results["hpcinfer"][-1]
    line = (
        f"pair {i} ({arrangement(order, [results[s][-1] for s in order])}): raw {raw['tokens'] / raw['window_s']:,.0f} tok/s "
        f"{raw['wall_s']:.1f} s wall | hpcinfer {hp['tokens'] / hp['window_s']:,.0f} tok/s "
        f"{hp['wall_s']:.1f} s wall"
    )
    for extra in sides[2:]:
        b = results[extra][-1]
        line += f" | {extra} {b['tokens'] / b['window_s']:,.0f} tok/s {b['wall_s']:.1f} s wall"
    print(f"{line} | tok/s ratio {raw['window_s'] / hp['window_s']:.3f} | load {raw['load']}")
    for side in sides:
        if "split" in results[side][-1]:
            print(split_line(side, results[side][-1]))
    sys.stdout.flush()


def arrangement(order: List[str], runs: List[dict]) -> str:
    """How a pair's runs were arranged: one after the other, or at the same time on which cores,
    with how well their windows lined up (raw's first: the others' start and end against it)."""
    if "cpus" not in runs[0]:
        return " then ".join(order)
    where = ", ".join(f"{s} on {','.join(map(str, r['cpus']))}" for s, r in zip(order, runs))
    timed = [(s, r["window_at"]) for s, r in zip(order, runs) if "window_at" in r]
    if len(timed) < 2:
        return f"together: {where}"
    (_, (s0, e0)), *others = sorted(timed, key=lambda x: x[0] != "raw")
    apart = "; ".join(f"{s} began {w[0] - s0:+.1f} s, ended {w[1] - e0:+.1f} s" for s, w in others)
    return f"together: {where}; windows overlap {overlap([w for _, w in timed]):.0%}, {apart}"


def split_differences(raw: List[dict], side: List[dict]) -> str:
    """Per pair, the side's start (to engine + engine start-up) and after minus raw's: medians,
    ranges; and the start's by which of the two went first (the second process to start on a
    machine may pay for the first one's exit: with only one order, that cost is all one side's)."""

    def start(r: dict) -> float:
        return r["split"]["to_engine_s"] + r["split"]["engine_s"]

    def stats(d: List[float]) -> str:
        return f"median {statistics.median(d):+.2f} s ({min(d):+.1f} to {max(d):+.1f})"

    starts = [start(h) - start(r) for r, h in zip(raw, side, strict=True)]
    afters = [h["split"]["after_s"] - r["split"]["after_s"] for r, h in zip(raw, side, strict=True)]
    went_first = [
        h["position"] < r["position"] if "position" in h and "position" in r else None for r, h in zip(raw, side)
    ]
    out = f"start {stats(starts)}, after {stats(afters)}"
    if any(f is not None for f in went_first):  # sequential pairs (concurrent ones start together)
        by_order = []
        for label, first in (("it went first", True), ("raw went first", False)):
            d = [x for x, f in zip(starts, went_first) if f is first]
            by_order.append(f"{label}: {stats(d)}, {len(d)} pairs" if d else f"{label}: no pair")
        out += f"\n  start minus raw's where {'; where '.join(by_order)}"
    parts = [(start_parts(r), start_parts(h)) for r, h in zip(raw, side)]
    if all(r and h for r, h in parts):  # runs that recorded their `import vllm`
        names = ("import vllm", "LLM()", "the rest")
        out += "\n  start minus raw's by part: " + ", ".join(
            f"{name} {stats([h[k] - r[k] for r, h in parts])}" for k, name in enumerate(names)
        )
    return out


def start_parts(r: dict) -> Optional[tuple]:
    """A run's start as (`import vllm`, `LLM()`, the rest), or None where it did not record its
    import. hpcinfer's rank imports vLLM inside its engine start-up; raw imports it before."""
    imp = (r.get("startup") or {}).get("import_seconds")
    if imp is None:
        return None
    sp = r["split"]
    if "to_rank_s" in r:  # hpcinfer: the rest is submit, planning and the rank up to its engine
        return imp, sp["engine_s"] - imp, sp["to_engine_s"]
    return imp, sp["engine_s"], sp["to_engine_s"] - imp  # raw: the rest is the interpreter, the prompts read


def concurrent_summary(raw: List[dict], side: List[dict], ratios: List[float]) -> str:
    """Pairs run at the same time: how well the windows lined up, and the ratios by the side's
    cores (a difference between the shares shows as a difference between these)."""
    overlaps = [overlap([r["window_at"], h["window_at"]]) for r, h in zip(raw, side)]
    by_cores: Dict[str, List[float]] = {}
    for h, x in zip(side, ratios):
        by_cores.setdefault(",".join(map(str, h["cpus"])), []).append(x)
    cores = "; ".join(
        f"on cores {c}: median {statistics.median(x):.3f} ({len(x)} pairs)" for c, x in sorted(by_cores.items())
    )
    return f"windows overlap median {statistics.median(overlaps):.1%} (min {min(overlaps):.1%}); ratio {cores}"


def pooled(files: Sequence[str]) -> Dict[str, List[dict]]:
    """The pairs of several runs' --json files (e.g. one per device call) as one list per side; the
    runs must have measured the same thing: rows, tokens, engine arguments and sides."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    key = [
        (r["args"]["rows"], r["args"]["max_tokens"], r["engine_args"], sorted(r["results"]), r["args"].get("mode"))
        for r in runs
    ]
    bad = [f for f, k in zip(files, key) if k != key[0]]
    if bad:
        sys.exit(
            f"--report: {', '.join(bad)} measured something else than {files[0]} (rows, tokens, engine, sides, mode)"
        )
    for r in runs:  # runs from before "position" was recorded: pair i of a run started at rotation i
        if r["args"].get("mode", "sequential") != "sequential":
            continue  # concurrent pairs: no side went first
        sides = list(r["results"])
        for side in sides:
            for i, x in enumerate(r["results"][side]):
                x.setdefault("position", (sides.index(side) - i) % len(sides))
    return {side: [x for r in runs for x in r["results"][side]] for side in runs[0]["results"]}


def report(results: Dict[str, List[dict]], end: str = "") -> None:
    """The summary over the pairs: each side's tokens/s and walls, then each side's ratios to raw."""
    sides = list(results)
    tokens = results["raw"][0]["tokens"]
    print(f"\nvLLM {results['raw'][0]['vllm']}; {tokens:,} output tokens per run{end}")
    print("\n| side | generation tok/s (per pair) | median | wall s (per pair) | median |")
    print("| --- | --- | ---: | --- | ---: |")
    for s in sides:
        tps = [r["tokens"] / r["window_s"] for r in results[s]]
        walls = [r["wall_s"] for r in results[s]]
        print(
            f"| {s} | {' / '.join(f'{x:,.0f}' for x in tps)} | {statistics.median(tps):,.0f} | "
            f"{' / '.join(f'{x:.1f}' for x in walls)} | {statistics.median(walls):.1f} |"
        )
    for s in sides[1:]:
        tok = [r["window_s"] / h["window_s"] for r, h in zip(results["raw"], results[s], strict=True)]
        wall = [r["wall_s"] / h["wall_s"] for r, h in zip(results["raw"], results[s], strict=True)]
        med = statistics.median(tok)
        print(f"\n{s} (window to its {results[s][0].get('window_end', 'last output')}):")
        print(f"  tokens/s ratio {s}/raw: {describe(tok)}: {'met' if med >= 0.98 else 'NOT met'} (target >= 0.98)")
        print(f"  wall ratio raw/{s}:     {describe(wall)}")
        if s == "engine":
            continue
        lags = [r["durable_lag_s"] for r in results[s] if r["durable_lag_s"]]
        if lags:
            print(f"  last output -> its shard durable: median {statistics.median(lags) * 1000:.0f} ms")
        print(f"  per-pair tokens/s ratios: {' '.join(f'{x:.3f}' for x in tok)}")
        if all("cpus" in r and "window_at" in r for r in results["raw"] + results[s]):
            print(f"  at the same time: {concurrent_summary(results['raw'], results[s], tok)}")
        if all("split" in r for r in results["raw"] + results[s]):
            print(f"  per pair, {s} minus raw: {split_differences(results['raw'], results[s])}")
        fixed = {k: statistics.median(r[k] for r in results[s]) for k in ("to_rank_s", "engine_s", "finalize_s")}
        print(
            f"  medians: submit to rank start {fixed['to_rank_s']:.2f} s, engine start-up {fixed['engine_s']:.2f} s, "
            f"rank end to summary {fixed['finalize_s']:.2f} s"
        )
    if "base" in results:
        ratio = [b["window_s"] / h["window_s"] for b, h in zip(results["base"], results["hpcinfer"], strict=True)]
        print(f"\ntokens/s ratio hpcinfer/base: {describe(ratio)}")


def save(a: argparse.Namespace, engine_args: dict, results: Dict[str, List[dict]]) -> None:
    """Every run's numbers so far (rewritten after each pair: a cut run keeps what it took)."""
    tmp = Path(f"{a.json}.tmp")
    tmp.write_text(json.dumps({"args": vars(a), "engine_args": engine_args, "results": results}, indent=1))
    os.replace(tmp, a.json)


def gpu_pids() -> Optional[set]:
    """The processes holding a GPU now (nvidia-smi), or None without nvidia-smi (CPU)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    r = subprocess.run([smi, "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True)
    return {p.strip() for p in r.stdout.splitlines() if p.strip()} if r.returncode == 0 else set()


def settle(before: Optional[set], limit_s: float = 30.0) -> float:
    """Before a timed run: wait until no process holds the GPU but those that held it before the
    benchmark began (`before`; the previous run's engine core may still be freeing its memory
    after its parent exited), so that neither side starts while the other's teardown runs; the
    seconds waited (0 on CPU, where the runs' processes have ended when subprocess.run returns)."""
    t0 = time.monotonic()
    while before is not None and time.monotonic() - t0 < limit_s and (gpu_pids() or set()) - before:
        time.sleep(0.2)
    return time.monotonic() - t0


def rounds(kinds: Sequence[str], first: int, count: int, budget_s: Optional[float], began: float, what: str = "pair"):
    """Rounds first..first+count-1 as (i, the kinds in the order they run): the order rotates by
    one each round (so each kind goes first in turn, across calls too, by `first`). No round starts
    that would end past `budget_s` from `began`, by the longest round so far (the time between
    one yield and the next)."""
    longest = 0.0
    for i in range(first, first + count):
        if budget_s and time.monotonic() - began + longest > budget_s:
            print(f"--budget-s {budget_s:g}: no room for {what} {i} (the longest took {longest:.0f} s)", flush=True)
            return
        t = time.monotonic()
        k = i % len(kinds)
        yield i, list(kinds[k:]) + list(kinds[:k])
        longest = max(longest, time.monotonic() - t)


def split_cores(cpus: Sequence[int], n: int) -> List[List[int]]:
    """`cpus` in `n` equal shares of neighbouring cores, one per side run at the same time (what
    does not divide evenly is left idle). Pure."""
    if len(cpus) < n:
        raise ValueError(f"{n} sides at once need {n} cores or more; this machine offers {len(cpus)}")
    k = len(cpus) // n
    cores = sorted(cpus)
    return [cores[i * k : (i + 1) * k] for i in range(n)]


def overlap(windows: Sequence[Sequence[float]]) -> float:
    """The share of the time any of the windows ran in which all of them ran (1.0: they began and
    ended together). Pure."""
    both = min(e for _, e in windows) - max(s for s, _ in windows)
    return max(0.0, both) / (max(e for _, e in windows) - min(s for s, _ in windows))


def together(calls: Dict[str, Callable[[], dict]], gates: Dict[str, Path], poll_s: float = 0.01) -> Dict[str, dict]:
    """Each side's run in a thread of its own, all launched at once; each waits before its window
    until it finds its gate (`gates[side]`), and the gates open together once every side has said
    that its engine is up (`ready(side, gate)`), so that the windows begin together. Their results
    once all have ended. A side that ends before it is ready (it failed) opens the gates, so the
    others go on; its error (check()'s SystemExit) is raised here."""
    results: Dict[str, dict] = {}
    errors: List[BaseException] = []

    def go(side: str) -> None:
        try:
            results[side] = calls[side]()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go, args=(side,), daemon=True) for side in calls]
    for t in threads:
        t.start()
    while not all(ready(side, gates[side]).exists() for side in gates) and all(t.is_alive() for t in threads):
        time.sleep(poll_s)
    for gate in gates.values():
        gate.touch()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def ready(side: str, gate: Path) -> Path:
    """The file a side writes when its engine is up and it waits at `gate`: a rank's
    (`hpcinfer.rank.worker.wait_at_gate`, rank 0) or a script's (`GATE`)."""
    return Path(f"{gate}.rank0.ready" if side in ("hpcinfer", "base") else f"{gate}.ready")


MODES = ("sequential", "concurrent")


def default_mode(sides: int, devices) -> str:
    """concurrent where there is no GPU and a core for each side; else sequential."""
    return "concurrent" if not devices.gpus and len(devices.cpus) >= sides else "sequential"


def concurrent_shares(sides: int, devices) -> List[List[int]]:
    """`devices`' cores in a share per side (`split_cores`); refused on a GPU machine."""
    if devices.gpus:
        sys.exit("--mode concurrent is for CPU machines: the sides would share the GPU")
    try:
        return split_cores(devices.cpus, sides)
    except ValueError as e:
        sys.exit(f"--mode concurrent: {e}")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description="hpcinfer dp=1 against raw vLLM on the same prompts, in interleaved pairs")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed pairs (at least 5 for a usable interval)")
    ap.add_argument(
        "--warmup-rows",
        type=int,
        default=None,
        help="rows of the untimed warm-up runs (default --rows; 0: none, the caches are warm already)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no pair that would end past this many seconds from the start (by the longest pair so far)",
    )
    ap.add_argument(
        "--first-pair",
        type=int,
        default=0,
        help="number the pairs from here, so that which side goes first alternates on across calls "
        "(a call that goes on from earlier calls' N pairs: N)",
    )
    ap.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="sequential: one side at a time on the whole machine; concurrent: the sides at the same time, "
        "each on its own share of the cores (default: concurrent on a CPU machine with a core per side)",
    )
    ap.add_argument("--model", default="tiny", help="a conf/model name (tiny, tiny_moe, llama, ...)")
    ap.add_argument("--baseline", default=None, help="another checkout's root: run its hpcinfer as a third side")
    ap.add_argument("--engine-side", action="store_true", help="add a side: hpcinfer's engine wrapper alone")
    ap.add_argument("--profile", default=None, help="py-spy collapsed stacks of one extra hpcinfer run to this file")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument(
        "--json",
        default=None,
        help="write every run's numbers to this file, and each run's log to <json stem>/<run>.log",
    )
    ap.add_argument(
        "--set", nargs="*", action="extend", default=[], help="more config overrides, e.g. model.path=/models/m"
    )
    ap.add_argument(
        "--report", nargs="+", default=None, metavar="JSON", help="only report the pairs of these --json files, pooled"
    )
    a = ap.parse_args()
    if a.report:
        report(pooled(a.report))
        return
    EXTRA.extend(a.set)

    from hpcinfer.cli import compose
    from hpcinfer.config import engine_args
    from hpcinfer.planning.devices import detect
    from hpcinfer.planning.models import resolve_model_path

    sides = ["raw", "hpcinfer"] + (["base"] if a.baseline else []) + (["engine"] if a.engine_side else [])
    devices = detect()
    a.mode = a.mode or default_mode(len(sides), devices)
    shares = concurrent_shares(len(sides), devices) if a.mode == "concurrent" else None
    roots = {"hpcinfer": REPO, "base": Path(a.baseline).resolve() if a.baseline else None}
    with tempfile.TemporaryDirectory(prefix="hpcinfer-bench-") as tmp:
        # one vLLM cache (torch.compile artifacts) for every side, warmed by the warm-up runs: without
        # it hpcinfer's ranks get a cache private to their run (model.compile_cache=node) and compile
        # again in every timed run, while raw vLLM reuses ~/.cache/vllm
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
        data, warm = Path(tmp) / "prompts.parquet", Path(tmp) / "warmup.parquet"
        write_prompts(data, a.rows)
        write_prompts(warm, a.warmup_rows or a.rows)
        cfg = compose(overrides(a.model, data, a.max_tokens))
        args = engine_args(cfg, resolve_model_path(cfg.model.builtin, cfg.model.path, cfg.cache_path, build=True))
        print(f"engine_args {json.dumps(args)}")
        print(f"{a.rows} prompts x {a.max_tokens} tokens, {a.repeats} pair(s), sides {', '.join(sides)}")
        if shares:
            print(f"{a.mode}: the sides run at the same time, on the cores {' and '.join(map(str, shares))} in turn")
        else:
            print(f"{a.mode}: one side at a time on the whole machine, in turn")
        print(f"load average at start: {loadavg()}", flush=True)

        logs = Path(a.json).with_suffix("") if a.json else None  # each run's log: <json>/<run>.log

        def run(
            side: str, prompts: Path, name: str, cpus: Optional[List[int]] = None, gate: Optional[Path] = None
        ) -> dict:
            log = logs / f"{name}.log" if logs else None
            if side == "raw":
                return run_raw(args, prompts, a.max_tokens, log, cpus, gate)
            if side == "engine":
                return run_engine(args, a.model, prompts, a.max_tokens, cpus, gate)
            run_dir = Path(tmp) / name
            return run_hpcinfer(roots[side], a.model, prompts, a.max_tokens, run_dir, log=log, cpus=cpus, gate=gate)

        began, on_gpu_before = time.monotonic(), gpu_pids()

        # a baseline from before the rank's start gate cannot wait at one: it starts when it is up
        gated = [s for s in sides if s != "base" or START_GATE in (roots["base"] / WORKER).read_text()]

        def run_together(name: str, prompts: Path, cores: Dict[str, List[int]]) -> Dict[str, dict]:
            gates = {s: Path(tmp) / f"gate-{name}-{s}" for s in gated}
            calls = {s: (lambda s=s: run(s, prompts, f"{name}-{s}", cores[s], gates.get(s))) for s in sides}
            done = together(calls, gates)
            for s, r in done.items():
                r["cpus"] = cores[s]
            return done

        if a.warmup_rows == 0:
            print("no warm-up runs (--warmup-rows 0): the caches must be warm already", flush=True)
        elif shares:
            t0 = time.monotonic()
            run_together("warm", warm, dict(zip(sides, shares)))
            print(f"warm-up, the sides together: {time.monotonic() - t0:.1f} s (untimed)", flush=True)
        else:
            for side in sides:
                t0 = time.monotonic()
                run(side, warm, f"warm-{side}")
                print(f"warm-up {side}: {time.monotonic() - t0:.1f} s (untimed)", flush=True)

        results: Dict[str, List[dict]] = {s: [] for s in sides}
        try:
            for i, order in rounds(sides, a.first_pair, a.repeats, a.budget_s, began):
                if shares:  # the core shares go round the sides as the order does in sequence
                    done = run_together(f"run{i}", data, dict(zip(order, shares)))
                else:
                    done = {}
                    for side in order:
                        waited = settle(on_gpu_before)
                        done[side] = {**run(side, data, f"run{i}-{side}"), "settled_s": round(waited, 2)}
                        done[side]["position"] = order.index(side)
                for side in sides:
                    done[side]["load"] = loadavg()
                    results[side].append(done[side])
                report_pair(i, order, sides, results)
                if a.json:
                    save(a, args, results)
        except KeyboardInterrupt:  # timeout -s INT: report the complete pairs
            complete = min(len(results[s]) for s in sides)
            print(f"interrupted: {complete} complete pair(s)", flush=True)
            for side in sides:
                del results[side][complete:]
        if not results["raw"]:
            sys.exit("no complete pair")

        report(results, f"; load average at end: {loadavg()}")
        if a.json:
            save(a, args, results)
        if a.profile:
            argv = [a.py_spy, "record", "--subprocesses", "--idle", "--format", "raw", "--rate", "200"]
            argv += ["-o", a.profile, "--", *hpcinfer_argv(a.model, data, a.max_tokens, Path(tmp) / "profiled")]
            r = subprocess.run(argv, cwd=REPO, env=hpcinfer_env(REPO), capture_output=True, text=True, check=False)
            check(r, "the profiled hpcinfer run")
            print(f"\npy-spy profile of one more hpcinfer run: {a.profile}")


if __name__ == "__main__":
    main()
