"""Layout sweeps on a real Slurm cluster (slurm/cluster.sh), real vLLM (CPU build), real Parquet,
through the real CLI: `submit -m cluster=slurm_cpu dp=1,2` queues one run per layout in one sweep
directory and returns without waiting for them; `report <sweep_dir>` then compares them.

The jobs are submitted held (`+cluster.sbatch.hold=true`, i.e. `sbatch --hold`), so that they
cannot start, let alone finish, while submit runs: a submit that waited for its jobs would time
out instead of returning. The test releases them itself; it touches no other job and no
partition, and cancels whatever of its jobs is left, whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slurm]

FILES, ROWS_PER_FILE = 2, 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def slurm(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)


def queued(env, job_name: str) -> dict:
    """{job id: (state, reason)} of this test's jobs that Slurm still lists as pending or running."""
    out = slurm(env, "squeue", "-h", "-r", "-n", f"{job_name},{job_name}-finalize", "-o", "%i|%T|%r").stdout
    return {i: (s, r) for i, s, r in (line.split("|", 2) for line in out.splitlines() if line.strip())}


def logs(run: Path) -> str:
    """The Slurm task logs of a run, for a failure message."""
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(run.glob("slurm/*.out")))


def test_sweep_queues_without_waiting_then_report_names_the_best_layout(tmp_path, slurm_env):
    data = tmp_path / "data"
    data.mkdir()
    for f in range(FILES):
        rows = [
            {"id": f * 100 + i, "prompt": f"Write a line about river {i} of country {f}.", "n": [i, f]}
            for i in range(ROWS_PER_FILE)
        ]
        pq.write_table(pa.Table.from_pylist(rows), data / f"part-{f}.parquet")
    expected = pa.concat_tables(pq.read_table(data / f"part-{f}.parquet") for f in range(FILES))
    job_name = f"sweeptest{os.getpid()}"  # this test's jobs, and only they, carry this name
    work = tmp_path / "work"  # submit's working directory: Hydra's sweep dir is relative to it
    work.mkdir()
    try:
        t0 = time.time()
        try:
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hpcinfer.submit",
                    "-m",
                    "cluster=slurm_cpu",
                    "dp=1,2",
                    f"data.input={data}/*.parquet",
                    "data.id_column=id",
                    "data.shard_rows=4",
                    "sampling=greedy",
                    "sampling.max_tokens=8",
                    f"cluster.job_name={job_name}",
                    "+cluster.sbatch.hold=true",
                ],
                cwd=work,
                env=slurm_env,
                capture_output=True,
                text=True,
                timeout=180,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"submit -m did not return in {e.timeout} s while its jobs were held: it waits for Slurm "
                f"instead of queueing and returning\n{e.stderr}"
            )
        submit_s = time.time() - t0
        assert r.returncode == 0, r.stderr
        sweeps = list((work / "outputs" / "multirun").glob("*/*"))
        assert len(sweeps) == 1, sweeps
        sweep = sweeps[0]
        runs = [sweep / "0", sweep / "1"]
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
        assert f"python -m hpcinfer.report {sweep.relative_to(work)}" in r.stderr, r.stderr
        assert r.stdout.split() == [str(run) for run in runs]  # each run prints its run directory

        # submit returned while every job of both runs is still queued: nothing ran, nothing finished
        records = [json.loads((run / "jobs.json").read_text())["submissions"] for run in runs]
        assert [len(subs) for subs in records] == [1, 1]
        ids = [j for subs in records for j in (*subs[0]["workers"], subs[0]["finalize"])]
        assert len(set(ids)) == 4, ids  # a worker job and a finalize job per run
        pending = queued(slurm_env, job_name)
        assert {j: pending.get(j) for j in ids} == {j: ("PENDING", "JobHeldUser") for j in ids}, (pending, submit_s)
        for run, dp in zip(runs, (1, 2)):
            assert json.loads((run / "plan.json").read_text())["dp"] == dp
            assert not (run / "summary.json").exists() and not (run / "results.parquet").exists()
            assert not list((run / "ranks").glob("*.json"))  # no rank has started
        early = subprocess.run(
            [sys.executable, "-m", "hpcinfer.report", str(sweep)],
            env=slurm_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert early.returncode == 1 and "no finished run yet" in early.stdout, early.stdout + early.stderr
        assert early.stdout.count("| unfinished |") == 2 and not (sweep / "report.png").exists()

        # release them; both runs finish on their own
        rel = slurm(slurm_env, "scontrol", "release", ",".join(ids))
        assert rel.returncode == 0, rel.stderr
        deadline = time.time() + 300
        while not all((run / "summary.json").exists() for run in runs):
            for run in runs:
                outcome = json.loads((run / "finalize.json").read_text()) if (run / "finalize.json").exists() else {}
                assert not outcome.get("exit_code"), f"{run} failed: {outcome}\n{logs(run)}"
            assert time.time() < deadline, (queued(slurm_env, job_name), "\n".join(logs(run) for run in runs))
            time.sleep(1)

        for run in runs:
            out = pq.read_table(run / "results.parquet")
            assert out.select(expected.column_names).equals(expected), run  # every row once, in order
            assert out.column("error").null_count == out.num_rows
        texts = [pq.read_table(run / "results.parquet").column("generated_text").to_pylist() for run in runs]
        assert texts[0] == texts[1]  # greedy: the layout does not change the text
        hosts = [{rank["host"] for rank in json.loads((run / "summary.json").read_text())["ranks"]} for run in runs]
        assert all(h and h <= {"n1", "n2", "n3", "n4"} for h in hosts), hosts  # ran on Slurm's nodes

        rep = subprocess.run(
            [sys.executable, "-m", "hpcinfer.report", str(sweep)],
            env=slurm_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rep.returncode == 0, rep.stdout + rep.stderr
        best = [line for line in rep.stdout.splitlines() if line.startswith("best layout:")]
        assert len(best) == 1 and best[0].startswith(
            ("best layout: tp=1 pp=1 dp=1 ", "best layout: tp=1 pp=1 dp=2 ")
        ), rep.stdout
        assert "output tok/s per CPU worker" in best[0], best[0]
        assert (sweep / "report.png").read_bytes()[:8] == PNG_MAGIC
        md = (sweep / "report.md").read_text()
        for run, dp in zip(runs, (1, 2)):
            row = [line for line in md.splitlines() if line.startswith(f"| {run.name} | tp=1 pp=1 dp={dp} | {dp} | ")]
            assert len(row) == 1 and "| finished |" in row[0], md
        assert best[0] in md
    finally:  # leave the cluster as it was: none of this test's jobs stays queued, held or running
        left = list(queued(slurm_env, job_name))
        if left:
            slurm(slurm_env, "scancel", *left)
