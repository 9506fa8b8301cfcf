"""Bad input gives one clear line on stderr, exit code 2, and touches no run directory.

Every case runs the real CLIs (`hpcinfer.submit` and `hpcinfer.plan` as `__main__`) in a forked
process (conftest.run_cli_forked; a test checks it answers as `python -m` does), from a scratch working directory that holds a finished-looking run directory. After
each bad submission that finished run is byte-identical, the new run directory it named (a sibling
of the finished one) does not exist, and no `outputs/` appeared in the working directory.
Per-row problems (null or over-long prompts) are not bad input: the e2e tests cover them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli_forked

TIMEOUT = 60


# ---- the scratch working directory -------------------------------------------------------------
def _table(n: int, start: int = 0, **extra) -> pa.Table:
    cols = {
        "id": pa.array(range(start, start + n), pa.int64()),
        "prompt": pa.array([f"prompt {i}" for i in range(start, start + n)], pa.string()),
    }
    cols.update(extra)
    return pa.table(cols)


def _write_inputs(d: Path) -> None:
    (d / "in").mkdir()
    pq.write_table(_table(4), d / "in" / "good.parquet")
    good = (d / "in" / "good.parquet").read_bytes()
    (d / "in" / "csv.parquet").write_text("id,prompt\n1,hello\n2,world\n")
    (d / "in" / "truncated.parquet").write_bytes(good[: len(good) // 2])
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), d / "in" / "no_prompt.parquet")
    pq.write_table(pa.table({"id": [1, 2], "prompt": pa.array([7, 8], pa.int64())}), d / "in" / "int_prompt.parquet")
    pq.write_table(
        pa.table({"id": pa.array([1, None, 3], pa.int64()), "prompt": ["a", "b", "c"]}), d / "in" / "null_ids.parquet"
    )
    (d / "dups").mkdir()
    pq.write_table(_table(3), d / "dups" / "a.parquet")
    pq.write_table(_table(3, start=2), d / "dups" / "b.parquet")  # id 2 is in both files
    pq.write_table(
        pa.table({"id": pa.array([5, 6, 5], pa.int64()), "prompt": ["a", "b", "c"]}), d / "in" / "dup_within.parquet"
    )
    (d / "empty").mkdir()
    for name in ("a", "b"):
        pq.write_table(_table(0), d / "empty" / f"{name}.parquet")
    (d / "nothing").mkdir()  # a directory without *.parquet files
    (d / "subdir").mkdir()  # a directory named like a Parquet file among the inputs
    pq.write_table(_table(2), d / "subdir" / "a.parquet")
    (d / "subdir" / "b.parquet").mkdir()
    (d / "dangling").mkdir()  # a symlink pointing nowhere: opening it is an OSError
    pq.write_table(_table(2), d / "dangling" / "a.parquet")
    os.symlink(d / "gone.parquet", d / "dangling" / "b.parquet")
    (d / "fifo").mkdir()  # opening a FIFO would block forever
    pq.write_table(_table(2), d / "fifo" / "a.parquet")
    os.mkfifo(d / "fifo" / "b.parquet")
    os.mkfifo(d / "pipe.parquet")
    # issue 13: other input formats
    (d / "in" / "notjson.jsonl").write_text("this is not JSON\n")
    line = '{"custom_id": "%s", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}\n'
    (d / "in" / "dup_batch.jsonl").write_text("".join(line % c for c in ["a", "b", "a"]))
    (d / "mixed").mkdir()
    pq.write_table(_table(2), d / "mixed" / "a.parquet")
    (d / "mixed" / "b.jsonl").write_text('{"id": 9, "prompt": "x"}\n')
    os.mkfifo(d / "pipe.jsonl")  # its first line is never read to tell its format


def _write_finished_run(rd: Path) -> None:
    """What a finished run directory holds (contents are stand-ins: only bytes are compared)."""
    for sub in ("shards", "done", "ranks", "logs"):
        (rd / sub).mkdir(parents=True)
    (rd / "config.yaml").write_text("model:\n  name: tiny\ndp: 1\n")
    (rd / "plan.json").write_text('{"ranks": 1}\n')
    pq.write_table(_table(4), rd / "manifest.parquet")
    pq.write_table(_table(4), rd / "shards" / "000000.parquet")
    (rd / "done" / "000000.json").write_text('{"rows": 4}\n')
    (rd / "ranks" / "0.json").write_text('{"state": "done"}\n')
    (rd / "logs" / "rank-0.log").write_text("generated 4 rows\n")
    (rd / "lock").write_text("123\n")
    pq.write_table(_table(4), rd / "results.parquet")
    (rd / "summary.json").write_text('{"rows": 4}\n')


def tree_digest(root: Path) -> str:
    """Names, modes, mtimes and bytes of everything under `root`."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{st.st_mode:o}|{st.st_mtime_ns}|".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


