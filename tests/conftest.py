"""Shared fixtures. End-to-end tests run the real CLI (`python -m hpcinfer.submit`) on real vLLM
(the CPU build) with the built-in tiny model, in subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (built-in models, demo data) for the whole session: models are built once."""
    return Path(os.environ.get("HPCINFER_TEST_CACHE") or tmp_path_factory.mktemp("hpcinfer-cache"))


@pytest.fixture(scope="session")
def cli_env(cache_dir) -> dict:
    """The environment a test's hpcinfer command runs with: the user's, plus the shared cache."""
    return {**os.environ, "HPCINFER_CACHE": str(cache_dir)}


@pytest.fixture(scope="session")
def hpcinfer(cli_env):
    """Run `python -m hpcinfer.<module> args...` as a user would; returns CompletedProcess."""

    def run(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", f"hpcinfer.{module}", *args],
            cwd=REPO,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def slurm_env(cli_env):
    """A real Slurm cluster (slurm/cluster.sh): the one already up, else one started (as root)
    for this session and stopped after it. The environment points clients (and jobs) at it."""
    script = REPO / "slurm" / "cluster.sh"
    env_line = subprocess.run(["bash", str(script), "env"], capture_output=True, text=True).stdout.strip()
    conf = env_line.split("=", 1)[1]
    up = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True).returncode == 0
    started = False
    if not up:
        if os.geteuid() != 0:
            pytest.skip("no Slurm cluster is up and starting one (slurm/cluster.sh start) needs root")
        r = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"slurm/cluster.sh start failed:\n{r.stderr[-3000:]}")
        started = True
    yield {**cli_env, "SLURM_CONF": conf}
    if started:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True, timeout=300)


def submit_results(hpcinfer, run_dir: Path, *args: str):
    """Run `submit ... run_dir=<run_dir>` to the end (it must succeed); its results table."""
    import pyarrow.parquet as pq

    r = hpcinfer("submit", *args, f"run_dir={run_dir}")
    assert r.returncode == 0, r.stderr
    return pq.read_table(run_dir / "results.parquet")


def busy_rank(run_dir: Path, rank: int, min_rows: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """Wait until rank `rank` is generating and has finished `min_rows` rows (its submit `proc`
    still running); its ranks/<rank>.json record (pid, host, ...)."""
    import json
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            s = json.loads((run_dir / "ranks" / f"{rank}.json").read_text())
        except (OSError, ValueError):
            s = {}
        if s.get("state") == "running" and s.get("rows_done", 0) >= min_rows:
            return s
        time.sleep(0.02)
    raise AssertionError(f"rank {rank} never got busy")


def check_group(envs):
    """The envs form one lockstep group: the same size, master address and port, ranks 0..size-1."""
    assert len({(e["VLLM_DP_SIZE"], e["VLLM_DP_MASTER_IP"], e["VLLM_DP_MASTER_PORT"]) for e in envs}) == 1, envs
    assert sorted(int(e["VLLM_DP_RANK"]) for e in envs) == list(range(int(envs[0]["VLLM_DP_SIZE"]))), envs


def plan_for(cfg, devices, rows=100, files=1, model_path=None, **plan_kw):
    """make_plan as prepare() calls it (with the launcher's placement), without touching the model
    or the data: `rows` rows over `files` input files that need not exist. `plan_kw`: make_plan's
    keywords (node_memory, cpu_kv)."""
    from hpcinfer.config import engine_args, validate
    from hpcinfer.launch import launcher_for
    from hpcinfer.planning.inputs import InputFile
    from hpcinfer.planning.layout import make_plan, model_shape
    from hpcinfer.planning.sharding import make_shards

    validate(cfg)
    inputs = [InputFile(f"/data/{i}.parquet", rows // files + (1 if i < rows % files else 0)) for i in range(files)]
    active = max(1, min(cfg.dp, rows))
    shards = make_shards(inputs, active, cfg.data.shard_rows)
    return make_plan(
        cfg,
        model_shape(cfg.model),
        devices,
        engine_args(cfg, model_path or cfg.model.path or "/m"),
        shards,
        rows,
        files,
        active,
        place=launcher_for(cfg).place,
        **plan_kw,
    )


def bare_plan(ranks, jobs=None, kind="cuda", per_rank=2, model="/nonexistent/model"):
    """A Plan with just what a rank's environment depends on (a Slurm task's tests)."""
    from hpcinfer.rundir.records import Memory, Plan

    return Plan(
        tp=per_rank,
        pp=1,
        dp=ranks,
        ep=False,
        ranks=ranks,
        device_kind=kind,
        gpus_per_rank=per_rank,
        nodes=jobs.nodes if jobs else 1,
        rows=ranks,
        files=1,
        shards=ranks,
        memory=Memory(None, None, None, None, None),
        engine_args={"model": model},
        model={},
        jobs=jobs,
        nodes_per_rank=jobs.nodes_per_rank if jobs else 1,
    )


def write_parquet(path, table, **kw):
    """Write `table` to `path` as Parquet; the path as a string."""
    import pyarrow.parquet as pq

    pq.write_table(table, str(path), **kw)
    return str(path)


def prompts_table(n, start=0):
    """`n` rows of (id, prompt) from `start`."""
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int64()),
            "prompt": pa.array([f"prompt {i}" for i in range(start, start + n)], pa.string()),
        }
    )


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs at tmp_path/small, for running out of space for real (mounting needs root;
    skipped with the reason otherwise). `fill_disk` fills it."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (to run out of space) needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(d)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill_disk(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last page with one file; that file (delete it to
    free the space)."""
    import errno

    path = directory / "filler"
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return path
