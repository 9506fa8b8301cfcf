"""Layout sweeps: `submit -m` puts each run in the sweep directory; `report` compares them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import bare_plan

from hpcinfer.report import best, report, table
from hpcinfer.rundir.paths import RunDir


def fake_run(root, name, tp, dp, tps, kind="cuda"):
    rd = RunDir(root / name)
    rd.create()
    (rd.path / "config.yaml").write_text("{}\n")
    plan = dataclasses.replace(bare_plan(dp, kind=kind, per_rank=tp), rows=100)
    rd.plan.write_text(json.dumps(plan.to_json()))
    if tps is not None:
        rd.summary.write_text(json.dumps({"output_tokens_per_second": tps, "wall_seconds": 12.5}))


def test_report_names_the_best_layout_per_gpu(tmp_path):
    fake_run(tmp_path, "0", 1, 2, 1000.0)  # 500 per GPU
    fake_run(tmp_path, "1", 2, 1, 1200.0)  # 600 per GPU
    fake_run(tmp_path, "2", 1, 4, None)  # still running
    fake_run(tmp_path, "10", 1, 1, 550.0)
    out = report(str(tmp_path))
    assert [r["run"] for r in out["rows"]] == ["0", "1", "2", "10"]
    assert out["best"]["layout"] == "tp=2 pp=1 dp=1" and "600 output tok/s per GPU" in out["verdict"]
    assert "| 2 | tp=1 pp=1 dp=4 | 4 | unfinished | - | - | - |" in out["table"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["table"] in (tmp_path / "report.md").read_text()


def test_no_finished_run_has_no_best(tmp_path):
    fake_run(tmp_path, "0", 1, 1, None)
    out = report(str(tmp_path))
    assert out["best"] is None and not (tmp_path / "report.png").exists()
    assert best([]) is None and "CPU worker" in table([])


@pytest.mark.vllm
def test_multirun_sweep_then_report(tmp_path, cli_env):
    r = subprocess.run(
        [sys.executable, "-m", "hpcinfer.submit", "-m", "dp=1,2", "data.demo_rows=40", "sampling.max_tokens=8"],
        cwd=tmp_path,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert sorted(p.name for p in sweep.iterdir() if (p / "summary.json").exists()) == ["0", "1"]
    assert f"python -m hpcinfer.report {sweep.relative_to(tmp_path)}" in r.stderr
    rep = subprocess.run(
        [sys.executable, "-m", "hpcinfer.report", str(sweep)], env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert rep.returncode == 0, rep.stderr
    assert "best layout: tp=1 pp=1 dp=" in rep.stdout and (sweep / "report.png").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "hpcinfer.report", str(tmp_path / "nothing")],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "holds no hpcinfer runs" in bad.stderr
