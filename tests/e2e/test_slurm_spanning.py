"""A rank spanning two Slurm nodes, on the real test cluster (slurm/cluster.sh) and real vLLM (CPU
build): `cluster=slurm_cpu tp=2 cluster.workers_per_node=1` makes one job of 2 nodes x 1 task;
task 0 is the leader (the worker: nnodes=2 node_rank=0, master its own node), task 1 runs
`hpcinfer.headless` on the other node and must leave on its own once the leader is done, so the
job ends COMPLETED instead of running into its time limit."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.slurm]

ROWS = 16


def test_tp2_rank_spanning_two_nodes(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpcinfer.submit",
            "cluster=slurm_cpu",
            "tp=2",
            "cluster.workers_per_node=1",
            "sampling=greedy",
            "sampling.max_tokens=8",
            f"data.demo_rows={ROWS}",
            "wait=true",
            f"run_dir={run_dir}",
        ],
        cwd=REPO,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    results = pq.read_table(run_dir / "results.parquet")
    assert results.column("id").to_pylist() == list(range(ROWS))
    assert results.column("error").null_count == ROWS
    record = json.loads((run_dir / "jobs.json").read_text())["submissions"][-1]
    job = subprocess.run(
        ["scontrol", "show", "job", record["workers"][0]], env=slurm_env, capture_output=True, text=True
    ).stdout
    assert "NumNodes=2" in job and "JobState=COMPLETED" in job, job
    leader = (run_dir / "logs" / "rank-0.log").read_text()
    headless = (run_dir / "logs" / "rank-0-node-1.log").read_text()
    assert "node_rank=0" in leader
    assert "world_size=2 rank=1" in headless
    assert "leader of rank 0 ended (done): headless node 1 exits" in headless
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rows"] == ROWS and [rank["rank"] for rank in summary["ranks"]] == [0]
