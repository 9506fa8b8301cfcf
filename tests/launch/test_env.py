"""The environment contract between a launcher and a rank process."""

import socket

import pytest

from hpcinfer.launch.env import VLLM_DP_VARS, RankContext, context_from_env, free_port, rank_env

CTX = dict(
    rank=1,
    world_size=2,
    local_rank=1,
    hosts=["n1", "n2"],
    master_addr="10.0.0.1",
    master_port=29555,
    device_kind="cuda",
    devices=["2", "3"],
)
BASE = {"PATH": "/usr/bin", "HOME": "/home/u", "CUDA_VISIBLE_DEVICES": "0,1,2,3", **{k: "7" for k in VLLM_DP_VARS}}


def make_env(base=None, workers_per_rank=2, cpu_kvcache_gib=3, offline=False, **kw):
    ctx = {**CTX, **kw}
    return rank_env(
        BASE if base is None else base,
        RankContext(**ctx),
        workers_per_rank=workers_per_rank,
        cpu_kvcache_gib=cpu_kvcache_gib,
        offline=offline,
    )


def test_removes_vllm_dp_vars_and_keeps_the_rest():
    env = make_env()
    assert not any(k in env for k in VLLM_DP_VARS)
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/u"
    assert "VLLM_DP_RANK" in BASE  # the base mapping is not modified


def test_sets_hpcinfer_vars():
    env = make_env()
    assert env["HPCINFER_RANK"] == "1"
    assert env["HPCINFER_WORLD_SIZE"] == "2"
    assert env["HPCINFER_LOCAL_RANK"] == "1"
    assert env["HPCINFER_HOSTS"] == "n1,n2"
    assert env["HPCINFER_MASTER_ADDR"] == "10.0.0.1"
    assert env["HPCINFER_MASTER_PORT"] == "29555"
    assert env["HPCINFER_DEVICE_KIND"] == "cuda"
    assert env["HPCINFER_DEVICES"] == "2,3"
    assert all(isinstance(v, str) for v in env.values())


def test_gpu_rank_sees_only_its_gpus():
    env = make_env(devices=["2", "3"])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_cpu_rank_settings():
    env = make_env(device_kind="cpu", devices=["4", "5", "6", "7"], workers_per_rank=1, cpu_kvcache_gib=3)
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # no GPU for a CPU rank, whatever the base said
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "4,5,6,7"
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["HPCINFER_DEVICE_KIND"] == "cpu"


def test_cpu_keeps_user_kvcache_space():
    base = {**BASE, "VLLM_CPU_KVCACHE_SPACE": "40"}
    env = make_env(base, device_kind="cpu", devices=["0", "1"], workers_per_rank=1, cpu_kvcache_gib=3)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "40"


def test_cpu_keeps_user_bind_and_multiprocessing():
    base = {**BASE, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    env = make_env(base, device_kind="cpu", devices=["0", "1"], workers_per_rank=1)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_cpu_two_workers():
    env = make_env({"PATH": "/usr/bin"}, device_kind="cpu", devices=["0", "1", "2", "3"], workers_per_rank=2)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env  # only a single worker runs in-process
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert env["OMP_NUM_THREADS"] == "2"


def test_cpu_two_workers_uneven_cores():
    env = make_env({}, device_kind="cpu", devices=["8", "9", "10"], workers_per_rank=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "8,9|10"


def test_cpu_more_workers_than_cores_share():
    env = make_env({}, device_kind="cpu", devices=["5"], workers_per_rank=2)
    groups = env["VLLM_CPU_OMP_THREADS_BIND"].split("|")
    assert groups == ["5", "5"]  # never an empty group
    assert env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_offline_flags(kind):
    env = make_env({}, device_kind=kind, devices=["0"], workers_per_rank=1, offline=True)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    env = make_env({"HF_HUB_OFFLINE": "0"}, device_kind=kind, devices=["0"], workers_per_rank=1, offline=True)
    assert env["HF_HUB_OFFLINE"] == "0"  # the user's choice wins
    env = make_env({}, device_kind=kind, devices=["0"], workers_per_rank=1, offline=False)
    assert "HF_HUB_OFFLINE" not in env


@pytest.mark.parametrize("kind, devices", [("cuda", ["2", "3"]), ("cuda", ["0"]), ("cpu", ["0", "1", "2"])])
def test_context_round_trip(kind, devices):
    env = make_env(device_kind=kind, devices=devices, workers_per_rank=1)
    ctx = context_from_env(env)
    assert ctx == RankContext(**{**CTX, "device_kind": kind, "devices": devices})
    assert ctx.host == socket.gethostname()


def test_context_defaults():
    ctx = context_from_env({"HPCINFER_RANK": "3", "HPCINFER_WORLD_SIZE": "4"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 3)
    assert ctx.hosts == [] and ctx.devices == [] and ctx.device_kind == "cpu"


@pytest.mark.parametrize("missing", ["HPCINFER_RANK", "HPCINFER_WORLD_SIZE"])
def test_context_requires_rank_vars(missing):
    env = make_env()
    del env[missing]
    with pytest.raises(RuntimeError) as e:
        context_from_env(env)
    assert missing in str(e.value)


def test_free_port_is_bindable():
    port = free_port()
    assert isinstance(port, int) and 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname()[1] == port