class Scratch:
    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.runs = root / "runs"
        self.finished = self.runs / "finished"
        self.new = self.runs / "new"

    def run(self, module: str, *args: str) -> subprocess.CompletedProcess:
        """The command in a fork of this process (conftest.run_cli_forked: no interpreter start)."""
        return run_cli_forked(module, args, self.root, self.env, TIMEOUT)

    def run_subprocess(self, module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", f"hpcinfer.{module}", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def sub(self, arg: str) -> str:
        return arg.replace("{d}", str(self.root))


@pytest.fixture(scope="session")
def scratch(tmp_path_factory, cli_env) -> Scratch:
    s = Scratch(tmp_path_factory.mktemp("bad-input"), cli_env)
    _write_inputs(s.root)
    _write_finished_run(s.finished)
    return s


def assert_usage_error(proc: subprocess.CompletedProcess, must_name) -> str:
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("hpcinfer: error: "), err
    for part in must_name:
        assert part in lines[0], f"{part!r} not named in: {lines[0]}"
    return lines[0]


def assert_nothing_written(s: Scratch, before: str) -> None:
    assert tree_digest(s.finished) == before, "the finished run directory changed"
    assert sorted(p.name for p in s.runs.iterdir()) == ["finished"], "a run directory was created"
    assert not (s.root / "outputs").exists(), "outputs/ was created in the working directory"


# ---- the cases: (id, overrides, substrings the one line must contain) ---------------------------
D = "data.input={d}"
CASES = [
    # data: not Parquet, unreadable, missing
    ("csv-renamed", [f"{D}/in/csv.parquet"], ["csv.parquet", "not a Parquet file"]),
    ("truncated", [f"{D}/in/truncated.parquet"], ["truncated.parquet", "not a Parquet file"]),
    ("missing-file", [f"{D}/in/absent.parquet"], ["absent.parquet", "does not exist"]),
    ("missing-dir", [f"{D}/absent_dir"], ["absent_dir", "does not exist"]),
    ("glob-no-match", [f"{D}/in/zz*.parquet"], ["zz*.parquet", "matches no files"]),
    ("dir-without-parquet", [f"{D}/nothing"], ["nothing", "without *.parquet"]),
    ("dir-named-parquet", [f"{D}/subdir"], ["b.parquet", "is a directory"]),
    ("dangling-symlink", [f"{D}/dangling"], ["b.parquet", "cannot be read"]),
    ("fifo-in-dir", [f"{D}/fifo"], ["b.parquet", "not a regular file"]),
    ("fifo-path", [f"{D}/pipe.parquet"], ["pipe.parquet", "not a regular file"]),
    # data: columns and ids
    ("missing-prompt-column", [f"{D}/in/no_prompt.parquet"], ["'prompt'", "no_prompt.parquet", "['id', 'text']"]),
    (
        "missing-id-column",
        [f"{D}/in/good.parquet", "data.id_column=key"],
        ["'key'", "good.parquet", "['id', 'prompt']"],
    ),
    ("int-prompt", [f"{D}/in/int_prompt.parquet"], ["'prompt'", "int_prompt.parquet", "int64"]),
    ("dup-ids-across-files", [f"{D}/dups", "data.id_column=id"], ["'id'", "not unique", "2", "a.parquet", "b.parquet"]),
    (
        "dup-ids-within-file",
        [f"{D}/in/dup_within.parquet", "data.id_column=id"],
        ["'id'", "not unique", "5", "dup_within.parquet"],
    ),
    ("null-ids", [f"{D}/in/null_ids.parquet", "data.id_column=id"], ["'id'", "null", "null_ids.parquet"]),
    ("zero-rows", [f"{D}/empty"], ["no rows", "empty"]),
    # issue 13: templates, chat, other formats
    (
        "template-missing-column",
        [f"{D}/in/good.parquet", "prompt.template='Say {prompt} in {language}'"],
        ["prompt.template", "{language}", "good.parquet", "['id', 'prompt']"],
    ),
    ("mixed-formats", [f"{D}/mixed"], ["mixes formats", "parquet", "jsonl", "b.jsonl"]),
    ("duplicate-custom-id", [f"{D}/in/dup_batch.jsonl"], ["custom_id must be unique", "'a'", "dup_batch.jsonl"]),
    (
        "messages-column-missing",
        [f"{D}/in/good.parquet", "data.messages_column=messages"],
        ["data.messages_column='messages'", "good.parquet", "['id', 'prompt']"],
    ),
    ("jsonl-not-json", [f"{D}/in/notjson.jsonl"], ["notjson.jsonl", "not valid JSON Lines"]),
    ("fifo-jsonl", [f"{D}/pipe.jsonl"], ["pipe.jsonl", "not a regular file"]),
    ("id-equals-prompt", [f"{D}/in/good.parquet", "data.id_column=prompt"], ["data.id_column='prompt'"]),
    ("shard-rows-zero", ["data.shard_rows=0"], ["data.shard_rows", "0"]),
    # overrides
    ("unknown-key", ["foo=1"], ["'foo'"]),
    ("unknown-sampling-key", ["sampling.tempreature=0.5"], ["tempreature", "did you mean sampling.temperature"]),
    ("unknown-engine-key", ["engine.max_model_length=64"], ["max_model_length", "did you mean engine.max_model_len"]),
    ("unknown-group", ["model=nosuchmodel"], ["nosuchmodel"]),
    ("key-under-a-value", ["ep.eplb=true"], ["'ep.eplb'", "'ep' is a value", "did you mean expert.eplb"]),
    (
        "new-key-in-a-free-section",
        ["cluster=slurm", "cluster.sbatch.foo=1"],
        ["'cluster.sbatch.foo'", "+cluster.sbatch.foo="],
    ),
    # layout
    ("dp-zero", ["dp=0"], ["dp=0"]),
    ("tp-negative", ["tp=-1"], ["tp=-1"]),
    ("pp-zero", ["pp=0"], ["pp=0"]),
    ("tp-not-dividing-heads", ["tp=3"], ["tp=3", "heads", "4"]),
    ("ep-on-dense", ["ep=true"], ["ep=true", "'tiny'", "dense"]),
    ("ep-without-gpus", ["model=tiny_moe", "ep=true", "dp=2", "cluster.gpus=0"], ["ep=true", "dp=2", "needs GPUs"]),
    ("dp-not-a-number", ["dp=abc"], ["dp", "abc"]),
    # model
    ("model-path-missing", ["model=llama", "model.path=/nonexistent"], ["model.path='/nonexistent'", "does not exist"]),
    (
        "model-path-on-builtin",
        ["model.path={d}/in"],
        ["model.path=", "built-in 'tiny-llama'", "model=llama model.path="],
    ),
    # values the config would ignore
    (
        "static-shards-per-rank",
        ["schedule.mode=static", "schedule.shards_per_rank=16"],
        ["schedule.shards_per_rank=16", "dynamic"],
    ),
    ("demo-rows-with-input", [f"{D}/in/good.parquet", "data.demo_rows=40"], ["data.demo_rows=40", "data.input="]),
    ("gpus-beyond-visible", ["cluster.gpus=4096"], ["cluster.gpus=4096", "visible"]),
    ("cluster-key-of-another-kind", ["cluster=slurm", "cluster.gpus=4"], ["'cluster.gpus'", "only cluster=local"]),
    ("cpu-kvcache-on-gpu-nodes", ["cluster=slurm", "cluster.cpu_kvcache_gib=4"], ["cluster.cpu_kvcache_gib=4"]),
    # memory on CPU: 64 ranks of 15 GiB weights and 1 TiB KV cache each fit no machine
    (
        "cpu-memory",
        ["model=llama", "dp=64", "cluster.gpus=0", "cluster.cpu_kvcache_gib=1024"],
        ["does not fit in memory", "64 rank(s) x (14.96 GiB weights + 1024 GiB KV cache)", "MemTotal"],
    ),
    # sampling
    ("temperature-negative", ["sampling.temperature=-1"], ["sampling.temperature", "-1"]),
    ("top-p-zero", ["sampling.top_p=0"], ["sampling.top_p", "0"]),
    ("top-p-above-one", ["sampling.top_p=1.5"], ["sampling.top_p", "1.5"]),
    ("max-tokens-zero", ["sampling.max_tokens=0"], ["sampling.max_tokens", "0"]),
    ("max-tokens-fills-context", ["sampling.max_tokens=512"], ["sampling.max_tokens=512", "max_model_len=512"]),
    (
        "max-tokens-beyond-context",
        ["engine.max_model_len=64", "sampling.max_tokens=100"],
        ["sampling.max_tokens=100", "max_model_len=64"],
    ),
]


@pytest.mark.parametrize("args, must_name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_submit_refuses_bad_input_and_writes_nothing(scratch, args, must_name):
    before = tree_digest(scratch.finished)
    args = [scratch.sub(a) for a in args]
    assert_usage_error(scratch.run("submit", *args, f"run_dir={scratch.new}"), must_name)
    assert_nothing_written(scratch, before)


@pytest.mark.parametrize("args, must_name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_refuses_bad_input(scratch, args, must_name):
    before = tree_digest(scratch.finished)
    assert_usage_error(scratch.run("plan", *[scratch.sub(a) for a in args]), must_name)
    assert_nothing_written(scratch, before)


REPRESENTATIVE = [
    "csv-renamed",
    "duplicate-custom-id",  # refused once converted into the run directory's inputs/: removed again
    "dup-ids-across-files",
    "zero-rows",
    "unknown-sampling-key",
    "tp-not-dividing-heads",
    "model-path-missing",
    "max-tokens-zero",
]


@pytest.mark.parametrize("where", ["finished", "default"])
@pytest.mark.parametrize("case", REPRESENTATIVE)
def test_bad_input_leaves_a_finished_run_dir_and_outputs_alone(scratch, case, where):
    """The finished run given as run_dir itself, or no run_dir (outputs/<date>/<time> in the cwd)."""
    args, must_name = next(c[1:] for c in CASES if c[0] == case)
    args = [scratch.sub(a) for a in args] + ([f"run_dir={scratch.finished}"] if where == "finished" else [])
    before = tree_digest(scratch.finished)
    assert_usage_error(scratch.run("submit", *args), must_name)
    assert_nothing_written(scratch, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(scratch, tmp_path):
    p = tmp_path / "secret.parquet"
    pq.write_table(_table(2), p)
    p.chmod(0)
    assert_usage_error(
        scratch.run("submit", f"data.input={p}", f"run_dir={scratch.new}"), ["secret.parquet", "not readable"]
    )


@pytest.mark.parametrize(
    "error, must_name",
    [
        (PermissionError(13, "Permission denied"), "not readable"),
        (OSError(5, "Input/output error"), "Input/output error"),
    ],
)
def test_open_errors_name_the_file(scratch, monkeypatch, error, must_name):
    """What a file the user may not read, or a failing disk, gives (also as root)."""
    from hpcinfer.errors import DataError
    from hpcinfer.planning import inputs
    from hpcinfer.planning.inputs import scan

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(inputs, "open", refuse, raising=False)
    path = str(scratch.root / "in" / "good.parquet")
    with pytest.raises(DataError) as e:
        scan([path], "prompt")
    assert path in str(e.value) and must_name in str(e.value)


def test_the_scratch_inputs_are_otherwise_good(scratch):
    """The good file plans: the failures above come from what each case changes."""
    proc = scratch.run("plan", f"data.input={scratch.root}/in/good.parquet", "data.id_column=id")
    assert proc.returncode == 0, proc.stderr
    assert not (scratch.root / "outputs").exists()


@pytest.mark.parametrize(
    "module,args",
    [
        ("plan", ["data.input={d}/in/good.parquet", "data.id_column=id"]),
        ("submit", ["data.input={d}/in/no_prompt.parquet", "run_dir={d}/runs/new"]),
        ("submit", ["sampling.nope=1", "run_dir={d}/runs/new"]),
        ("plan", ["cluster=slurm", "+cluster.sbatch.nodes=2"]),
    ],
)
def test_the_forked_command_answers_as_the_subprocess_does(scratch, module, args):
    """The cases above run each command in a fork of the test process (conftest.run_cli_forked):
    it prints the same, line for line, and exits with the same code as `python -m`."""
    args = [scratch.sub(a) for a in args]
    forked, real = scratch.run(module, *args), scratch.run_subprocess(module, *args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert not (scratch.root / "outputs").exists() and not scratch.new.exists()


# ---- Slurm: values that reach sbatch -------------------------------------------------------------
INJECTIONS = [
    "gpu;touch /tmp/hpcinfer-pwned",
    "gpu$(touch /tmp/hpcinfer-pwned)",
    "gpu`touch /tmp/hpcinfer-pwned`",
    "gpu\ntouch /tmp/hpcinfer-pwned",
    "gpu\n#SBATCH --uid=0",
    "a b",
    "gpu'x",
    "",
]


SLURM_KEYS = ["partition", "account", "qos", "mem", "constraint", "job_name", "finalize_mem", "python"]
INJECTION_IDS = ["semicolon", "dollar-paren", "backticks", "newline", "newline-sbatch", "space", "quote", "empty"]


@functools.cache
def _slurm_config():
    """`cluster=slurm` composed once (a composition takes ~0.2 s; the plan commands below compose
    each value end to end)."""
    from hpcinfer.cli import compose

    return compose(["cluster=slurm"])


@pytest.mark.parametrize("key", SLURM_KEYS)
@pytest.mark.parametrize("value", INJECTIONS, ids=INJECTION_IDS)
def test_slurm_values_with_shell_characters_fail_validation(key, value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hpcinfer.config import validate
    from hpcinfer.errors import ConfigError

    # the override as a user writes it reaches the config as exactly this value ...
    assert OverridesParser.create().parse_override(f"cluster.{key}={_quoted(value)}").value() == value
    base = _slurm_config()
    cfg = dataclasses.replace(base, cluster=dataclasses.replace(base.cluster, **{key: value}))
    # ... and validation refuses it, naming the key
    with pytest.raises(ConfigError, match=f"cluster.{key}="):
        validate(cfg)


@pytest.mark.parametrize("key, value", list(zip(SLURM_KEYS, INJECTIONS)), ids=SLURM_KEYS)
def test_plan_refuses_slurm_values_with_shell_characters(scratch, key, value):
    before = tree_digest(scratch.finished)
    proc = scratch.run("plan", "cluster=slurm", f"cluster.{key}={_quoted(value)}")
    assert_usage_error(proc, [f"cluster.{key}="])
    assert_nothing_written(scratch, before)


@pytest.mark.parametrize("value", ["a\nb", "a\n#SBATCH --uid=0", "a\rb"], ids=["newline", "newline-sbatch", "cr"])
def test_sbatch_option_values_with_line_breaks_are_refused(scratch, value):
    proc = scratch.run("plan", "cluster=slurm", f"+cluster.sbatch.mail-user={_quoted(value)}")
    assert_usage_error(proc, ["cluster.sbatch.mail-user", "line break"])


@pytest.mark.parametrize(
    "key", ["mail user", "mail-user;x", "-x", "Mail", "mail_type", "nodes", "output", "dependency"]
)
def test_sbatch_option_names_are_checked(key):
    from hpcinfer.cli import compose
    from hpcinfer.config import validate
    from hpcinfer.errors import ConfigError

    cfg = compose(["cluster=slurm"])
    cfg.cluster.sbatch[key] = "x"  # as a conf/cluster/*.yaml file could give it
    with pytest.raises(ConfigError, match="cluster.sbatch"):
        validate(cfg)


@pytest.mark.parametrize("key", ["Mail", "nodes", "array"])
def test_plan_refuses_bad_sbatch_option_names(scratch, key):
    assert_usage_error(scratch.run("plan", "cluster=slurm", f"+cluster.sbatch.{key}=x"), ["cluster.sbatch"])


def test_setup_item_with_a_line_break_is_refused(scratch):
    proc = scratch.run("plan", "cluster=slurm", "cluster.setup=['module load cuda\nrm -rf ~']")
    assert_usage_error(proc, ["cluster.setup", "line break"])


SHELL_VALUES = [
    "a;touch /tmp/hpcinfer-pwned",
    "$(touch /tmp/hpcinfer-pwned)",
    "`touch /tmp/hpcinfer-pwned`",
    "x' ; touch /tmp/hpcinfer-pwned ; '",
    'a"b',
    "#SBATCH --uid=0",
]


@pytest.mark.parametrize("value", SHELL_VALUES)
def test_allowed_sbatch_values_are_rendered_quoted(value, tmp_path):
    """Values without line breaks are allowed in cluster.sbatch (mail-user, comment, ...): submitit
    quotes them, the line stays one `#SBATCH` comment, and bash running the script runs nothing."""
    import shlex

    from hpcinfer.cli import compose
    from hpcinfer.config import validate
    from hpcinfer.launch.slurm.launcher import executor, finalize_parameters, worker_parameters
    from hpcinfer.launch.slurm.layout import job_layout

    cfg = compose(
        [
            "cluster=slurm",
            "dp=2",
            f"+cluster.sbatch.mail-user={_quoted(value)}",
            f"+cluster.sbatch.comment={_quoted(value)}",
        ]
    )
    validate(cfg)
    assert cfg.cluster.sbatch["mail-user"] == value
    for params in (worker_parameters(cfg, job_layout(2, 8)), finalize_parameters(cfg, ["1"])):
        ex = executor(str(tmp_path / "slurm"), cfg, params)
        text = ex._make_submission_file_text(ex._submitit_command_str, "uid")
        for key in ("mail-user", "comment"):
            lines = [ln for ln in text.splitlines() if ln.startswith(f"#SBATCH --{key}=")]
            assert lines == [f"#SBATCH --{key}={shlex.quote(value)}"]
            assert shlex.split(lines[0].split("=", 1)[1]) == [value]
        header = text.split("# command")[0]
        assert all(not ln or ln.startswith("#") for ln in header.splitlines()), header
        marker = tmp_path / "ran"
        script = text.replace("/tmp/hpcinfer-pwned", str(marker)).split("# command")[0]
        subprocess.run(["bash", "-c", script], check=True, timeout=30)
        assert not marker.exists()


def _quoted(value: str) -> str:
    """A Hydra override value that is exactly `value` (quoted, escapes for quote and backslash)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
