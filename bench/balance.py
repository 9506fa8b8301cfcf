"""Balance on a skewed workload: hpcinfer's dynamic schedule against the static contiguous split
of vLLM's examples/offline_inference/data_parallel.py, side by side in one run.

    .venv/bin/python bench/balance.py [--dp 2] [--rows 1024] [--long-share 0.1] [--long-tokens 256]
        [--short-tokens 16] [--model tiny] [--sides raw-static,hpcinfer,hpcinfer-static]
        [--set engine.max_model_len=2048 ...]   (any further config overrides, for every side)

The workload: `rows` prompts; the first `long-share` of them ask for `long-tokens` output tokens,
the rest for `short-tokens` (a per-row `max_tokens` column; greedy, `ignore_eos`, so every side
generates exactly the same tokens). Long requests bunched at the start of the input are what a
contiguous split handles worst, and what real data often looks like (one source's long documents).

Sides (each rank on its own devices, as hpcinfer places them: GPUs, or CPU cores):
- raw-static: `dp` processes, rank r runs `vllm.LLM(**engine_args).generate` over its contiguous
  slice [r*n/dp, (r+1)*n/dp) with the rows' own max_tokens; generation starts together (a file
  barrier after the engines are up), as in vLLM's data_parallel.py.
- hpcinfer: `python -m hpcinfer.submit dp=<dp>` with the default dynamic schedule.
- hpcinfer-static: the same with `schedule.mode=static` (hpcinfer's own contiguous split).

Printed per side: each rank's finish time, the makespan (first generation start to last finish),
the tail = (last rank's finish - median rank's finish) / makespan (target <= 5% for hpcinfer),
output tokens/s; then makespan ratios against raw-static.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import run_static_ranks, static_rank_script  # noqa: E402

RAW_RANK = static_rank_script(
    '[SamplingParams(temperature=0, max_tokens=c, ignore_eos=True) for c in t.column("max_tokens").to_pylist()[lo:hi]]',
    '{"tokens": sum(len(o.outputs[0].token_ids) for o in outs)}',
)


def write_workload(path: Path, rows: int, long_share: float, long_tokens: int, short_tokens: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_long = int(rows * long_share)
    topics = ["rivers", "compilers", "glaciers", "tea", "lighthouses", "trains", "bees", "paper"]
    pq.write_table(
        pa.table(
            {
                "id": list(range(rows)),
                "prompt": [f"Tell me about {topics[i % len(topics)]}, note {i}." for i in range(rows)],
                "max_tokens": pa.array([long_tokens if i < n_long else short_tokens for i in range(rows)], pa.int32()),
            }
        ),
        path,
    )
    return n_long * long_tokens + (rows - n_long) * short_tokens


def common_overrides(a, data: Path) -> list[str]:
    return [
        f"model={a.model}",
        f"data.input={data}",
        "data.max_tokens_column=max_tokens",
        "sampling=greedy",
        f"sampling.max_tokens={max(a.long_tokens, a.short_tokens)}",
        "sampling.ignore_eos=true",
        f"dp={a.dp}",
        *a.set,
    ]


def rank_envs(cfg, dp: int) -> list[dict]:
    """Each rank's environment as hpcinfer's local backend builds it (devices, CPU binding)."""
    from hpcinfer.launch.env import cpu_engine_env
    from hpcinfer.planning.devices import detect, split

    devices = detect()
    out = []
    for devs in split(devices, dp, cfg.gpus_per_rank):
        env = dict(os.environ)
        if devices.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devs)
        else:
            env.update(cpu_engine_env(os.environ, [str(c) for c in devs], cfg.gpus_per_rank, 1))
        out.append(env)
    return out


def run_raw_static(engine_args: dict, envs: list[dict], data: Path, tmp: Path) -> dict:
    barrier = tmp / "barrier"
    barrier.mkdir()
    ranks = run_static_ranks(RAW_RANK, envs, barrier, data=str(data), engine_args=engine_args)
    return {
        "starts": [r["start"] for r in ranks],
        "ends": [r["end"] for r in ranks],
        "tokens": sum(r["tokens"] for r in ranks),
    }


def run_hpcinfer(overrides: list[str], run_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "hpcinfer.submit", *overrides, f"run_dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"hpcinfer failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("*.json"))]
    starts = [r["generation_started_at"] for r in ranks]
    # a rank's finish: its last shard's; a rank that got no shard finished when it started
    ends = [r.get("generation_ended_at") or r["generation_started_at"] for r in ranks]
    return {
        "starts": starts,
        "ends": ends,
        "tokens": summary["output_tokens"],
        "rows": [r["rows"] for r in summary["ranks"]],
    }


def measures(res: dict) -> dict:
    t0 = min(res["starts"])
    finishes = sorted(e - t0 for e in res["ends"])
    makespan = finishes[-1]
    return {
        "finishes": finishes,
        "makespan": makespan,
        "tail": (finishes[-1] - statistics.median(finishes)) / makespan if makespan > 0 else 0.0,
        "tok_s": res["tokens"] / makespan if makespan > 0 else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--long-share", type=float, default=0.1)
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sides", default="raw-static,hpcinfer,hpcinfer-static")
    ap.add_argument("--set", nargs="*", action="extend", default=[], help="more config overrides, for every side")
    a = ap.parse_args()
    sides = a.sides.split(",")

    from hpcinfer.cli import compose
    from hpcinfer.config import engine_args
    from hpcinfer.planning.models import resolve_model_path

    with tempfile.TemporaryDirectory(prefix="hpcinfer-balance-") as tmp:
        tmp = Path(tmp)
        data = tmp / "skewed.parquet"
        tokens = write_workload(data, a.rows, a.long_share, a.long_tokens, a.short_tokens)
        cfg = compose(common_overrides(a, data))
        args = engine_args(cfg, resolve_model_path(cfg.model.builtin, cfg.model.path, cfg.cache_path, build=True))
        print(f"engine_args {json.dumps(args)}")
        print(
            f"{a.rows} prompts: the first {a.long_share:.0%} want {a.long_tokens} output tokens, the rest "
            f"{a.short_tokens}; {tokens:,} output tokens in all; dp={a.dp}\n",
            flush=True,
        )
        results = {}
        for side in sides:
            if side == "raw-static":
                res = run_raw_static(args, rank_envs(cfg, a.dp), data, tmp)
            elif side in ("hpcinfer", "hpcinfer-static"):
                extra = ["schedule.mode=static"] if side == "hpcinfer-static" else []
                res = run_hpcinfer(common_overrides(a, data) + extra, tmp / side)
            else:
                sys.exit(f"unknown side {side!r}")
            if res["tokens"] != tokens:
                sys.exit(f"{side} generated {res['tokens']} tokens, expected {tokens}")
            results[side] = measures(res)
            m = results[side]
            print(
                f"{side}: finishes {[round(f, 1) for f in m['finishes']]} s, makespan {m['makespan']:.1f} s, "
                f"tail {m['tail']:.1%}" + (f", rows per rank {res['rows']}" if "rows" in res else ""),
                flush=True,
            )
        print("\n| side | rank finish times (s) | makespan (s) | tail (last - median) / makespan | output tok/s |")
        print("| --- | --- | ---: | ---: | ---: |")
        for side, m in results.items():
            print(
                f"| {side} | {' / '.join(f'{f:.1f}' for f in m['finishes'])} | {m['makespan']:.1f} | "
                f"{m['tail']:.1%} | {m['tok_s']:,.0f} |"
            )
        if "raw-static" in results:
            for side in results:
                if side != "raw-static":
                    print(
                        f"\nmakespan ratio raw-static / {side} = "
                        f"{results['raw-static']['makespan'] / results[side]['makespan']:.2f}x"
                    )
        if "hpcinfer" in results:
            tail = results["hpcinfer"]["tail"]
            print(f"hpcinfer tail {tail:.1%} of makespan (target <= 5%: {'met' if tail <= 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
