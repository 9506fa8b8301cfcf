"""Start-up: one short run end to end with vLLM's model-info cache warm on the node, and cold.

    .venv/bin/python bench/startup.py [--rows 64] [--max-tokens 16] [--repeats 3] [--model tiny]
        [--dp 1] [--baseline DIR]

vLLM learns a model class (`_ModelInfo`: is it multimodal, does it take token ids, ...) once and
keeps it in `<VLLM_CACHE_ROOT>/modelinfos`; on a miss it starts a Python process that imports
vLLM and the model's module to learn it. hpcinfer gives each run its own node-local vLLM cache
(`model.compile_cache=node`), whose `modelinfos/` is now a link to the node's one, shared by its
runs. Sides, each `python -m hpcinfer.submit dp=<--dp>` on the same prompts:

- warm: as hpcinfer runs now (the node's `modelinfos/` filled by the warm-up);
- cold: that folder removed before the run: what every rank of every run paid before, since
  each run's cache was private;
- base (with `--baseline DIR`): hpcinfer from another checkout (the code before a change:
  `git archive <commit> hpcinfer conf | tar -x -C DIR`), as it runs there.

One untimed warm-up per side, then `--repeats` rounds, the sides' order rotating each round.
Every side gets one scratch folder (`TMPDIR`, so `cluster.local_scratch`'s default) private to
this benchmark. Reported per run: end-to-end wall (the submit process, start to exit), the CPU
time of the submit and every process it waited for (its ranks, and on CPU the process they are
forked from: launch/forkserver.py) and rank 0's engine start (process start to its first
request); per round the wall ratio cold/warm (> 1: the shared cache is faster); over the rounds
the median, min-max and a bootstrap interval. `--dp 2` starts two ranks (on CPU, the second is
what the fork server saves: compare with a baseline before it). Last line: `startup_wall_ratio=X`
(cold / warm, median).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import describe, loadavg, run_hpcinfer, write_prompts  # noqa: E402

from hpcinfer.rank.staging import CACHE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="another checkout of hpcinfer: a third side")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpcinfer-startup-"))
    os.environ["TMPDIR"] = str(work / "scratch")  # the node's scratch, private to this benchmark
    os.environ.pop("VLLM_CACHE_ROOT", None)
    (work / "scratch").mkdir()
    data = work / "prompts.parquet"
    write_prompts(data, args.rows)
    modelinfos = work / "scratch" / CACHE / "modelinfos"
    roots = {"warm": REPO, "cold": REPO}
    if args.baseline:
        roots["base"] = Path(args.baseline).resolve()
    sides = list(roots)
    runs = 0

    def run(side: str) -> Dict[str, float]:
        nonlocal runs
        runs += 1
        if side == "cold":
            shutil.rmtree(modelinfos, ignore_errors=True)
        out = run_hpcinfer(roots[side], args.model, data, args.max_tokens, work / f"run-{runs}", [f"dp={args.dp}"])
        shutil.rmtree(work / f"run-{runs}")
        return out

    try:
        print(f"load {loadavg()}; warm-up: {', '.join(sides)}", flush=True)
        for side in sides:
            run(side)
        results: Dict[str, List[Dict[str, float]]] = {s: [] for s in sides}
        for i in range(args.repeats):
            order = sides[i % len(sides) :] + sides[: i % len(sides)]
            for side in order:
                results[side].append(run(side))
            line = ", ".join(
                f"{s} wall {results[s][-1]['wall_s']:.1f} s, cpu {results[s][-1]['cpu_s']:.1f} s "
                f"(engine start {results[s][-1]['engine_s']:.1f} s)"
                for s in sides
            )
            print(f"round {i} ({', '.join(order)}): {line}", flush=True)
        for s in sides:
            walls = [r["wall_s"] for r in results[s]]
            engines = [r["engine_s"] for r in results[s]]
            cpus = [r["cpu_s"] for r in results[s]]
            print(
                f"{s}: wall median {statistics.median(walls):.1f} s ({min(walls):.1f}-{max(walls):.1f}), "
                f"cpu median {statistics.median(cpus):.1f} s ({min(cpus):.1f}-{max(cpus):.1f}), "
                f"engine start median {statistics.median(engines):.1f} s ({min(engines):.1f}-{max(engines):.1f})"
            )
        ratios = [c["wall_s"] / w["wall_s"] for c, w in zip(results["cold"], results["warm"])]
        print(f"wall cold/warm: {describe(ratios)}")
        if args.baseline:
            for what in ("wall", "cpu"):
                pairs = zip(results["base"], results["warm"])
                print(f"{what} base/warm: {describe([b[f'{what}_s'] / w[f'{what}_s'] for b, w in pairs])}")
        print(f"load {loadavg()}")
        print(f"startup_wall_ratio={statistics.median(ratios):.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
