"""Shared fixtures. End-to-end tests run the real CLI (`python -m hpcinfer.submit`) on real vLLM
(the CPU build) with the built-in tiny model, in subprocesses, as a user would."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

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


_FORK_SERVER = None


def run_cli_forked(module: str, args, cwd, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m hpcinfer.<module> args...` as a fork of a server process that has the commands'
    imports loaded (tests/cli_fork.py), not a new interpreter (~0.7 s a call less; the bad-input
    tests make hundreds). A fork of a clean server, not of this test process: a command that
    imports torch must not inherit the threads of an engine a test ran here. What it prints and
    its exit code come back as a CompletedProcess (a test checks they equal `python -m`'s)."""
    import multiprocessing

    global _FORK_SERVER
    if _FORK_SERVER is None:
        _FORK_SERVER = multiprocessing.get_context("forkserver")
        # the server cannot import cli_fork (Python 3.11's fork server ignores the caller's
        # sys.path): what it imports is preloaded, cli_fork itself comes with each fork's task
        _FORK_SERVER.set_forkserver_preload(["hpcinfer.plan", "hpcinfer.submit"])
    import cli_fork

    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        p = _FORK_SERVER.Process(
            target=cli_fork.run, args=(module, list(args), str(cwd), dict(env), out.name, err.name)
        )
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([module, *args], timeout)
        return subprocess.CompletedProcess(
            [sys.executable, "-m", f"hpcinfer.{module}", *args],
            p.exitcode,
            Path(out.name).read_text(errors="replace"),
            Path(err.name).read_text(errors="replace"),
        )


@pytest.fixture(scope="session")
def slurm_cluster(cli_env):
    """A real Slurm cluster (slurm/cluster.sh), shared by every test session on this machine (and
    every pytest-xdist worker): the one already up, else one started (as root). While a session
    uses it, it holds a shared lock on `users`; the last session out stops a cluster that a test
    session started (the `started-by-tests` marker) and leaves one that was up before alone."""
    script = REPO / "slurm" / "cluster.sh"
    env_line = subprocess.run(["bash", str(script), "env"], capture_output=True, text=True).stdout.strip()
    conf = env_line.split("=", 1)[1]
    locks = Path(tempfile.gettempdir()) / "hpcinfer-slurm-tests"
    locks.mkdir(exist_ok=True)
    marker = locks / "started-by-tests"
    users = open(locks / "users", "a+")  # held for the whole session
    fcntl.flock(users, fcntl.LOCK_SH)
    with open(locks / "start", "a+") as start:
        fcntl.flock(start, fcntl.LOCK_EX)
        up = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True).returncode == 0
        if not up:
            if os.geteuid() != 0:
                users.close()
                pytest.skip("no Slurm cluster is up and starting one (slurm/cluster.sh start) needs root")
            r = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                users.close()
                pytest.fail(f"slurm/cluster.sh start failed:\n{r.stderr[-3000:]}")
            marker.touch()
    yield {"env": {**cli_env, "SLURM_CONF": conf}, "locks": locks}
    fcntl.flock(users, fcntl.LOCK_UN)
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another session still uses it: it stops it
        users.close()
        return
    if marker.exists():
        subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True, timeout=300)
        marker.unlink()
    users.close()


@pytest.fixture
def slurm_env(slurm_cluster):
    """The environment that points clients (and jobs) at the test cluster. A test holds the
    cluster alone (an exclusive lock, across sessions and xdist workers): tests kill nodes and
    count the nodes free, so two of them must not run on it at once."""
    with open(slurm_cluster["locks"] / "busy", "a+") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)
        yield slurm_cluster["env"]


def submit_results(hpcinfer, run_dir: Path, *args: str):
    """Run `submit ... run_dir=<run_dir>` to the end (it must succeed); its results table."""
    import pyarrow.parquet as pq

    r = hpcinfer("submit", *args, f"run_dir={run_dir}")
    assert r.returncode == 0, r.stderr
    return pq.read_table(run_dir / "results.parquet")


# The chaos suites' workload (local and Slurm): one input and one undisturbed reference run for the
# whole session, which every fault's results must equal.
CHAOS_ROWS, CHAOS_CHUNK = 480, 8


