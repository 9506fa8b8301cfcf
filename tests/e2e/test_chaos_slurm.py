"""Exactly once on a real Slurm cluster: a preemption signal (USR2) requeues the job and it resumes
from the durable parts; a lost node (its slurmd dead, its rank stopped) is requeued elsewhere and
the run completes; a killed rank process restarts in place. Each run's results equal the session's undisturbed chaos
reference (conftest.chaos_reference)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

import pyarrow.parquet as pq
import pytest
from conftest import REPO, busy_rank, chaos_args
from test_slurm import scontrol_job, submit_in_background

pytestmark = [pytest.mark.vllm, pytest.mark.slurm]


def test_preemption_signal_requeues_and_resumes(chaos_inputs, tmp_path, slurm_env, chaos_reference):
    run_dir = tmp_path / "run"
    proc = submit_in_background(slurm_env, chaos_args(chaos_inputs, run_dir, "dp=2"), run_dir)
    busy_rank(run_dir, 0, 24, proc)
    job = json.loads((run_dir / "jobs.json").read_text())["submissions"][-1]["workers"][0]
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_env, check=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "Restarts=1" in scontrol_job(job, slurm_env)
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(r["attempts"] == 2 for r in summary["ranks"]), summary["ranks"]
    assert summary["rows_recomputed"] <= 2 * 8
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob(f"{job}_*_log.out"))
    assert "this job is preempted" in log


def test_killed_node_is_requeued_and_the_run_completes(chaos_inputs, tmp_path, slurm_env, chaos_reference):
    """The node of rank 1 is lost: its slurmd dies and its rank makes no more progress (stopped;
    killed once the run is over: the node never comes back). The job cannot end until Slurm
    declares the node dead (~16 s), requeues the job, and the rerun on other nodes completes."""
    run_dir = tmp_path / "run"
    proc = submit_in_background(slurm_env, chaos_args(chaos_inputs, run_dir, "dp=2"), run_dir)
    rank = busy_rank(run_dir, 1, 4, proc)
    victim = rank["host"]
    script = str(REPO / "slurm" / "cluster.sh")
    subprocess.run(["bash", script, "kill-node", victim], env=slurm_env, check=True, capture_output=True)
    os.kill(rank["pid"], signal.SIGSTOP)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank["pid"], signal.SIGKILL)
        subprocess.run(["bash", script, "revive-node", victim], env=slurm_env, capture_output=True)
    assert proc.returncode == 0, err
    job = json.loads((run_dir / "jobs.json").read_text())["submissions"][-1]["workers"][0]
    assert "Restarts=1" in scontrol_job(job, slurm_env)
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert victim not in {r["host"] for r in summary["ranks"]}  # the rerun went to other nodes


def test_killed_rank_process_in_a_slurm_task_restarts_in_place(chaos_inputs, tmp_path, slurm_env, chaos_reference):
    run_dir = tmp_path / "run"
    args = chaos_args(chaos_inputs, run_dir, "dp=2", "rank_retries=1")
    proc = submit_in_background(slurm_env, args, run_dir)
    os.kill(busy_rank(run_dir, 0, 16, proc)["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert pq.read_table(run_dir / "results.parquet").equals(chaos_reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {r["rank"]: r["attempts"] for r in summary["ranks"]} == {0: 2, 1: 1}
    assert summary["rows_recomputed"] <= 8
    assert "restarting it" in "".join(p.read_text() for p in (run_dir / "slurm").glob("*_0_log.out"))
