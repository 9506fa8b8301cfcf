"""Prefix placement on real vLLM (CPU, the built-in tiny model): a documents x questions input,
ordered question-major, run at dp=2 with schedule.prefix=on and =off (at once: their start-ups
overlap) gives identical results.parquet, every row once, in input order. The prefill it saves
is measured by bench/prefix.py (docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO  # noqa: F401  (the repository the commands run in)
from test_request_forms import _fast, _run_all

pytestmark = pytest.mark.vllm

D, Q, MAX_TOKENS = 3, 4, 6


def test_placement_on_and_off_give_identical_results(tmp_path, cli_env):
    words = ["river", "stone", "cloud", "lamp", "forest", "engine", "paper", "glass"]
    docs = [" ".join(words[(d * 3 + i * (d + 1)) % len(words)] for i in range(120)) for d in range(D)]
    prompts = [f"Document {d}: {docs[d]}\nQuestion {q}: what is item {q}?" for q in range(Q) for d in range(D)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(D * Q)), "prompt": prompts}), path)
    runs = {mode: tmp_path / mode for mode in ("on", "off")}
    common = ["dp=2", "data.shard_rows=2", f"data.input={path}", "sampling=greedy", f"sampling.max_tokens={MAX_TOKENS}"]
    _run_all(
        {
            mode: [sys.executable, "-m", "hpcinfer.submit", *common, f"schedule.prefix={mode}", f"run_dir={d}"]
            for mode, d in runs.items()
        },
        _fast(cli_env),
    )
    on, off = (pq.read_table(runs[m] / "results.parquet") for m in ("on", "off"))
    assert on.equals(off)
    assert on.column("id").to_pylist() == list(range(D * Q))  # every row once, in input order
    assert on.column("prompt").to_pylist() == prompts
    assert all(e is None for e in on.column("error").to_pylist())
    s_on, s_off = (json.loads((runs[m] / "summary.json").read_text()) for m in ("on", "off"))
    assert s_on["prefix"]["placed"] is True and s_off["prefix"] is None
    assert s_on["engine_args"]["enable_prefix_caching"] is True
    assert (runs["on"] / "inputs" / "placement.npy").exists()
