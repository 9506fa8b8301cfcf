"""The run directory's files (rundir/paths.py, files.py): atomic writes, done markers, the lock,
private permissions, fixed names.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO

from hpcinfer.errors import UserError
from hpcinfer.rundir.files import atomic_path, atomic_write, atomic_write_json
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DoneRecord, RankRecord

PYTHON = sys.executable


# ---- rundir -------------------------------------------------------------------------------------
def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "x.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    atomic_write_json(tmp_path / "y.json", {"a": 1})
    assert target.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "y.json"]


def test_atomic_path_failure_keeps_old_content(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_mark_done_refuses_without_output(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    done = DoneRecord(
        shard=3, rank=1, host="h", rows=5, rows_failed=1, prompt_tokens=7, output_tokens=9, generation_seconds=0.5
    )
    with pytest.raises(RuntimeError, match="no output"):
        rd.mark_done(done)
    assert not rd.is_done(3)
    assert rd.done_shards() == set()
    rd.shard_output(3).write_bytes(b"x")
    rd.mark_done(done)
    assert rd.is_done(3) and rd.done_shards() == {3}
    assert rd.read_done(3) == done


def test_locked_refuses_second_holder(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    with rd.locked():
        assert rd.lock_file.read_text().strip() == str(os.getpid())
        # flock is per open file description: a second open in this process conflicts too
        with pytest.raises(UserError, match="in use"):
            with rd.locked():
                pass
        errors = []

        def other_holder():
            try:
                with RunDir(rd.path).locked():
                    pass
            except UserError as e:
                errors.append(e)

        t = threading.Thread(target=other_holder)
        t.start()
        t.join()
        assert len(errors) == 1
    with rd.locked():  # released: can be taken again
        pass


def test_locked_refused_for_another_process(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    code = (
        "import sys; from hpcinfer.rundir.paths import RunDir; from hpcinfer.errors import UserError\n"
        "try:\n    RunDir(sys.argv[1]).locked().__enter__()\nexcept UserError:\n    sys.exit(3)\n"
    )
    with rd.locked():
        p = subprocess.run([PYTHON, "-c", code, str(rd.path)], cwd=REPO, timeout=60)
        assert p.returncode == 3
    p = subprocess.run([PYTHON, "-c", code, str(rd.path)], cwd=REPO, timeout=60)
    assert p.returncode == 0


def test_create_is_private(tmp_path):
    rd = RunDir(tmp_path / "a" / "run")
    rd.create()
    assert stat.S_IMODE(rd.path.stat().st_mode) == 0o700
    for d in (rd.shards_dir, rd.done_dir, rd.ranks_dir, rd.logs_dir):
        assert d.is_dir()
    assert not rd.exists()  # no config.yaml yet: not a run


def test_create_tightens_existing_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    RunDir(path).create()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_rank_files_and_names(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create()
    assert rd.shard_output(12).name == "000012.parquet"
    assert rd.done_marker(12).name == "000012.json"
    assert rd.claim(12, 3) == rd.claims_dir / "000012.3"
    assert rd.node_log(2, 0) == rd.rank_log(2) == rd.logs_dir / "rank-2.log"
    assert rd.node_log(2, 1) == rd.logs_dir / "rank-2-node-1.log"
    assert rd.read_rank(0) is None and rd.read_ranks() == {}
    rd.write_rank(RankRecord(1, host="h1"))
    rd.write_rank(RankRecord(0, host="h0", token="t", state="running", devices=["0", "1"]))
    (rd.ranks_dir / "junk.json").write_text("{}")
    (rd.ranks_dir / "7.json").write_text("{}")  # not a record: no rank
    assert rd.read_ranks() == {
        0: RankRecord(0, host="h0", token="t", state="running", devices=["0", "1"]),
        1: RankRecord(1, host="h1"),
    }
    assert rd.read_rank(1) == RankRecord(1, host="h1")
