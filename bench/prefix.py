"""Prefix-aware placement: documents x questions, ordered question-major, with placement on
against input order (both with vLLM's prefix cache on), and vLLM's static split, side by side.

    .venv/bin/python bench/prefix.py [--docs 16] [--questions 24] [--doc-tokens 400] [--max-tokens 4]
        [--dp 2] [--repeats 2] [--model tiny] [--sides off,on,static] [--kv-blocks N]
        [--set model.path=/models/m engine.max_model_len=4096 ...]   (any further config overrides)

On a GPU (the lead's measurement), e.g.:

    .venv/bin/python bench/prefix.py --model llama --docs 64 --questions 32 --doc-tokens 1500 \\
        --max-tokens 16 --dp 1 --set model.path=/models/Llama-3.1-8B-Instruct engine.max_model_len=4096

The workload: `docs` documents of about `doc-tokens` tokens (random words, measured with the
model's tokenizer), `questions` short questions about each, prompt = "Document: <doc>\\nQuestion:
<q>", rows ordered question-major (all documents' first question, then the second, ...): the order
in which the prefix cache helps least. Greedy, `ignore_eos`, `max-tokens` output tokens per row.

Sides (every one with `enable_prefix_caching=true`):
- off: `hpcinfer submit schedule.prefix=off`: the dynamic schedule over rows in input order;
- on: `hpcinfer submit schedule.prefix=on`: rows placed by prefix (planning/prefix.py);
- static: vLLM's static split (examples/offline_inference/data_parallel.py): `dp` processes,
  rank r runs `vllm.LLM(**engine_args).generate` over its contiguous slice, starting together.

Method (as bench/overhead.py): one untimed warm-up run of `off` (page cache, .pyc files,
compile caches; on `--warmup-docs` documents, default all), every run sharing one vLLM cache
(`VLLM_CACHE_ROOT`, unless set), then `repeats` rounds, each running every side once, the order of the sides
rotating between rounds. Per run: prefill tokens computed (prompt tokens less those vLLM's prefix
cache served: each request's `num_cached_tokens`, summed by the ranks into summary.json's
`cached_tokens`), the makespan (first rank's generation start to last rank's finish), rows/s
and prompt+output tokens/s over it, and the end-to-end wall time (hpcinfer: submit to finalize).
Printed: a table per run, then the medians with min-max, then the ratios off/on and static/on.
`identical`: every run's generated texts equal the `off` run's (the same rows, in input order).
Last line: `prefill_tokens_ratio=X speedup=Y identical=true|false`, X = prefill tokens off / on,
Y = makespan off / on (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import run_static_ranks, static_rank_script  # noqa: E402

WORDS = (
    "river stone cloud lamp forest engine paper glass market winter signal garden copper harbor "
    "letter bridge mirror silver candle meadow thunder ladder pocket violet saddle marble anchor "
    "feather lantern orchard compass blanket crystal shadow timber velvet whistle canyon pebble"
).split()

RAW_RANK = static_rank_script(
    'SamplingParams(temperature=0, max_tokens=args["max_tokens"], ignore_eos=True)',
    '{"texts": [o.outputs[0].text for o in outs], "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs), "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs), "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}',
)


def write_workload(path: Path, docs: int, questions: int, doc_tokens: int, tokenizer, seed: int = 0) -> int:
    """The documents x questions Parquet (question-major); returns the prompt tokens of all rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    texts = []
    for _ in range(docs):
        words = [rng.choice(WORDS) for _ in range(doc_tokens)]
        while len(tokenizer(" ".join(words))["input_ids"]) > doc_tokens and len(words) > 1:
            words = words[: int(len(words) * 0.9)]
        texts.append(" ".join(words))
    prompts, ids = [], []
    for q in range(questions):
        for d in range(docs):
            prompts.append(f"Document: {texts[d]}\nQuestion {q}: which word comes {q + 1} places after the first?")
            ids.append(f"d{d}-q{q}")
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)
    return sum(len(ids) for ids in tokenizer(prompts)["input_ids"])  # one batch: the fast tokenizer's threads