@pytest.fixture(scope="session")
def chaos_inputs(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("chaos-inputs")
    rows = [{"id": i, "prompt": f"Story {i}: the {i % 17}th lighthouse keeper said"} for i in range(CHAOS_ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), d / "prompts.parquet", row_group_size=100)
    return d / "prompts.parquet"


def chaos_args(inputs, run_dir, *extra):
    return [
        f"data.input={inputs}",
        "data.id_column=id",
        "sampling=greedy",
        "sampling.max_tokens=48",
        "sampling.ignore_eos=true",
        "data.shard_rows=240",
        f"checkpoint.rows={CHAOS_CHUNK}",
        "checkpoint.seconds=3600",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="session")
def session_shared_dir(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this test session sees (their common temp folder);
    this process's own session folder without xdist."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def chaos_reference(chaos_inputs, session_shared_dir, hpcinfer):
    """The undisturbed run's results, made once per test session under a lock and read by every
    worker (the chaos suites run on both)."""
    import pyarrow.parquet as pq

    run_dir = session_shared_dir / "chaos-reference" / "run"
    run_dir.parent.mkdir(exist_ok=True)
    with open(session_shared_dir / "chaos-reference.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (run_dir / "results.parquet").exists():
            return pq.read_table(run_dir / "results.parquet")
        return submit_results(hpcinfer, run_dir, *chaos_args(chaos_inputs, run_dir, "dp=1"))


def busy_rank(run_dir: Path, rank: int, min_rows: int, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """Wait until rank `rank` is generating and has finished `min_rows` rows (its submit `proc`
    still running); its ranks/<rank>.json record (pid, host, ...)."""
    return next(busy_ranks(run_dir, {rank: min_rows}, proc, timeout))


def busy_ranks(run_dir: Path, min_rows: dict, proc: subprocess.Popen, timeout: float = 300):
    """The ranks/<r>.json record of each rank r of `min_rows` as soon as it is generating and has
    finished min_rows[r] rows (its submit `proc` still running), watching them all at once: a
    rank that runs ahead of another is caught before it is done."""
    import json
    import time

    deadline, left = time.time() + timeout, dict(min_rows)
    while left:
        assert time.time() < deadline, f"rank(s) {sorted(left)} never got busy"
        assert proc.poll() is None, proc.communicate()
        for rank, rows in list(left.items()):
            try:
                s = json.loads((run_dir / "ranks" / f"{rank}.json").read_text())
            except (OSError, ValueError):
                continue
            if s.get("state") == "running" and s.get("rows_done", 0) >= rows:
                del left[rank]
                yield s
        time.sleep(0.02)


def check_group(envs):
    """The envs form one lockstep group: the same size, master address and port, ranks 0..size-1."""
    assert len({(e["VLLM_DP_SIZE"], e["VLLM_DP_MASTER_IP"], e["VLLM_DP_MASTER_PORT"]) for e in envs}) == 1, envs
    assert sorted(int(e["VLLM_DP_RANK"]) for e in envs) == list(range(int(envs[0]["VLLM_DP_SIZE"]))), envs


def bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package), for its pure parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


SLURM_GROUP_FIXTURES = ("slurm_env",)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml). Every test on the Slurm
    test cluster is in the group 'slurm', on one worker (they hold the cluster one at a time
    anyway); the tests of a module that share a module fixture (one real run read by several tests)
    form the module's group, so that run is made once; every other test goes wherever a worker is
    free."""
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in SLURM_GROUP_FIXTURES):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def _shares_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a plain test function: keep it with its module
        return True
    return any(defs[-1].scope in ("module", "class", "package") for defs in info.name2fixturedefs.values())


def write_lora_adapter(path: Path, model_dir: Optional[Path] = None, rank: int = 8, seed: int = 0) -> Path:
    """A small random PEFT LoRA adapter (q_proj and v_proj of every layer) for the Llama model in
    `model_dir` (its config.json; None: only adapter_config.json is written), made here: no hub."""
    import json as _json

    path.mkdir(parents=True, exist_ok=True)
    conf = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir or "tiny"),
    }
    (path / "adapter_config.json").write_text(_json.dumps(conf))
    if model_dir is None:
        return path
    import torch
    from safetensors.torch import save_file

    m = _json.loads((Path(model_dir) / "config.json").read_text())
    hidden, heads, kv = m["hidden_size"], m["num_attention_heads"], m["num_key_value_heads"]
    head_dim = m.get("head_dim") or hidden // heads
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(m["num_hidden_layers"]):
        for proj, out in (("q_proj", heads * head_dim), ("v_proj", kv * head_dim)):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.3
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path
