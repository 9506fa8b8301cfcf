"""Where a rank's start-up goes against raw vLLM's: start-only runs of three kinds, interleaved.

    python bench/start_gap.py [--model tiny] [--rows 2000] [--repeats 3] [--no-warmup] [--budget-s S] [--json F]
        [--set model.path=/tmp/llama-8b ...]

Issue 18: on the GPU hpcinfer's rank took ~7 s longer than raw vLLM from its process's start to
its engine's first request, and the pairs of bench/overhead.py (2 minutes of generation each)
are too dear to find out why. Here every run starts an engine and stops; the kinds:

- raw: `python -c` that imports vLLM and builds `LLM(**engine_args)` (overhead.py's raw side);
- rank: the same code started as the local launcher starts a rank: the rank's environment
  (launch/env.py `rank_env`, hpcinfer's PYTHONPATH), a new session, its output to a file, and
  first what the rank imports before vLLM (`hpcinfer.rank.worker`: pyarrow, omegaconf, ...);
- hpcinfer: `python -m hpcinfer.submit` with max_tokens=1 over `--rows` prompts (the whole
  path: planning, the rank with its claimer and heartbeat threads, finalize).

Per run, from the run's own clock and vLLM's log lines (1 s resolution):
pre (process launched to `import vllm`; hpcinfer: submit launched to the rank's engine),
import (`import vllm`), LLM() split into to-core (the call to the engine core process's first log
line: config, tokenizer, the fork), weights, init engine (vLLM's own numbers) and the rest
(the engine core's other work and the handshake). The report: each part's median per kind, and
per round each kind's start minus raw's. One untimed warm-up of raw and of hpcinfer first (the
torch.compile cache and vLLM's model-info cache, shared by all runs: one VLLM_CACHE_ROOT).
Each run's log is kept in `<json stem>/`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (  # noqa: E402
    EXTRA,
    REPO,
    STOP_CORE,
    check,
    gpu_pids,
    hpcinfer_env,
    keep_log,
    loadavg,
    overrides,
    raw_env,
    rounds,
    run_hpcinfer,
    settle,
    write_prompts,
)

KINDS = ("raw", "rank", "hpcinfer")
PARTS = ("pre_s", "import_s", "llm_s", "to_core_s", "weights_s", "init_engine_s", "rest_s")

START = (
    r"""
import json, os, sys, time
t0 = time.time()
for m in json.loads(sys.argv[2]):
    __import__(m)
t_pre = time.time()
from vllm import LLM
t_imp = time.time()
llm = LLM(**json.loads(sys.argv[1]))
t_llm = time.time()
"""
    + STOP_CORE
    + r"""
print("START_GAP " + json.dumps({"t": [t0, t_pre, t_imp, t_llm]}), flush=True)
os._exit(0)
"""
)

# vLLM's log lines: `(EngineCore pid=1515) INFO 12-03 16:36:28 [file.py:1] ...`; the main process's
# bare where its output is not a terminal (`INFO 12-03 16:36:26 [...]`), prefixed on CPU
LINE = re.compile(r"^(?:\((\w+) pid=\d+\) )?(?:DEBUG|INFO|WARNING|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d) (.*)$", re.M)


def log_times(log: str, year: int) -> Dict[str, float]:
    """Epoch times (1 s resolution, local time as vLLM logs it) of the first line vLLM's main
    process logged in `LLM()` ('non-default args') and of the engine core process's first line. Pure."""
    out: Dict[str, float] = {}
    for m in LINE.finditer(log):
        proc, stamp, rest = m.group(1) or "MainProcess", m.group(2), m.group(3)
        t = datetime.datetime.strptime(f"{year}-{stamp}", "%Y-%m-%d %H:%M:%S").timestamp()
        if proc.startswith("EngineCore"):  # EngineCore, EngineCore_DP0, ...
            out.setdefault("core_up", t)
        elif "non-default args" in rest:
            out.setdefault("llm_call", t)
    return out


def parts(pre: float, imp: float, llm: float, log: str, llm_end: float) -> Dict[str, Optional[float]]:
    """A run's start split (see the module doc), from its clock and its log. Pure but for the year."""
    from hpcinfer.rank.staging import startup_split

    vllm = startup_split(log)
    times = log_times(log, datetime.datetime.fromtimestamp(llm_end).year)
    to_core = times["core_up"] - times["llm_call"] if {"core_up", "llm_call"} <= times.keys() else None
    known = [x for x in (to_core, vllm.get("weights_seconds"), vllm.get("init_engine_seconds")) if x is not None]
    return {
        "pre_s": pre,
        "import_s": imp,
        "llm_s": llm,
        "to_core_s": to_core,
        "weights_s": vllm.get("weights_seconds"),
        "init_engine_s": vllm.get("init_engine_seconds"),
        "rest_s": llm - sum(known) if len(known) == 3 else None,
    }