def common(a, data: Path) -> List[str]:
    return [
        f"model={a.model}",
        f"data.input={data}",
        "sampling=greedy",
        f"sampling.max_tokens={a.max_tokens}",
        "sampling.ignore_eos=true",
        f"dp={a.dp}",
        "+engine.enable_prefix_caching=true",
        *([f"+engine.num_gpu_blocks_override={a.kv_blocks}"] if a.kv_blocks else []),
        *a.set,
    ]


def run_hpcinfer(overrides: List[str], run_dir: Path) -> Dict:
    import pyarrow.parquet as pq

    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "hpcinfer.submit", *overrides, f"run_dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"hpcinfer failed:\n{proc.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("*.json"))]
    starts = [r["generation_started_at"] for r in ranks if r.get("generation_started_at")]
    ends = [r.get("generation_ended_at") or r["generation_started_at"] for r in ranks if r.get("generation_started_at")]
    return dict(
        starts=starts,
        ends=ends,
        wall=wall,
        prompt_tokens=s["prompt_tokens"],
        cached_tokens=s.get("cached_tokens", 0),
        tokens=s["output_tokens"],
        texts=pq.read_table(run_dir / "results.parquet").column("generated_text").to_pylist(),
        rows_per_rank=[r["rows"] for r in s["ranks"]],
        # rank 0's start: submit to the rank's start, its engine's start-up (vLLM's split of it)
        startup=f", rank 0 started {ranks[0]['started_at'] - t0:.1f} s after submit, engine start-up "
        f"{ranks[0].get('engine_seconds', 0):.1f} s {ranks[0].get('startup') or ''}",
    )


def run_static(engine_args: dict, envs: List[dict], data: Path, tmp: Path, max_tokens: int) -> Dict:
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=tmp))
    t0 = time.time()
    ranks = run_static_ranks(RAW_RANK, envs, barrier, data=str(data), engine_args=engine_args, max_tokens=max_tokens)
    return dict(
        starts=[r["start"] for r in ranks],
        ends=[r["end"] for r in ranks],
        wall=time.time() - t0,
        prompt_tokens=sum(r["prompt_tokens"] for r in ranks),
        cached_tokens=sum(r["cached_tokens"] for r in ranks),
        tokens=sum(r["tokens"] for r in ranks),
        texts=[t for r in ranks for t in r["texts"]],
        rows_per_rank=[len(r["texts"]) for r in ranks],
    )


def measures(res: Dict, rows: int) -> Dict:
    makespan = max(res["ends"]) - min(res["starts"])
    return dict(
        prefill=res["prompt_tokens"] - res["cached_tokens"],
        cached=res["cached_tokens"],
        makespan=makespan,
        wall=res["wall"],
        rows_s=rows / makespan if makespan > 0 else 0.0,
        tok_s=(res["prompt_tokens"] + res["tokens"]) / makespan if makespan > 0 else 0.0,
    )


