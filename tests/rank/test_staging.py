"""Start-up that does not multiply by the ranks (rank/staging.py): the model staged once per node
under a lock (processes racing: one copy, the others reuse it), the node's scratch path, the vLLM
cache per run (its model-info part shared by the runs of a node), and the start-up split from
vLLM's log lines. vLLM only to ask where it keeps model infos."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from hpcinfer.rank import staging


def model_dir(tmp_path):
    src = tmp_path / "shared-fs" / "my-model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (src / "sub" / "tokenizer.json").write_text("{}")
    return src


def _stage(src, scratch, barrier, out):
    barrier.wait()
    staged = staging.stage_model(src, scratch)
    out.put((str(staged.path), staged.copied))


def test_processes_racing_to_stage_copy_once_and_all_load_the_copy(tmp_path, monkeypatch):
    src, scratch = model_dir(tmp_path), tmp_path / "node-a"
    copies = multiprocessing.get_context("fork").Value("i", 0)
    real = staging.shutil.copytree

    def counted(source, *args, **kw):
        if str(source) == str(src):  # copytree calls itself for subfolders
            with copies.get_lock():
                copies.value += 1
        return real(source, *args, **kw)

    monkeypatch.setattr(staging.shutil, "copytree", counted)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_stage, args=(src, scratch, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert copies.value == 1 and sorted(c for _, c in got) == [False, False, False, True]
    [path] = {p for p, _ in got}
    staged = scratch / staging.MODELS
    assert path.startswith(str(staged)) and sorted(os.listdir(staged)) == sorted(
        [os.path.basename(path), os.path.basename(path) + ".lock"]
    )
    for rel in ("config.json", "model.safetensors", "sub/tokenizer.json"):
        assert (src / rel).read_bytes() == open(os.path.join(path, rel), "rb").read()
    # a later rank of the node reuses it without the lock; another node (its own scratch) copies once more
    assert staging.stage_model(src, scratch).copied is False
    assert staging.stage_model(src, tmp_path / "node-b").copied is True


def test_a_copy_killed_half_way_is_never_used_and_cleaned_up(tmp_path):
    src, scratch = model_dir(tmp_path), tmp_path / "node"
    first = staging.stage_model(src, scratch)
    os.rename(first.path, str(first.path) + ".tmp-999")  # as if killed before the rename
    again = staging.stage_model(src, scratch)
    assert again.copied and again.path == first.path and not list(scratch.glob("*/*.tmp-*"))
    (src / "config.json").write_text('{"a": 2}')  # the model changed in place: a new copy
    assert staging.stage_model(src, scratch).path != first.path


def test_local_scratch_and_the_cache_of_the_run(tmp_path):
    env = {"TMPDIR": "/scratch/job1", "SLURMD_NODENAME": "node7"}
    assert str(staging.local_scratch(None, env)) == "/scratch/job1"
    assert str(staging.local_scratch(None, {})) == "/tmp"
    assert str(staging.local_scratch("/tmp/hpc-{node}", env)) == "/tmp/hpc-node7"
    assert staging.cache_env(tmp_path, "run-1", {}) == {"VLLM_CACHE_ROOT": str(tmp_path / staging.CACHE / "run-1")}
    assert staging.cache_env(tmp_path, "run-1", {"VLLM_CACHE_ROOT": "/mine"}) == {}


def test_runs_on_a_node_share_what_vllm_learnt_of_a_model_class(tmp_path, monkeypatch):
    """vLLM's model-info cache outlives a run-private cache: a miss costs a Python process that
    imports vLLM. Checked where vLLM itself looks for it (its registry's cache folder)."""
    from vllm.model_executor.models.registry import _LazyRegisteredModel

    roots = [Path(staging.cache_env(tmp_path, run, {})["VLLM_CACHE_ROOT"]) for run in ("run-1", "run-2")]
    for root in roots:
        staging.share_modelinfos(root)
        staging.share_modelinfos(root)  # a second rank of the node: nothing to do
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(roots[0]))
    (_LazyRegisteredModel._get_cache_dir() / "m.json").write_text("{}")
    assert (roots[1] / "modelinfos" / "m.json").read_text() == "{}"
    assert (tmp_path / staging.CACHE / "modelinfos" / "m.json").is_file()


