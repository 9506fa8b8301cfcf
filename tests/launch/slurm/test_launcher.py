"""The Slurm backend's pure parts: job layout, time limits, sbatch parameters (against golden
sbatch files, rendered by submitit itself), job-state parsing, and status' state logic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcinfer.cli import compose
from hpcinfer.config import slurm_time_minutes, validate
from hpcinfer.errors import ConfigError
from hpcinfer.launch.slurm.launcher import dependency, executor, finalize_parameters, rank_jobs, worker_parameters
from hpcinfer.launch.slurm.layout import array_chunks, job_layout, node_capacity, rank_groups
from hpcinfer.launch.slurm.queue import parse_sacct, parse_squeue, states_of, summarize
from hpcinfer.rundir.records import Submission

GOLDEN = Path(__file__).parent / "golden"


# ---- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gpn,per_rank,given,expected",
    [(8, 1, None, 8), (8, 2, None, 4), (8, 3, None, 2), (4, 8, None, 1), (0, 1, None, 1), (8, 1, 2, 2)],
)
def test_node_capacity(gpn, per_rank, given, expected):
    assert node_capacity(gpn, per_rank, given) == expected


def test_one_job_packs_ranks_onto_nodes():
    j = job_layout(8, 4)
    assert (j.groups, j.ranks_per_group, j.nodes_per_job, j.tasks_per_node) == (1, 8, 2, 4)
    assert j.idle_tasks(8) == 0 and j.nodes == 2
    assert rank_groups(list(range(8)), j) == [list(range(8))]


def test_uneven_ranks_spread_over_the_fewest_nodes():
    j = job_layout(5, 4)
    assert (j.nodes_per_job, j.tasks_per_node, j.idle_tasks(5)) == (2, 3, 1)


def test_array_groups_and_rank_numbering():
    j = job_layout(8, 1, array=4)
    assert (j.groups, j.ranks_per_group, j.nodes_per_job, j.tasks_per_node) == (4, 2, 2, 1)
    assert rank_groups(list(range(8)), j) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_max_nodes_per_job_turns_a_large_layout_into_an_array():
    j = job_layout(64, 8, max_nodes_per_job=2)
    assert (j.groups, j.ranks_per_group, j.nodes_per_job) == (4, 16, 2)
    assert j.nodes == 8


def test_groups_never_exceed_ranks_and_uneven_groups_shrink():
    j = job_layout(5, 1, array=4)  # groups of 2: 3 groups are enough
    assert (j.groups, j.ranks_per_group) == (3, 2)
    with pytest.raises(ValueError, match="cluster.array=6 exceeds the 5"):
        job_layout(5, 1, array=6)


def test_given_nodes_must_hold_the_ranks():
    assert job_layout(8, 4, nodes=4).tasks_per_node == 2
    with pytest.raises(ValueError, match="cluster.nodes=1 node"):
        job_layout(8, 4, nodes=1)
    with pytest.raises(ValueError, match="more nodes than"):
        job_layout(2, 4, nodes=3)


@pytest.mark.parametrize(
    "groups,size,expected",
    [
        (1, 1001, [(0, 1)]),
        (1001, 1001, [(0, 1001)]),
        (2500, 1001, [(0, 1001), (1001, 1001), (2002, 498)]),
        (5, 2, [(0, 2), (2, 2), (4, 1)]),
    ],
)
def test_array_chunks_respect_max_array_size(groups, size, expected):
    chunks = array_chunks(groups, size)
    assert chunks == expected
    assert sum(c for _, c in chunks) == groups and all(c <= size for _, c in chunks)


@pytest.mark.parametrize(
    "value,minutes",
    [
        (30, 30),
        ("30", 30),
        ("90:30", 91),
        ("04:00:00", 240),
        ("1:00:01", 61),
        ("2-0", 2880),
        ("1-02:30", 1590),
        ("1-00:00:30", 1441),
        ("0:0:59", 1),
    ],
)
def test_slurm_time_minutes(value, minutes):
    assert slurm_time_minutes(value) == minutes


@pytest.mark.parametrize("value", ["", "abc", "1:2:3:4", "-5", "0", 0, True, "1h"])
def test_slurm_time_minutes_rejects(value):
    with pytest.raises(ValueError):
        slurm_time_minutes(value)


# ---- config ----------------------------------------------------------------------------------
def test_slurm_config_validation_names_the_values():
    cfg = compose(
        [
            "cluster=slurm",
            "tp=3",
            "cluster.gpus_per_node=2",
            "cluster.time=soon",
            "cluster.array=0",
            "+cluster.sbatch.ntasks=3",
            "cluster.partition='gpu;rm -rf'",
        ]
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for part in (
        "tp=3 x pp=1: 3 GPUs per rank is neither at most cluster.gpus_per_node=2 nor a multiple of it",
        "cluster.time",
        "'soon'",
        "cluster.array must be >= 1, got 0",
        "cluster.sbatch.ntasks is set by hpcinfer",
        "cluster.partition='gpu;rm -rf'",
    ):
        assert part in msg


def test_ep_with_array_is_refused():
    cfg = compose(["cluster=slurm", "model=tiny_moe", "ep=true", "dp=2", "cluster.array=2"])
    with pytest.raises(ConfigError, match="lockstep"):
        validate(cfg)


def test_cpu_cluster_config_is_valid():
    cfg = compose(["cluster=slurm_cpu", "dp=4"])
    validate(cfg)
    assert cfg.cluster.gpus_per_node == 0 and cfg.cluster.name == "slurm"


# ---- sbatch text -----------------------------------------------------------------------------
def _sbatch(cfg, params) -> str:
    ex = executor("/runs/r1/slurm", cfg, params)
    return ex._make_submission_file_text(ex._submitit_command_str, "uid")


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HPCINFER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"sbatch text differs from {path} (HPCINFER_UPDATE_GOLDEN=1 to accept)"


GPU_ARGS = [
    "cluster=slurm",
    "dp=16",
    "tp=2",
    "cluster.partition=gpu",
    "cluster.account=proj42",
    "cluster.qos=high",
    "cluster.time=12:00:00",
    "cluster.mem=400G",
    "cluster.cpus_per_task=16",
    "cluster.constraint=h100",
    "cluster.exclusive=true",
    "+cluster.sbatch.mail-type=END",
    "cluster.setup=['module load cuda/12.4', 'source /opt/venv/bin/activate']",
    "cluster.python=/opt/venv/bin/python",
]


def test_golden_gpu_worker_job():
    cfg = compose(GPU_ARGS)
    jobs = job_layout(16, node_capacity(8, 2, None))
    _check_golden("sbatch_workers_gpu.sh", _sbatch(cfg, worker_parameters(cfg, jobs)))


def test_golden_cpu_worker_array():
    cfg = compose(
        [
            "cluster=slurm_cpu",
            "dp=6",
            "cluster.array=3",
            "cluster.array_parallelism=2",
            "cluster.python=/opt/venv/bin/python",
        ]
    )
    jobs = job_layout(6, 1, array=3)
    params = worker_parameters(cfg, jobs)
    ex = executor("/runs/r1/slurm", cfg, params)
    ex.parameters["map_count"] = 3  # what map_array sets for a 3-element array
    _check_golden("sbatch_workers_cpu_array.sh", ex._make_submission_file_text(ex._submitit_command_str, "uid"))


def test_golden_gpu_worker_job_of_replicas_spanning_nodes():
    """tp=16 on 8-GPU nodes: 3 ranks of 2 nodes each = 6 nodes, one task (and all 8 GPUs) per node."""
    cfg = compose(
        [
            "cluster=slurm",
            "model=llama",
            "model.path=org/llama",
            "dp=3",
            "tp=16",
            "cluster.partition=gpu",
            "cluster.time=12:00:00",
            "cluster.python=/opt/venv/bin/python",
        ]
    )
    validate(cfg)
    jobs = job_layout(3, node_capacity(8, 16, None), nodes_per_rank=2)
    assert (jobs.nodes_per_job, jobs.tasks_per_node) == (6, 1)
    _check_golden("sbatch_workers_gpu_spanning.sh", _sbatch(cfg, worker_parameters(cfg, jobs)))


def test_golden_finalize_job():
    cfg = compose(GPU_ARGS)
    _check_golden("sbatch_finalize.sh", _sbatch(cfg, finalize_parameters(cfg, ["101", "102"])))


def test_worker_gpus_are_what_the_tasks_of_a_node_use():
    cfg = compose(["cluster=slurm", "dp=3", "tp=2"])
    assert worker_parameters(cfg, job_layout(3, 4))["gpus_per_node"] == 6
    assert "gpus_per_node" not in worker_parameters(compose(["cluster=slurm_cpu"]), job_layout(1, 1))


def test_finalize_runs_after_any_outcome():
    assert dependency(["12", "13"]) == "afterany:12:13"
    params = finalize_parameters(compose(["cluster=slurm_cpu"]), ["7"])
    assert params["additional_parameters"]["dependency"] == "afterany:7"
    assert "gpus_per_node" not in params


def test_rank_jobs():
    assert rank_jobs(Submission(0.0, ["5"], "6", [[0, 1, 2]]), 1001) == {0: "5", 1: "5", 2: "5"}
    rec = Submission(0.0, ["10", "11", "12"], "13", [[0], [1, 4], [5], [6], [9]])
    assert rank_jobs(rec, 2) == {0: "10_0", 1: "10_1", 4: "10_1", 5: "11_0", 6: "11_1", 9: "12"}


def test_rank_groups_of_a_resubmission():
    assert rank_groups([1, 3, 4, 7, 8], job_layout(5, 1, array=3)) == [[1, 3], [4, 7], [8]]
    assert rank_groups([0, 1, 2, 3], job_layout(4, 4)) == [[0, 1, 2, 3]]


# ---- job states ------------------------------------------------------------------------------
def test_parse_squeue_and_sacct():
    states = parse_squeue("12|RUNNING|None\n13_0|COMPLETED|None\n13_1|PENDING|Dependency\n")
    assert states["13_1"] == ("PENDING", "Dependency")
    assert summarize(states_of("13", states)) == "PENDING"
    assert summarize(states_of("12", states)) == "RUNNING"
    assert summarize(states_of("99", states)) == "UNKNOWN"
    acct = parse_sacct("20|CANCELLED by 0|None\n21|FAILED|NonZeroExitCode\n")
    assert acct["20"][0] == "CANCELLED" and summarize(states_of("21", acct)) == "FAILED"
    assert summarize([("COMPLETED", ""), ("FAILED", "")]) == "FAILED"


def test_array_parallelism_without_an_array_is_noted():
    from hpcinfer.launch.slurm.launcher import SlurmLauncher

    def notes(*overrides):
        launcher = SlurmLauncher(compose(["cluster=slurm", "dp=2", *overrides]))
        return launcher.place(2, launcher.devices()).notes

    assert notes("cluster.array_parallelism=2") == [
        "cluster.array_parallelism=2 has no effect: the ranks are one job, not an array"
    ]
    assert notes("cluster.array=2", "cluster.array_parallelism=2") == []
    assert notes() == []


def test_wait_returns_once_the_finalize_job_has_ended_not_when_its_outcome_lands(tmp_path, monkeypatch):
    """The finalize job writes finalize.json and then ends: `wait=true` returns after both, so that
    what runs next sees the job done (a race the Slurm end-to-end test once hit)."""
    import hpcinfer.launch.slurm.launcher as launcher
    from hpcinfer.rundir.paths import RunDir
    from hpcinfer.rundir.records import FinalizeOutcome

    rd = RunDir(tmp_path)
    rd.write_finalize_outcome(FinalizeOutcome(job_id="8", exit_code=0, message="12 rows"))
    states = iter(["RUNNING", "COMPLETING", "COMPLETED"])
    asked = []

    def summarized(jobs):
        asked.append(next(states))
        return {jobs[0]: asked[-1]}

    monkeypatch.setattr(launcher, "summarized", summarized)
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)
    record = Submission(submitted_at=0.0, workers=["7"], finalize="8", rank_groups=[[0]])
    assert launcher.wait(rd, record, rows=12, poll_s=0.01) == 0
    assert asked == ["RUNNING", "COMPLETING", "COMPLETED"]


def test_wait_gives_up_on_a_job_that_never_ends_after_its_outcome(tmp_path, monkeypatch):
    import hpcinfer.launch.slurm.launcher as launcher

    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(launcher, "summarized", lambda jobs: {jobs[0]: "COMPLETING"})
    monkeypatch.setattr(launcher.time, "time", lambda: float(next(clock)))
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)
    assert launcher.until_ended("8", deadline=30.0, poll_s=0.5) == "COMPLETING"