def med(values: List[float]) -> str:
    return f"{statistics.median(values):,.2f} ({min(values):,.2f}-{max(values):,.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--doc-tokens", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sides", default="off,on,static")
    ap.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="KV cache blocks per engine (vLLM's num_gpu_blocks_override); default with the tiny model: 16 "
        "(2,048 tokens at CPU's 128 per block: less than a rank's share of the documents, as a real model's "
        "cache is at scale)",
    )
    ap.add_argument(
        "--warmup-docs", type=int, default=None, help="documents of the untimed warm-up run (default --docs)"
    )
    ap.add_argument("--set", nargs="*", action="extend", default=[], help="more config overrides, for every side")
    a = ap.parse_args()
    sides = a.sides.split(",")
    if a.kv_blocks is None and a.model == "tiny":
        a.kv_blocks = 16

    from transformers import AutoTokenizer

    from hpcinfer.cli import compose
    from hpcinfer.config import engine_args
    from hpcinfer.planning.models import resolve_model_path

    sys.path.insert(0, str(REPO / "bench"))
    from balance import rank_envs

    with tempfile.TemporaryDirectory(prefix="hpcinfer-prefix-") as tmp:
        tmp = Path(tmp)
        # one vLLM cache (torch.compile artifacts) for every run, warmed by the warm-up: without it
        # each hpcinfer run compiles again in a cache private to it (model.compile_cache=node)
        os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp / "vllm-cache"))
        data = tmp / "docs_questions.parquet"
        cfg = compose(common(a, data))
        model_path = resolve_model_path(cfg.model.builtin, cfg.model.path, cfg.cache_path, build=True)
        args = engine_args(cfg, model_path)
        prompt_tokens = write_workload(
            data, a.docs, a.questions, a.doc_tokens, AutoTokenizer.from_pretrained(model_path)
        )
        rows = a.docs * a.questions
        print(f"engine_args {json.dumps(args)}")
        print(
            f"{a.docs} documents x {a.questions} questions = {rows} rows, question-major, ~{prompt_tokens:,} prompt "
            f"tokens ({prompt_tokens // rows} per row), {a.max_tokens} output tokens each; dp={a.dp}; "
            f"{os.cpu_count()} CPU(s)\n",
            flush=True,
        )

        def run(side: str, n: int, rows_file: Path = data) -> Dict:
            if side == "static":
                return run_static(args, rank_envs(cfg, a.dp), rows_file, tmp, a.max_tokens)
            return run_hpcinfer(common(a, rows_file) + [f"schedule.prefix={side}"], tmp / f"{side}-{n}")

        warm = data
        if a.warmup_docs and a.warmup_docs != a.docs:
            warm = tmp / "warmup.parquet"
            write_workload(warm, a.warmup_docs, a.questions, a.doc_tokens, AutoTokenizer.from_pretrained(model_path))
        t = time.time()
        run("off", -1, warm)  # warm-up, untimed
        print(f"warm-up run (off) {time.time() - t:.0f} s\n", flush=True)
        results: Dict[str, List[Dict]] = {s: [] for s in sides}
        texts: Dict[str, List] = {}
        for n in range(a.repeats):
            order = sides[n % len(sides) :] + sides[: n % len(sides)]
            for side in order:
                res = run(side, n)
                if res["tokens"] != rows * a.max_tokens:
                    sys.exit(f"{side} generated {res['tokens']} tokens, expected {rows * a.max_tokens}")
                texts.setdefault(side, res["texts"])
                m = measures(res, rows)
                results[side].append(m)
                print(
                    f"round {n} {side:>6}: prefill {m['prefill']:,} tokens (cached {m['cached']:,}), makespan "
                    f"{m['makespan']:.1f} s, wall {m['wall']:.1f} s, {m['rows_s']:.1f} rows/s, {m['tok_s']:,.0f} tok/s, "
                    f"rows per rank {res['rows_per_rank']}{res.get('startup', '')}",
                    flush=True,
                )
        print(
            "\n| side | prefill tokens computed | makespan (s) | end-to-end wall (s) | rows/s | prompt+output tok/s |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for side, ms in results.items():
            print(
                f"| {side} | {med([m['prefill'] for m in ms])} | {med([m['makespan'] for m in ms])} | "
                f"{med([m['wall'] for m in ms])} | {med([m['rows_s'] for m in ms])} | {med([m['tok_s'] for m in ms])} |"
            )
        reference = texts.get("off") or next(iter(texts.values()))
        identical = all(t == reference for t in texts.values())
        for side, t in texts.items():
            if t != reference:
                differ = sum(x != y for x, y in zip(t, reference, strict=True))
                print(f"{side}: {differ} of {rows} rows' texts differ from the first off run's")

        def ratio(key: str, a_side: str, b_side: str) -> float:
            return statistics.median(m[key] for m in results[a_side]) / max(
                1e-9, statistics.median(m[key] for m in results[b_side])
            )

        print()
        for other in [s for s in ("off", "static") if s in results and "on" in results]:
            print(
                f"{other} / on: prefill tokens {ratio('prefill', other, 'on'):.2f}x, makespan "
                f"{ratio('makespan', other, 'on'):.2f}x, end-to-end wall {ratio('wall', other, 'on'):.2f}x"
            )
        if "off" in results and "on" in results:
            print(
                f"prefill_tokens_ratio={ratio('prefill', 'off', 'on'):.2f} "
                f"speedup={ratio('makespan', 'off', 'on'):.2f} identical={'true' if identical else 'false'}"
            )
        else:
            print(f"identical={'true' if identical else 'false'}")


if __name__ == "__main__":
    main()
