"""model.stage=node on the real Slurm cluster (slurm/cluster.sh: 4 nodes on one machine, sharing
/tmp): each node's scratch is its own (cluster.local_scratch with {node}), two ranks per node on
two nodes: the model is copied once per node, the other rank of the node reuses the copy, and each
rank's start-up split reaches ranks/<r>.json and the summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.slurm]


def test_two_ranks_per_node_on_two_nodes_stage_the_model_once_per_node(tmp_path, slurm_env):
    rows = [{"id": i, "prompt": f"Tell me about the {i}th river."} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    run_dir, scratch = tmp_path / "run", tmp_path / "scratch-{node}"
    r = subprocess.run(
        [sys.executable, "-m", "hpcinfer.submit", "cluster=slurm_cpu", "dp=4", "cluster.ranks_per_node=2"]
        + [f"data.input={tmp_path / 'in.parquet'}", "data.id_column=id", "sampling=greedy", "sampling.max_tokens=4"]
        + ["data.shard_rows=2", "model.stage=node", f"cluster.local_scratch='{scratch}'", f"run_dir={run_dir}"]
        + ["wait=true"],
        cwd=REPO,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    by_node = {}
    for rank in summary["ranks"]:
        by_node.setdefault(rank["host"], []).append(rank)
        assert rank["startup"]["stage_seconds"] >= 0 and "init_engine_seconds" in rank["startup"], rank
        assert rank["startup"]["import_seconds"] > 0, rank  # a Slurm rank imports vLLM itself (no fork server)
    assert sorted(len(v) for v in by_node.values()) == [2, 2], summary["ranks"]  # two nodes, two ranks each
    for node, ranks in by_node.items():
        assert sum(rank["startup"]["staged_here"] for rank in ranks) == 1  # one copy per node
        staged = [p for p in (tmp_path / f"scratch-{node}" / "hpcinfer-models").iterdir() if p.is_dir()]
        assert len(staged) == 1 and (staged[0] / "config.json").exists()
        assert (tmp_path / f"scratch-{node}" / "hpcinfer-vllm-cache").is_dir()  # the run's vLLM cache, node-local
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("scratch-")) == sorted(
        f"scratch-{n}" for n in by_node
    )
    results = pq.read_table(run_dir / "results.parquet")
    assert results.num_rows == 16 and results.column("generated_text").null_count == 0
    record = json.loads((run_dir / "ranks" / "0.json").read_text())
    assert record["startup"] == next(x for v in by_node.values() for x in v if x["rank"] == 0)["startup"]
