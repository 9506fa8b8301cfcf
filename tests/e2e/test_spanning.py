"""A replica spanning "nodes" on real vLLM (CPU build): `submit tp=2 cluster.gpus_per_node=1` runs
rank 0 as two processes on this machine, the leader (`hpcinfer.worker`, nnodes=2 node_rank=0) and
a headless one (`hpcinfer.headless`, node_rank=1), joined through vLLM's multiprocessing backend
over gloo, exactly as two Slurm nodes would be. The headless process must end on its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.vllm

ROWS, MAX_TOKENS = 24, 8


@pytest.fixture(scope="module")
def spanning_run(hpcinfer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "spanning"
    proc = hpcinfer(
        "submit",
        "tp=2",
        "cluster.gpus_per_node=1",
        "sampling=greedy",
        f"sampling.max_tokens={MAX_TOKENS}",
        f"data.demo_rows={ROWS}",
        f"run_dir={run_dir}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_every_row_once_in_order(spanning_run):
    results = pq.read_table(spanning_run / "results.parquet")
    assert results.column("id").to_pylist() == list(range(ROWS))
    assert results.column("error").null_count == ROWS
    assert all(0 < n <= MAX_TOKENS for n in results.column("output_tokens").to_pylist())


def test_leader_and_headless_formed_one_engine_and_the_headless_left_by_itself(spanning_run):
    leader = (spanning_run / "logs" / "rank-0.log").read_text()
    headless = (spanning_run / "logs" / "rank-0-node-1.log").read_text()
    assert "node_rank=0" in leader  # vLLM: "DP group leader: node_rank=0, ..."
    assert "headless node 1 of 2 (cpu ['1'])" in headless
    assert "world_size=2 rank=1" in headless  # this node's worker is TP rank 1 of the replica
    assert "leader of rank 0 ended (done): headless node 1 exits" in headless


def test_every_node_runs_the_leaders_scheduler_limits(spanning_run):
    """vLLM's defaults depend on how the engine is made (its `LLM` class or not); a node whose
    profile run used another batch size than the leader's hangs in the first collective (2x H200)."""

    def limits(log):
        return re.findall(r"max_num_batched_tokens=(\d+)", (spanning_run / "logs" / log).read_text())

    leader, headless = limits("rank-0.log"), limits("rank-0-node-1.log")
    assert leader and headless and set(leader) == set(headless), (leader, headless)


def test_greedy_text_equals_one_tp2_engine_in_one_process(spanning_run):
    """Two "nodes" compute what one tp=2 engine computes (fp32; a sum of two partials is exact)."""
    s = json.loads((spanning_run / "summary.json").read_text())
    assert s["engine_args"]["tensor_parallel_size"] == 2 and "nnodes" not in s["engine_args"]
    rows = pq.read_table(spanning_run / "results.parquet").to_pylist()
    script = f"""
import json, os, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(**json.loads(sys.argv[1]))
    outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens={MAX_TOKENS}), use_tqdm=False)
    print("RESULT", json.dumps([o.outputs[0].text for o in outs]), flush=True)
    llm.llm_engine.engine_core.shutdown()  # its processes hold our stdout: end them before leaving
    os._exit(0)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # its engine core in this process: one process fewer to start
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(s["engine_args"]), json.dumps([r["prompt"] for r in rows])],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert [r["generated_text"] for r in rows] == json.loads(raw[len("RESULT ") :])
