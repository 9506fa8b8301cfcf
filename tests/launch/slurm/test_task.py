"""What a Slurm task learns from its environment: identity, rank, port, GPUs and cores."""

import itertools
import re
import socket

import pytest

from hpcinfer.launch.slurm.task import (
    REQUIRED_VARS,
    SlurmEnvError,
    SlurmTask,
    check_master_port,
    master_port,
    port_is_free,
    slurm_task,
    task_cpus,
    task_gpus,
    task_rank,
)

ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "PATH": "/usr/bin",
}


# ---- slurm_task ----


def test_slurm_task_reads_the_variables():
    env = {**ENV, "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "7", "SLURM_RESTART_COUNT": "2"}
    assert slurm_task(env) == SlurmTask(
        job_id="4242",
        array_job_id="4200",
        array_task_id=7,
        procid=3,
        localid=1,
        ntasks=4,
        nodeid=1,
        nodelist="gpu[01-02]",
        restart_count=2,
    )


def test_slurm_task_optional_variables_default():
    task = slurm_task(ENV)
    assert (task.array_job_id, task.array_task_id, task.restart_count) == (None, None, 0)
    assert slurm_task({**ENV, "SLURM_ARRAY_JOB_ID": "", "SLURM_RESTART_COUNT": ""}).array_job_id is None


def test_slurm_task_names_all_missing_variables_at_once():
    with pytest.raises(SlurmEnvError) as e:
        slurm_task({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "", "PATH": "/bin"})
    for var in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID", "SLURM_JOB_NODELIST"):
        assert var in str(e.value)
    assert "SLURM_JOB_ID" not in str(e.value)
    with pytest.raises(SlurmEnvError) as e:
        slurm_task({})
    assert all(var in str(e.value) for var in REQUIRED_VARS)


@pytest.mark.parametrize(
    "var,value",
    [
        ("SLURM_PROCID", "x"),
        ("SLURM_NTASKS", "4.0"),
        ("SLURM_LOCALID", " 1"),
        ("SLURM_NODEID", "1_0"),
        ("SLURM_ARRAY_TASK_ID", "7a"),
        ("SLURM_RESTART_COUNT", "two"),
    ],
)
def test_slurm_task_names_non_integer_values(var, value):
    with pytest.raises(SlurmEnvError) as e:
        slurm_task({**ENV, var: value})
    assert f"{var}={value!r}" in str(e.value)


@pytest.mark.parametrize("procid,ntasks", [("4", "4"), ("-1", "4"), ("0", "0")])
def test_slurm_task_procid_must_be_below_ntasks(procid, ntasks):
    with pytest.raises(SlurmEnvError, match=f"SLURM_PROCID={procid} is not in \\[0, SLURM_NTASKS={ntasks}\\)"):
        slurm_task({**ENV, "SLURM_PROCID": procid, "SLURM_NTASKS": ntasks})


@pytest.mark.parametrize("var", ["SLURM_LOCALID", "SLURM_NODEID"])
def test_slurm_task_rejects_negative_ids(var):
    with pytest.raises(SlurmEnvError, match=f"{var}=-1"):
        slurm_task({**ENV, var: "-1"})


def test_slurm_task_is_frozen():
    with pytest.raises(AttributeError):
        slurm_task(ENV).procid = 0


# ---- task_rank ----


def test_task_rank_follows_the_jobs_rank_list():
    assert [task_rank(p, [4, 5, 9]) for p in range(4)] == [4, 5, 9, None]
    assert task_rank(0, []) is None
    with pytest.raises(SlurmEnvError, match="procid=-1"):
        task_rank(-1, [0])


# ---- master_port ----


def test_master_port_is_deterministic_aligned_and_in_window():
    ports = [master_port(j) for j in range(0, 5000, 7)]
    assert all(20000 <= p < 30000 and (p - 20000) % 8 == 0 for p in ports)
    assert master_port("4242") == master_port(4242) == master_port("4242_3") == 20000 + 4242 * 8 % 10000
    assert master_port(1250) == 20000  # 1250 slots of 8 in 10000: wraps around
    assert master_port(1249) + 7 < 30000  # the engine's extra ports stay in the window


def test_master_port_consecutive_jobs_do_not_share_ports():
    ports = [master_port(j) for j in range(1000, 1000 + 1250)]
    assert len(set(ports)) == 1250
    assert all(b - a >= 8 for a, b in itertools.pairwise(sorted(ports)))


def test_master_port_custom_window():
    assert master_port(5, base=10000, span=100, stride=10) == 10050
    assert master_port(15, base=10000, span=100, stride=10) == 10050
    assert master_port(3, base=1000, span=10, stride=1) == 1003


@pytest.mark.parametrize("job_id", ["", "abc", "_4", "12a", "-5", -5, True, "1.5"])
def test_master_port_rejects_bad_job_ids(job_id):
    with pytest.raises(SlurmEnvError, match="job id"):
        master_port(job_id)


@pytest.mark.parametrize("kw", [{"base": 30000, "span": 10000}, {"stride": 0}, {"span": 4, "stride": 8}, {"base": 0}])
def test_master_port_rejects_bad_windows(kw):
    with pytest.raises(SlurmEnvError, match="bad port window"):
        master_port(1, **kw)


# ---- port_is_free / check_master_port ----


def bound(addr, port=0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((addr, port))
    s.listen()
    return s


def test_port_is_free_sees_a_taken_port():
    with bound("127.0.0.1") as s:
        port = s.getsockname()[1]
        assert port_is_free("127.0.0.1", port) is False
        with pytest.raises(SlurmEnvError, match=f"127.0.0.1:{port} is already in use.*share a network stack"):
            check_master_port("127.0.0.1", port)
    assert port_is_free("127.0.0.1", port) is True  # released: free again
    check_master_port("127.0.0.1", port)


def test_port_is_free_on_a_free_port():
    with bound("127.0.0.1") as s:
        port = s.getsockname()[1]
    assert port_is_free("127.0.0.1", port) is True


def test_a_wildcard_listener_makes_the_port_taken_on_every_address():
    with bound("0.0.0.0") as s:
        port = s.getsockname()[1]
        assert port_is_free("127.0.0.1", port) is False


def test_different_loopback_addresses_do_not_clash():
    """Linux treats all of 127/8 as local: two addresses, same port, no clash."""
    with bound("127.0.100.1") as s:
        port = s.getsockname()[1]
        assert port_is_free("127.0.100.1", port) is False
        assert port_is_free("127.0.100.2", port) is True
        with bound("127.0.100.2", port):
            assert port_is_free("127.0.100.2", port) is False


def test_check_master_port_on_an_address_of_another_machine():
    with pytest.raises(OSError):
        port_is_free("192.0.2.1", 20000)  # TEST-NET-1: never an address of this machine
    with pytest.raises(SlurmEnvError, match="cannot bind the master port 192.0.2.1:20000"):
        check_master_port("192.0.2.1", 20000)


# ---- task_gpus ----


@pytest.mark.parametrize("visible", [None, "", "  "])
def test_task_gpus_without_cuda_visible_devices(visible):
    assert task_gpus(visible, 0, 2) == ["0", "1"]
    assert task_gpus(visible, 3, 2) == ["6", "7"]
    assert task_gpus(visible, 2, 1) == ["2"]


def test_task_gpus_slurm_restricted_the_task():
    assert task_gpus("5,6", 3, 2) == ["5", "6"]
    assert task_gpus("3", 1, 1) == ["3"]
    assert task_gpus("GPU-aaaa,GPU-bbbb", 1, 2) == ["GPU-aaaa", "GPU-bbbb"]  # UUIDs pass through


def test_task_gpus_slices_a_shared_list():
    assert task_gpus("4,5,6,7", 0, 2) == ["4", "5"]
    assert task_gpus("4,5,6,7", 1, 2) == ["6", "7"]
    assert task_gpus("0,1,2,3,4,5,6,7", 2, 1) == ["2"]
    assert task_gpus("0,1,2,3,4,5", 1, 2) == ["2", "3"]  # more than needed: still its slice
    assert task_gpus(" 0, 1 ,2,3 ", 1, 2) == ["2", "3"]  # spaces are ignored


@pytest.mark.parametrize(
    "visible,local_rank,g,why",
    [
        ("0,1,2", 1, 2, "too few GPUs"),
        ("0", 1, 2, "too few GPUs"),
        ("0,1,2,3", 2, 2, "too few GPUs"),
        ("NoDevFiles", 0, 1, "no GPU"),
        ("-1", 0, 1, "no GPU"),
        (" -1 ", 0, 1, "no GPU"),
        ("0,,1", 0, 2, "empty or repeated"),
        ("0,1,", 0, 2, "empty or repeated"),
        ("0,0", 0, 2, "empty or repeated"),
    ],
)
def test_task_gpus_rejects(visible, local_rank, g, why):
    with pytest.raises(SlurmEnvError) as e:
        task_gpus(visible, local_rank, g)
    msg = str(e.value)
    assert why in msg
    assert f"CUDA_VISIBLE_DEVICES={visible!r}" in msg and f"local_rank={local_rank}" in msg
    assert f"gpus_per_rank={g}" in msg


@pytest.mark.parametrize("local_rank,g", [(-1, 1), (0, 0)])
def test_task_gpus_rejects_bad_arguments(local_rank, g):
    with pytest.raises(SlurmEnvError, match=f"got {local_rank} and {g}"):
        task_gpus(None, local_rank, g)


# ---- task_cpus ----


def test_task_cpus_confined_task_gets_all_its_cores():
    assert task_cpus([7, 5, 6], None, 3) == ["5", "6", "7"]
    assert task_cpus([7, 5, 6], 3, 3) == ["5", "6", "7"]
    assert task_cpus([7, 5, 6], 8, 0) == ["5", "6", "7"]
    assert task_cpus([10, 9, 2], None, 0) == ["2", "9", "10"]  # numeric order, not text order


def test_task_cpus_unconfined_task_gets_its_window():
    cores = list(range(16))
    assert task_cpus(cores, 4, 0) == ["0", "1", "2", "3"]
    assert task_cpus(cores, 4, 1) == ["4", "5", "6", "7"]
    assert task_cpus(cores, 4, 3) == ["12", "13", "14", "15"]
    assert task_cpus(cores, 4, 4) == ["0", "1", "2", "3"]  # wraps around by slot
    windows = [set(task_cpus(cores, 4, s)) for s in range(4)]
    assert set().union(*windows) == set(map(str, cores)) and sum(map(len, windows)) == 16


def test_task_cpus_window_wraps_inside_the_list():
    assert task_cpus(range(10), 4, 2) == ["0", "1", "8", "9"]  # start 8: 8, 9, then 0, 1
    assert task_cpus([40, 10, 30, 20, 50], 2, 1) == ["30", "40"]  # windows of sorted(affinity)


@pytest.mark.parametrize("affinity,cpt,slot", [([], None, 0), ([0, 1], 0, 0), ([0, 1], 1, -1)])
def test_task_cpus_rejects(affinity, cpt, slot):
    with pytest.raises(SlurmEnvError, match=re.escape(f"affinity={affinity} with cpus_per_task={cpt}, slot={slot}")):
        task_cpus(affinity, cpt, slot)
