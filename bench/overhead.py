"""Overhead of hpcinfer against raw vLLM, measured side by side in one run.

    .venv/bin/python bench/overhead.py [--rows 2000] [--max-tokens 64] [--repeats 3] [--model tiny]
        [--set model.path=/models/m engine.max_model_len=512 ...]   (any further config overrides)

Both sides get the same prompts (Parquet written once), the same engine arguments (hpcinfer's
`engine_args` for this config, printed) and the same rank environment (`ranks.cpu_engine_env` on
CPU, all visible GPUs' first one on GPU), greedy with `ignore_eos` so that both generate exactly
the same number of tokens:

- raw: a fresh process runs `vllm.LLM(**engine_args).generate(prompts, SamplingParams(...))`;
- hpcinfer: `python -m hpcinfer.submit dp=1 data.input=<file> ...` (plan, shard, rank process,
  streaming engine with durable parts, finalize).

Printed per repeat and as medians: output tokens/s during generation (raw: the `generate` call;
hpcinfer: first rank's first row to last rank's last, from summary.json) and end-to-end wall
time (process start to exit, model load included). Ratios are hpcinfer / raw for tokens/s
(target >= 0.98) and raw / hpcinfer for wall time. Runs alternate raw, hpcinfer, raw, ... so
drifts of a noisy machine hit both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RAW = r"""
import json, sys, time
t0 = time.time()
from vllm import LLM, SamplingParams
import pyarrow.parquet as pq
args = json.loads(sys.argv[1])
prompts = pq.read_table(sys.argv[2]).column("prompt").to_pylist()
llm = LLM(**args["engine_args"])
t1 = time.time()
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args["max_tokens"], ignore_eos=True),
                    use_tqdm=False)
t2 = time.time()
core = getattr(llm.llm_engine, "engine_core", None)
if core is not None and hasattr(core, "shutdown"):
    core.shutdown()
print(json.dumps({"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "generate_s": t2 - t1,
                  "load_s": t1 - t0}), flush=True)
import os; os._exit(0)
"""


EXTRA: list[str] = []  # --set overrides, for both sides


def overrides(model: str, data: Path, max_tokens: int, run_dir: Path | None = None) -> list[str]:
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


def raw_env(engine_args: dict) -> dict:
    """The environment a dp=1 hpcinfer rank gets, for the raw side too."""
    from hpcinfer.launch.env import cpu_engine_env
    from hpcinfer.planning.devices import detect, split

    env = dict(os.environ)
    devices = detect()
    if devices.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(split(devices, 1, 1)[0])
    else:
        env.update(cpu_engine_env(os.environ, [str(c) for c in devices.cpus], 1, 1))
    return env


def run_raw(engine_args: dict, data: Path, max_tokens: int) -> dict:
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-c", RAW, json.dumps({"engine_args": engine_args, "max_tokens": max_tokens}), str(data)],
        env=raw_env(engine_args),
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"tok_s": res["tokens"] / res["generate_s"], "wall_s": time.time() - t0, "tokens": res["tokens"]}


def run_hpcinfer(model: str, data: Path, max_tokens: int, run_dir: Path) -> dict:
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "hpcinfer.submit", *overrides(model, data, max_tokens, run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "tok_s": summary["output_tokens_per_second"],
        "wall_s": time.time() - t0,
        "tokens": summary["output_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="hpcinfer dp=1 against raw vLLM on the same prompts")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="tiny", help="a conf/model name (tiny, tiny_moe, llama, ...)")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. model.path=/models/m")
    a = ap.parse_args()
    EXTRA.extend(a.set)

    from hpcinfer.cli import compose
    from hpcinfer.config import engine_args
    from hpcinfer.planning.models import resolve_model_path

    with tempfile.TemporaryDirectory(prefix="hpcinfer-bench-") as tmp:
        data = Path(tmp) / "prompts.parquet"
        write_prompts(data, a.rows)
        cfg = compose(overrides(a.model, data, a.max_tokens))
        args = engine_args(cfg, resolve_model_path(cfg.model.builtin, cfg.model.path, cfg.cache_path, build=True))
        print(f"engine_args {json.dumps(args)}\n{a.rows} prompts x {a.max_tokens} tokens, {a.repeats} repeat(s)")
        results = {"raw": [], "hpcinfer": []}
        for i in range(a.repeats):
            results["raw"].append(run_raw(args, data, a.max_tokens))
            results["hpcinfer"].append(run_hpcinfer(a.model, data, a.max_tokens, Path(tmp) / f"run{i}"))
            assert results["raw"][-1]["tokens"] == results["hpcinfer"][-1]["tokens"], "token counts differ"
            print(
                f"repeat {i}: raw {results['raw'][-1]['tok_s']:,.0f} tok/s {results['raw'][-1]['wall_s']:.1f}s wall | "
                f"hpcinfer {results['hpcinfer'][-1]['tok_s']:,.0f} tok/s {results['hpcinfer'][-1]['wall_s']:.1f}s wall",
                flush=True,
            )
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("tok_s", "wall_s")} for k, v in results.items()}
        tok_ratio = med["hpcinfer"]["tok_s"] / med["raw"]["tok_s"]
        wall_ratio = med["raw"]["wall_s"] / med["hpcinfer"]["wall_s"]
        print("\n| side | output tok/s (median) | wall s (median) |\n| --- | ---: | ---: |")
        for k in ("raw", "hpcinfer"):
            print(f"| {k} | {med[k]['tok_s']:,.0f} | {med[k]['wall_s']:.1f} |")
        print(
            f"\ntokens/s ratio hpcinfer/raw = {tok_ratio:.3f} (target >= 0.98: {'met' if tok_ratio >= 0.98 else 'NOT met'})"
        )
        print(f"wall ratio raw/hpcinfer     = {wall_ratio:.3f} (end to end, model load included)")


if __name__ == "__main__":
    main()