def test_startup_split_from_vllm_log_lines():
    log = """INFO 12-02 [default_loader.py:502] Loading weights took 0.52 seconds
INFO 12-02 [gpu_model_runner.py:5150] Model loading took 15.0 GiB memory and 3.412 seconds
INFO 12-02 [decorators.py:707] torch.compile and initial profiling/warmup run together took 21.30 s in total
INFO 12-02 [gpu_model_runner.py:6582] Graph capturing finished in 9 secs, took 0.50 GiB
INFO 12-02 [core.py:396] init engine (profile, create kv cache, warmup model) took 40.10 s (compilation: 21.30 s)
"""
    assert staging.startup_split(log) == {
        "weights_seconds": 3.412,
        "compile_seconds": 21.3,
        "graph_capture_seconds": 9.0,
        "init_engine_seconds": 40.1,
    }
    v026 = """(EngineCore pid=1515) INFO 12-03 16:36:32 [default_loader.py:430] Loading weights took 2.28 seconds
(EngineCore pid=1515) INFO 12-03 16:36:33 [model_runner.py:305] Model loading took 13.04 GiB and 4.127739 seconds
(EngineCore pid=1515) INFO 12-03 16:36:37 [monitor.py:53] torch.compile took 4.27 s in total
(EngineCore pid=1515) INFO 12-03 16:36:37 [monitor.py:81] Initial profiling/warmup run took 0.11 s
(EngineCore pid=1515) INFO 12-03 16:36:46 [model_runner.py:747] Graph capturing finished in 7 secs, took 0.99 GiB
(EngineCore pid=1515) INFO 12-03 16:36:47 [core.py:340] init engine (profile, create kv cache, warmup model) took 14.62 s (compilation: 4.27 s)
"""
    assert staging.startup_split(v026) == {  # vLLM 0.26 on the H200 machine (its V2 model runner)
        "weights_seconds": 4.127739,
        "compile_seconds": 4.27,
        "graph_capture_seconds": 7.0,
        "init_engine_seconds": 14.62,
    }
    cpu = "Loading weights took 0.05 seconds\ninit engine (profile, create kv cache, warmup model) took 1.20 s\n"
    assert staging.startup_split(cpu) == {"weights_seconds": 0.05, "init_engine_seconds": 1.2}


# ---- node scratch does not fill up: entries unused for KEEP_DAYS and held by nobody go ------------
DAY = 86400.0


def _entry(root: Path, name: str, age_days: float) -> Path:
    d = root / name
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "artifact").write_bytes(b"x" * 100)
    t = time.time() - age_days * DAY
    os.utime(d, (t, t))
    return d


def _held_elsewhere(entry: Path, started, stop) -> None:
    staging.hold(entry)
    started.set()
    stop.wait(60)


def test_sweep_removes_old_unheld_entries_and_keeps_the_rest(tmp_path):
    root = tmp_path / staging.CACHE
    old, recent, shared = _entry(root, "run-old", 30), _entry(root, "run-recent", 1), _entry(root, "modelinfos", 90)
    busy = _entry(root, "run-busy", 30)
    copying, trash = _entry(root, "model.tmp-123", 30), _entry(root, "run-x.tmp-removing-9", 0)
    ctx = multiprocessing.get_context("fork")
    started, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_held_elsewhere, args=(busy, started, stop))
    holder.start()
    try:
        assert started.wait(30)
        t = time.time() - 30 * DAY  # its marker says when it was last used: long ago, but it is held now
        os.utime(f"{busy}{staging.INUSE}", (t, t))
        removed = staging.sweep(root, staging.KEEP_DAYS * DAY, skip={"modelinfos"})
    finally:
        stop.set()
        holder.join(10)
    assert removed == [old]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        [recent.name, shared.name, busy.name, copying.name]
    )
    assert not trash.exists()  # what a killed sweep left
    # the holder has ended (its lock went with it): the next sweep removes its entry, marker too
    assert staging.sweep(root, staging.KEEP_DAYS * DAY, skip={"modelinfos"}) == [busy]
    assert not Path(f"{busy}{staging.INUSE}").exists()


def test_a_held_entry_is_used_now_and_a_rank_waiting_on_a_sweep_holds_the_new_marker(tmp_path):
    root = tmp_path / staging.MODELS
    entry = _entry(root, "model-abc", 30)
    staging.hold(entry)  # this process uses it: its marker is fresh, so no sweep takes it
    assert staging.sweep(root, staging.KEEP_DAYS * DAY) == []
    marker = Path(f"{entry}{staging.INUSE}")
    assert time.time() - marker.stat().st_mtime < 60
    # a sweep that got the marker first and unlinked it: hold locks the marker that exists now
    os.unlink(marker)
    staging.hold(entry)
    assert os.fstat(staging._held[-1]).st_ino == marker.stat().st_ino


def test_staging_holds_the_copy_it_loads(tmp_path):
    src, scratch = model_dir(tmp_path), tmp_path / "node"
    used = []
    staged = staging.stage_model(src, scratch, used.append)
    assert used == [staged.path]


def test_a_rank_start_holds_its_run_cache_and_sweeps_the_node(tmp_path, monkeypatch):
    from hpcinfer.cli import compose
    from hpcinfer.rundir.paths import RunDir

    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    scratch = tmp_path / "scratch"
    old = _entry(scratch / staging.CACHE, "run-long-ago-0123abcd", 30)
    stale_model = _entry(scratch / staging.MODELS, "model-0123", 30)
    rd = RunDir(tmp_path / "run")
    said = []
    staging.prepare(rd, compose([f"cluster.local_scratch={scratch}"]), {"model": "m"}, said.append)
    mine = Path(os.environ["VLLM_CACHE_ROOT"])
    assert mine.parent == scratch / staging.CACHE and Path(f"{mine}{staging.INUSE}").is_file()
    assert not old.exists() and not stale_model.exists()
    assert f"removed {old}: unused for 7 days" in said
