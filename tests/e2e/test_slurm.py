"""End to end on a real Slurm cluster (slurm/cluster.sh: slurmctld + 4 slurmd on this machine),
real vLLM (CPU build) and real Parquet, through the real CLI, as a user on a login node would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, submit_results

pytestmark = [pytest.mark.vllm, pytest.mark.slurm]

ROWS_PER_FILE = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two files of 12 rows: with dp=2 each rank reads exactly one of them."""
    d = tmp_path_factory.mktemp("slurm-inputs")
    for f in range(2):
        rows = [
            {"id": f * 100 + i, "prompt": f"Tell me about the {i}th mountain of valley {f}.", "lang": "en"}
            for i in range(ROWS_PER_FILE)
        ]
        pq.write_table(pa.Table.from_pylist(rows), d / f"part-{f}.parquet")
    return d


def common(inputs, run_dir, *extra):
    return [
        f"data.input={inputs}/*.parquet",
        "data.id_column=id",
        "sampling=greedy",
        "sampling.max_tokens=8",
        "data.shard_rows=4",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def local_results(inputs, tmp_path_factory, hpcinfer):
    run_dir = tmp_path_factory.mktemp("slurm-ref") / "run"
    return submit_results(hpcinfer, run_dir, *common(inputs, run_dir, "dp=1"))


def slurm_run(slurm_env, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "hpcinfer.submit", "cluster=slurm_cpu", *args],
        cwd=REPO,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scontrol_job(job_id: str, env) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout


def field(scontrol_text: str, name: str) -> str:
    return scontrol_text.split(f"{name}=", 1)[1].split()[0]


def test_dp4_on_four_nodes_equals_local(inputs, tmp_path, slurm_env, local_results):
    run_dir = tmp_path / "run"
    r = slurm_run(slurm_env, *common(inputs, run_dir, "dp=4", "wait=true"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    hosts = sorted(rank["host"] for rank in summary["ranks"])
    assert hosts == ["n1", "n2", "n3", "n4"], summary["ranks"]
    assert pq.read_table(run_dir / "results.parquet").equals(local_results)
    # finalize ran as its own job, after the workers, with a dependency that cannot hang
    record = json.loads((run_dir / "jobs.json").read_text())["submissions"][-1]
    outcome = json.loads((run_dir / "finalize.json").read_text())
    assert outcome["job_id"] == record["finalize"] and record["finalize"] not in record["workers"]
    fin, worker = scontrol_job(record["finalize"], slurm_env), scontrol_job(record["workers"][0], slurm_env)
    assert "JobState=COMPLETED" in fin and "NumNodes=4" in worker and "JobState=COMPLETED" in worker
    assert field(fin, "StartTime") >= field(worker, "EndTime")
    script = (run_dir / "slurm" / f"{record['finalize']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterany:{record['workers'][0]}" in script
    # status reads it all back; submitting the finished run again is a no-op
    st = subprocess.run(
        [sys.executable, "-m", "hpcinfer.status", str(run_dir)], env=slurm_env, capture_output=True, text=True, cwd=REPO
    )
    assert st.returncode == 0 and "state     finished" in st.stdout and "24/24 done" in st.stdout, st.stdout
    again = slurm_run(slurm_env, *common(inputs, run_dir, "dp=4"))
    assert again.returncode == 0 and "already finished" in again.stderr
    assert len(json.loads((run_dir / "jobs.json").read_text())["submissions"]) == 1


def submit_in_background(slurm_env, args, run_dir):
    """Start `submit ... wait=true`; return the process once its jobs are queued."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcinfer.submit", "cluster=slurm_cpu", *args, "wait=true"],
        cwd=REPO,
        env=slurm_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "jobs.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


def test_job_array_run(inputs, tmp_path, slurm_env, local_results):
    run_dir = tmp_path / "run"
    args = common(inputs, run_dir, "dp=4", "cluster.array=2", "cluster.array_parallelism=2")
    proc = submit_in_background(slurm_env, args, run_dir)
    # cron-safe: the same submission again while the jobs are queued or running submits nothing
    again = slurm_run(slurm_env, *args)
    assert again.returncode == 0 and "nothing submitted" in again.stderr, again.stderr
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    record = json.loads((run_dir / "jobs.json").read_text())["submissions"][-1]
    assert record["rank_groups"] == [[0, 1], [2, 3]] and len(record["workers"]) == 1
    array_id = record["workers"][0]
    for element in (f"{array_id}_0", f"{array_id}_1"):
        info = scontrol_job(element, slurm_env)
        assert "JobState=COMPLETED" in info and "NumNodes=2" in info, info
    assert pq.read_table(run_dir / "results.parquet").equals(local_results)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len({rank["host"] for rank in summary["ranks"]}) >= 2


def test_failed_rank_reports_missing_shards_and_does_not_hang(inputs, tmp_path, slurm_env):
    """Rank 1's input file turns unreadable after submission: rank 0's work is kept, finalize
    (afterany) runs anyway, reports the missing shards and fails; status shows the failed rank.
    Static schedule, so that the unreadable file is rank 1's alone (with claims, whichever rank
    reaches it fails, and the other one too when it takes the shard over)."""
    data = tmp_path / "data"
    data.mkdir()
    for f in inputs.glob("*.parquet"):
        (data / f.name).write_bytes(f.read_bytes())
    run_dir = tmp_path / "run"
    proc = submit_in_background(
        slurm_env, common(data, run_dir, "dp=2", "schedule.mode=static", "rank_retries=0"), run_dir
    )
    (data / "part-1.parquet").write_bytes(b"this is not parquet any more")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    assert "incomplete" in err and "shard" in err
    assert not (run_dir / "results.parquet").exists()
    outcome = json.loads((run_dir / "finalize.json").read_text())
    assert outcome["exit_code"] == 1 and "missing" in outcome["message"]
    st = subprocess.run(
        [sys.executable, "-m", "hpcinfer.status", str(run_dir)], env=slurm_env, capture_output=True, text=True, cwd=REPO
    )
    assert st.returncode == 1, st.stdout
    assert "state     failed" in st.stdout
    assert "--- rank 1 failed" in st.stdout and "12/12" in st.stdout  # rank 0 finished its rows
    assert "FAILED" in st.stdout  # the worker job's state
    # rank 0's shards are durable and kept for a rerun
    assert len(list((run_dir / "done").glob("*.json"))) == 3


def test_groups_beyond_max_array_size_go_in_several_submissions(inputs, tmp_path, slurm_env, local_results):
    """3 groups with MaxArraySize 2: an array of 2 (groups 0-1) and a plain job (group 2, offset);
    finalize depends on both."""
    run_dir = tmp_path / "run"
    r = slurm_run(
        slurm_env, *common(inputs, run_dir, "dp=3", "cluster.array=3", "cluster.max_array_size=2", "wait=true")
    )
    assert r.returncode == 0, r.stderr
    record = json.loads((run_dir / "jobs.json").read_text())["submissions"][-1]
    assert record["rank_groups"] == [[0], [1], [2]] and len(record["workers"]) == 2
    array_id, single = record["workers"]
    assert "ArrayTaskId=1" in scontrol_job(f"{array_id}_1", slurm_env)
    assert "ArrayTaskId" not in scontrol_job(single, slurm_env)
    script = (run_dir / "slurm" / f"{record['finalize']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterany:{array_id}:{single}" in script
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(rank["rank"] for rank in summary["ranks"]) == [0, 1, 2]
    assert pq.read_table(run_dir / "results.parquet").equals(local_results)


@pytest.mark.parametrize(
    "extra,env_change,message",
    [
        (["cluster.partition=nosuch"], {}, "cluster.partition='nosuch' does not exist"),
        # what cluster=slurm (GPU nodes) asks of the test cluster's CPU nodes, and more CPUs than a node has
        (["cluster.gpus_per_node=8"], {}, "cluster.gpus_per_node=8, but the nodes of partition 'debug' have no GPUs"),
        (["cluster.cpus_per_task=64"], {}, "cluster.cpus_per_task=64 asks for 64 CPUs per node"),
        ([], {"PATH": "/nonexistent"}, "needs Slurm's sbatch on PATH"),
        ([], {"SLURM_CONF": "dead"}, "the Slurm controller does not answer"),
    ],
)
def test_slurm_problems_are_refused_before_anything_is_written(inputs, tmp_path, slurm_env, extra, env_change, message):
    run_dir = tmp_path / "run"
    if env_change.get("SLURM_CONF") == "dead":  # a config whose controller port nobody listens on
        conf = tmp_path / "slurm.conf"
        conf.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=9", open(slurm_env["SLURM_CONF"]).read()))
        env_change = {"SLURM_CONF": str(conf)}
    r = subprocess.run(
        [sys.executable, "-m", "hpcinfer.submit", "cluster=slurm_cpu", "dp=2", *common(inputs, run_dir), *extra],
        cwd=REPO,
        env={**slurm_env, **env_change},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()