def run_start(engine_args: dict, rank_like: bool, rank_env: Dict[str, str], log: Path) -> dict:
    """One raw (or rank-like) start: its parts, and its log kept at `log`."""
    pre = ["hpcinfer.rank.worker"] if rank_like else []
    argv = [sys.executable, "-c", START, json.dumps(engine_args), json.dumps(pre)]
    launched = time.time()
    if rank_like:  # as launch/supervisor.py starts a rank: a new session, output to its log file
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            r = subprocess.run(
                argv, env=rank_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        text = log.read_text(errors="replace")
    else:
        r = subprocess.run(argv, env=raw_env(), capture_output=True, text=True, check=False)
        text = r.stdout + r.stderr
        keep_log(log, text)
    check(subprocess.CompletedProcess(argv, r.returncode, "", text), "a start-only run")
    _, t_pre, t_imp, t_llm = json.loads(text.split("START_GAP ")[-1].splitlines()[0])["t"]
    return parts(t_pre - launched, t_imp - t_pre, t_llm - t_imp, text, t_llm)


def run_whole(model: str, data: Path, run_dir: Path, log: Path) -> dict:
    """One hpcinfer run with max_tokens=1: its rank's start, split as the others."""
    r = run_hpcinfer(REPO, model, data, 1, run_dir, log=log)
    server = run_dir / "logs" / "forkserver.log"  # whether the rank was forked (its import then ~0)
    if server.exists():
        with open(log, "a") as f:
            f.write(server.read_text(errors="replace"))
    imp = r["startup"].get("import_seconds", 0.0)
    rank = json.loads((run_dir / "ranks" / "0.json").read_text())
    text = (run_dir / "logs" / "rank-0.log").read_text(errors="replace")
    return parts(r["split"]["to_engine_s"], imp, r["split"]["engine_s"] - imp, text, rank["generation_started_at"])


def the_rank_env() -> Dict[str, str]:
    """The environment the local launcher gives rank 0 of a dp=1 run here."""
    from hpcinfer.launch.env import RankContext, rank_env
    from hpcinfer.planning.devices import detect, split

    devices = detect()
    kind = "cuda" if devices.gpus else "cpu"
    ctx = RankContext(0, 1, 0, ["localhost"], "127.0.0.1", 29500, kind, split(devices, 1, 1)[0])
    return rank_env(hpcinfer_env(REPO), ctx, workers_per_rank=1, cpu_kvcache_gib=1, offline=True)


def start(r: dict) -> float:
    return r["pre_s"] + r["import_s"] + r["llm_s"]


def fmt(xs: List[Optional[float]]) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.median(xs):6.2f}" if xs else "     -"


def report(runs: Dict[str, List[dict]]) -> None:
    print("\nmedians, seconds (" + ", ".join(f"{k}: {len(v)} runs" for k, v in runs.items()) + ")")
    print(f"{'kind':<9}" + "".join(f"{p[:-2]:>13}" for p in ("start_s", *PARTS)))
    for kind, rs in runs.items():
        print(
            f"{kind:<9}"
            + "".join(f"{fmt(v):>13}" for v in [[start(r) for r in rs]] + [[r[p] for r in rs] for p in PARTS])
        )
    for kind in KINDS[1:]:
        d = [start(h) - start(r) for r, h in zip(runs["raw"], runs[kind])]
        if d:
            by = {
                p: [h[p] - r[p] for r, h in zip(runs["raw"], runs[kind]) if h[p] is not None and r[p] is not None]
                for p in PARTS
            }
            print(
                f"{kind} minus raw per round: start median {statistics.median(d):+.2f} s ({min(d):+.2f} to {max(d):+.2f}); "
                + ", ".join(f"{p[:-2]} {statistics.median(v):+.2f}" for p, v in by.items() if v)
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=2000, help="prompts of the hpcinfer kind (its planning reads them)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true", help="no warm-up runs: the caches are warm already")
    ap.add_argument("--budget-s", type=float, default=None, help="start no round that would end past this")
    ap.add_argument("--json", default=None, help="every run's parts; each run's log in <json stem>/")
    ap.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides, e.g. model.path=...")
    a = ap.parse_args()
    EXTRA.extend(a.set)

    from hpcinfer.cli import compose
    from hpcinfer.config import engine_args
    from hpcinfer.planning.models import resolve_model_path

    with tempfile.TemporaryDirectory(prefix="hpcinfer-startgap-") as tmp:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
        data = Path(tmp) / "prompts.parquet"
        write_prompts(data, a.rows)
        cfg = compose(overrides(a.model, data, 1))
        args = engine_args(cfg, resolve_model_path(cfg.model.builtin, cfg.model.path, cfg.cache_path, build=True))
        env = the_rank_env()
        logs = Path(a.json).with_suffix("") if a.json else Path(tmp) / "logs"
        print(f"engine_args {json.dumps(args)}; load average {loadavg()}", flush=True)

        def run(kind: str, name: str) -> dict:
            if kind == "hpcinfer":
                return run_whole(a.model, data, Path(tmp) / name, logs / f"{name}.log")
            return run_start(args, kind == "rank", env, logs / f"{name}.log")

        began, before = time.monotonic(), gpu_pids()
        for kind in () if a.no_warmup else ("raw", "hpcinfer"):
            t0 = time.monotonic()
            run(kind, f"warm-{kind}")
            print(f"warm-up {kind}: {time.monotonic() - t0:.1f} s (untimed)", flush=True)
        runs: Dict[str, List[dict]] = {k: [] for k in KINDS}
        for i, order in rounds(KINDS, 0, a.repeats, a.budget_s, began, what="round"):
            done = {}
            for kind in order:
                settle(before)
                done[kind] = run(kind, f"run{i}-{kind}")
            for kind in KINDS:
                runs[kind].append(done[kind])
            print(
                f"round {i} ({' '.join(order)}): " + ", ".join(f"{k} {start(done[k]):.1f} s" for k in KINDS), flush=True
            )
            if a.json:
                Path(a.json).write_text(json.dumps({"args": vars(a), "engine_args": args, "runs": runs}, indent=1))
        report(runs)


if __name__ == "__main__":
    main()
