"""Planner arithmetic (model shape, memory per GPU, the plan) and how ranks split devices."""

import copy
import json

import conftest
import pytest

from hpcinfer.cli import compose
from hpcinfer.config import ModelConfig
from hpcinfer.errors import ConfigError
from hpcinfer.planning.devices import Devices, NodeMemory, split
from hpcinfer.planning.layout import (
    GIB,
    cpu_kv_cache_gib,
    cpu_memory_message,
    memory_per_cpu_node,
    memory_per_gpu,
    model_shape,
    smallest_fitting_tp,
)
from hpcinfer.planning.render import format_plan

LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def llama_cfg():
    return compose(["model=llama"])


@pytest.fixture(scope="module")
def tiny_cfg():
    return compose([])


def plan_for(cfg, devices, rows=100, files=1, **plan_kw):
    return conftest.plan_for(cfg, devices, rows, files, model_path=cfg.model.path or "/cache/tiny", **plan_kw)


# ---- model_shape --------------------------------------------------------------------------------
def test_model_shape_from_config_fields(tiny_cfg):
    s = model_shape(tiny_cfg.model)
    assert (s.num_layers, s.num_attention_heads, s.num_kv_heads, s.head_dim) == (4, 4, 2, 64)
    assert s.moe is False and s.num_experts is None
    # 4 x (attention 256*64*(2*4+2*2) + MLP 3*256*512) + untied embeddings 2*3072*256
    want = (4 * (256 * 64 * 12 + 3 * 256 * 512) + 2 * 3072 * 256) / 1e9
    assert s.num_params_b == pytest.approx(want)


def test_model_shape_given_params_win(llama_cfg):
    s = model_shape(llama_cfg.model)
    assert s.num_params_b == 8.03
    assert (s.num_layers, s.num_attention_heads, s.num_kv_heads, s.head_dim) == (32, 32, 8, 128)


def test_model_shape_moe():
    s = model_shape(compose(["model=tiny_moe"]).model)
    assert s.moe is True and s.num_experts == 4
    dense = model_shape(compose([]).model)
    assert s.num_params_b > dense.num_params_b  # 4 experts' MLPs


def test_model_shape_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    s = model_shape(ModelConfig(name="llama-local"), str(tmp_path))
    assert s.num_params_b == pytest.approx(8.03, rel=0.02)
    assert (s.num_layers, s.num_attention_heads, s.num_kv_heads, s.head_dim) == (32, 32, 8, 128)
    assert s.moe is False
    assert s.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2


def test_model_shape_config_fields_beat_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    s = model_shape(ModelConfig(name="x", num_layers=16, num_params_b=4.0), str(tmp_path))
    assert s.num_layers == 16 and s.num_params_b == 4.0
    assert s.num_attention_heads == 32


def test_model_shape_nested_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": LLAMA_8B_CONFIG}))
    s = model_shape(ModelConfig(name="vlm"), str(tmp_path))
    assert s.num_params_b == pytest.approx(8.03, rel=0.02)


def test_model_shape_json_moe(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_8B_CONFIG, "num_local_experts": 8}))
    s = model_shape(ModelConfig(name="mix"), str(tmp_path))
    assert s.moe is True and s.num_experts == 8


def test_model_shape_unknown(tmp_path):
    s = model_shape(ModelConfig(name="hub-only"), str(tmp_path))  # no config.json
    assert s.num_params_b is None and s.num_layers is None
    assert s.kv_bytes_per_token(2) is None


# ---- memory_per_gpu -----------------------------------------------------------------------------
def test_memory_weights_halve_with_tp(llama_cfg):
    shape = model_shape(llama_cfg.model)
    eng = {"dtype": "bfloat16"}
    m1 = memory_per_gpu(shape, eng, 1, 1, 80.0)
    m2 = memory_per_gpu(shape, eng, 2, 1, 80.0)
    assert m1.weights_gib == pytest.approx(8.03e9 * 2 / GIB)
    assert m2.weights_gib == pytest.approx(m1.weights_gib / 2)
    assert memory_per_gpu(shape, eng, 1, 2, 80.0).weights_gib == pytest.approx(m1.weights_gib / 2)
    assert m1.budget_gib == pytest.approx(72.0)  # default gpu_memory_utilization 0.9
    assert m1.kv_gib == pytest.approx(72.0 - m1.weights_gib - 1.0)
    assert m1.fits and m2.fits
    # KV bytes per token are split over tp: twice the tokens in more room
    assert m2.kv_tokens > 2 * m1.kv_tokens * 0.99


def test_memory_dtype_and_utilization(llama_cfg):
    shape = model_shape(llama_cfg.model)
    m32 = memory_per_gpu(shape, {"dtype": "float32", "gpu_memory_utilization": 0.5}, 1, 1, 80.0)
    assert m32.weights_gib == pytest.approx(8.03e9 * 4 / GIB)
    assert m32.budget_gib == pytest.approx(40.0)


def test_memory_does_not_fit(llama_cfg):
    shape = model_shape(llama_cfg.model)
    m = memory_per_gpu(shape, {}, 1, 1, 16.0)
    assert not m.fits and m.kv_gib < 0 and m.kv_tokens is None
    assert smallest_fitting_tp(shape, {}, 16.0) == 2


def test_memory_unknown_gpu(llama_cfg):
    m = memory_per_gpu(model_shape(llama_cfg.model), {}, 1, 1, None)
    assert m.kv_gib is None and m.fits  # nothing known: no claim it does not fit


# ---- memory on CPU: per engine worker, per node ------------------------------------------------
MACHINE = NodeMemory(23.4, "this machine's memory (MemTotal)", "dp")  # this 24 GiB CPU machine
TEST_NODE = NodeMemory(4.0, "a node of partition 'debug' (RealMemory)", "cluster.ranks_per_node")  # slurm/cluster.sh
CPUS = Devices(cpus=[0, 1])


def test_cpu_kv_cache_from_the_config_or_the_environment():
    assert cpu_kv_cache_gib(1, {}) == (1.0, "cluster.cpu_kvcache_gib")
    assert cpu_kv_cache_gib(2, {"VLLM_CPU_KVCACHE_SPACE": ""}) == (2.0, "cluster.cpu_kvcache_gib")
    assert cpu_kv_cache_gib(1, {"VLLM_CPU_KVCACHE_SPACE": "4"}) == (4.0, "VLLM_CPU_KVCACHE_SPACE")
    with pytest.raises(ConfigError, match="VLLM_CPU_KVCACHE_SPACE='4G' in the environment must be a whole number"):
        cpu_kv_cache_gib(1, {"VLLM_CPU_KVCACHE_SPACE": "4G"})


def test_memory_per_cpu_node_arithmetic(llama_cfg):
    shape = model_shape(llama_cfg.model)
    w = 8.03e9 * 2 / GIB  # bf16 weights of one worker at tp=1
    m = memory_per_cpu_node(shape, {"dtype": "bfloat16"}, 1, 1, 1.0, 8, 1, MACHINE)
    assert m.weights_gib == pytest.approx(w) and m.kv_gib == 1.0
    assert m.node_workers == 8 and m.node_need_gib == pytest.approx(8 * (w + 1))
    assert m.node_gib == 23.4 and m.node_source == MACHINE.source and not m.fits
    assert m.kv_tokens == GIB // (2 * 32 * 8 * 128 * 2)
    # tp=2: each of the 2 workers of a rank holds half the weights and its own KV cache
    m2 = memory_per_cpu_node(shape, {"dtype": "bfloat16"}, 2, 1, 1.0, 1, 2, MACHINE)
    assert m2.weights_gib == pytest.approx(w / 2) and m2.node_workers == 2
    assert m2.node_need_gib == pytest.approx(2 * (w / 2 + 1)) and m2.fits
    assert memory_per_cpu_node(shape, {"dtype": "bfloat16"}, 1, 1, 1.0, 1, 1, MACHINE).fits


def test_cpu_memory_ignores_kv_cache_memory_bytes_and_unknowns(llama_cfg, tiny_cfg):
    shape = model_shape(llama_cfg.model)
    m = memory_per_cpu_node(shape, {"kv_cache_memory_bytes": 2**28}, 1, 1, 3.0, 1, 1, MACHINE)
    assert m.kv_gib == 3.0  # what vLLM's CPU build does: VLLM_CPU_KVCACHE_SPACE wins
    unknown_node = memory_per_cpu_node(shape, {}, 1, 1, 1.0, 64, 1, None)
    assert unknown_node.fits and unknown_node.node_gib is None and unknown_node.node_need_gib > 64 * 14
    unknown_size = memory_per_cpu_node(model_shape(ModelConfig(name="hub")), {}, 1, 1, 1.0, 64, 1, MACHINE)
    assert unknown_size.fits and unknown_size.node_need_gib is None
    tiny = memory_per_cpu_node(model_shape(tiny_cfg.model), {"dtype": "float32"}, 1, 1, 1.0, 4, 1, MACHINE)
    assert tiny.fits and tiny.node_need_gib < 4.1


def test_cpu_memory_message(llama_cfg):
    m = memory_per_cpu_node(model_shape(llama_cfg.model), {"dtype": "bfloat16"}, 1, 1, 1.0, 8, 1, MACHINE)
    assert cpu_memory_message("llama", m, 8, 1, "dp", "cluster.cpu_kvcache_gib") == (
        "model 'llama' does not fit in memory: 8 rank(s) x (14.96 GiB weights + 1 GiB KV cache) = 127.7 GiB "
        "> 23.4 GiB of this machine's memory (MemTotal); use dp=1 or a smaller model"
    )


def test_plan_cpu_refuses_ranks_beyond_the_machines_memory(llama_cfg):
    """plan model=llama dp=8 on a 24 GiB CPU machine used to plan eight 15 GiB engines."""
    cfg = copy.deepcopy(llama_cfg)
    cfg.dp = 8
    with pytest.raises(ConfigError) as e:
        plan_for(cfg, CPUS, node_memory=MACHINE)
    assert str(e.value) == (
        "model 'llama-3.1-8b-instruct' does not fit in memory: 8 rank(s) x (14.96 GiB weights + 1 GiB KV cache) "
        "= 127.7 GiB > 23.4 GiB of this machine's memory (MemTotal); use dp=1 or a smaller model"
    )
    cfg.dp, cfg.tp = 2, 2  # tp does not help on one machine: the same weights in 2 workers each
    with pytest.raises(
        ConfigError, match=r"2 rank\(s\) x 2 worker\(s\) x \(7.48 GiB weights \+ 1 GiB KV cache\) = 33.9"
    ):
        plan_for(cfg, CPUS, node_memory=MACHINE)
    cfg.dp, cfg.tp = 1, 1
    plan = plan_for(cfg, CPUS, node_memory=MACHINE)
    assert plan.memory.fits and plan.memory.node_need_gib == pytest.approx(15.96, abs=0.01)


def test_plan_cpu_kv_cache_from_the_environment_counts(llama_cfg):
    with pytest.raises(
        ConfigError,
        match=r"\(1.86 GiB weights \+ 16 GiB KV cache\) = 17.9 GiB > 16.0 GiB .*lower its KV cache \(VLLM_CPU_KVCACHE_SPACE\)",
    ):
        plan_for(
            compose(["model=llama", "model.num_params_b=1"]),
            CPUS,
            node_memory=NodeMemory(16.0, "m", "dp"),
            cpu_kv=(16.0, "VLLM_CPU_KVCACHE_SPACE"),
        )


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_the_tiny_models_fit(model, dp):
    """What the test suite runs: dp=1..4 of the built-in models on this machine and on the test
    Slurm cluster's 4 GiB nodes (one rank each)."""
    plan_for(compose([f"model={model}", f"dp={dp}"]), CPUS, node_memory=MACHINE)
    plan_for(compose([f"model={model}", f"dp={dp}", "cluster=slurm_cpu"]), CPUS, node_memory=TEST_NODE)
    plan_for(
        compose([f"model={model}", "tp=2", "cluster=slurm_cpu", "cluster.workers_per_node=1"]),
        CPUS,
        node_memory=TEST_NODE,
    )


def test_plan_slurm_cpu_node_memory():
    with pytest.raises(ConfigError) as e:
        plan_for(compose(["model=llama", "cluster=slurm_cpu"]), CPUS, node_memory=TEST_NODE)
    assert (
        "1 rank(s) x (14.96 GiB weights + 1 GiB KV cache) = 16.0 GiB > 4.0 GiB of a node of partition 'debug'"
        in str(e.value)
    )
    assert "even one rank's weights do not fit" in str(e.value)
    cfg = compose(["cluster=slurm_cpu", "dp=4", "cluster.ranks_per_node=2", "cluster.cpu_kvcache_gib=2"])
    with pytest.raises(
        ConfigError, match=r"2 rank\(s\) x .* > 4.0 GiB .*; use cluster.ranks_per_node=1 or a smaller model"
    ):
        plan_for(cfg, CPUS, node_memory=TEST_NODE)


def test_plan_cpu_unknown_node_memory_is_noted(tiny_cfg):
    plan = plan_for(tiny_cfg, CPUS)
    assert plan.memory.fits and plan.memory.node_gib is None
    assert any(n.startswith("memory not checked: 1 engine worker(s) on a node need 1.0 GiB") for n in plan.notes)
    assert not any("memory not checked" in n for n in plan_for(tiny_cfg, CPUS, node_memory=MACHINE).notes)


def test_plan_cpu_notes_engine_memory_settings_it_ignores(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.engine["kv_cache_memory_bytes"] = 2**30
    cfg.engine["gpu_memory_utilization"] = 0.5
    notes = plan_for(cfg, CPUS, node_memory=MACHINE).notes
    assert "engine.kv_cache_memory_bytes=1073741824 has no effect on CPU" in " ".join(notes)
    assert "engine.gpu_memory_utilization=0.5 has no effect on CPU" in " ".join(notes)
    assert not any("no effect" in n for n in plan_for(tiny_cfg, CPUS, node_memory=MACHINE).notes)  # model defaults
    assert not any("no effect" in n for n in plan_for(cfg, Devices(gpus=["0"], gpu_memory_gib=80)).notes)


def test_format_plan_cpu_memory_line(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dp = 2
    text = format_plan(plan_for(cfg, CPUS, node_memory=MACHINE))
    line = next(x for x in text.splitlines() if x.startswith("memory "))
    assert line.startswith("memory     per engine worker: weights 0.01 GiB + KV cache 1.00 GiB (~262,144 tokens)")
    assert line.endswith("; per node 2 worker(s) = 2.0 GiB of 23.4 GiB, this machine's memory (MemTotal)")


def test_prepare_checks_the_launchers_node_memory(llama_cfg, tmp_path, monkeypatch):
    from hpcinfer.launch.local import LocalLauncher
    from hpcinfer.planning.prepare import prepare

    cfg = copy.deepcopy(llama_cfg)
    cfg.cluster.gpus = 0
    cfg.dp = 2
    cfg.cache_dir = str(tmp_path / "cache")
    monkeypatch.setattr(LocalLauncher, "node_memory", lambda self: NodeMemory(20.0, "this test's machine", "dp"))
    with pytest.raises(ConfigError, match=r"2 rank\(s\) x .* > 20.0 GiB of this test's machine; use dp=1"):
        prepare(cfg, LocalLauncher(cfg), build=False)
    cfg.dp = 1
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert prepare(cfg, LocalLauncher(cfg), build=False).plan.memory.kv_gib == 3.0


# ---- make_plan ----------------------------------------------------------------------------------
def test_plan_too_big_for_one_gpu_suggests_tp(llama_cfg):
    with pytest.raises(ConfigError) as e:
        plan_for(llama_cfg, Devices(gpus=["0"], gpu_memory_gib=16))
    msg = str(e.value)
    assert "does not fit" in msg
    assert "try tp=2" in msg
    assert "tp=1" in msg and "16 GiB" in msg


def test_plan_fits_80gib(llama_cfg):
    plan = plan_for(llama_cfg, Devices(gpus=["0"], gpu_memory_gib=80))
    assert plan.device_kind == "cuda"
    assert (plan.tp, plan.pp, plan.dp, plan.ranks) == (1, 1, 1, 1)
    assert plan.memory.fits
    assert plan.rank_plans[0].devices == ["0"]
    assert plan.rank_plans[0].rows == 100
    assert plan.notes == []
    assert plan.engine_args["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert plan.model["name"] == "llama-3.1-8b-instruct"
    json.dumps(plan.to_json())  # plan.json must be serialisable


def test_plan_cluster_gpu_memory_overrides_detected(llama_cfg):
    cfg = copy.deepcopy(llama_cfg)
    cfg.cluster.gpu_memory_gib = 80.0
    plan = plan_for(cfg, Devices(gpus=["0"], gpu_memory_gib=16))
    assert plan.memory.gpu_memory_gib == 80.0


def test_plan_tp_on_model_that_fits_adds_note(llama_cfg):
    cfg = copy.deepcopy(llama_cfg)
    cfg.tp = 2
    plan = plan_for(cfg, Devices(gpus=["0", "1"], gpu_memory_gib=80))
    assert any("fits one GPU" in n and "dp=2" in n for n in plan.notes)
    assert plan.rank_plans[0].devices == ["0", "1"]


def test_plan_more_ranks_than_rows_notes_it(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dp = 4
    plan = plan_for(cfg, Devices(gpus=[], cpus=[0, 1, 2, 3]), rows=2)
    assert plan.ranks == 2 and len(plan.rank_plans) == 2
    assert any("only 2 input row(s) for dp=4" in n for n in plan.notes)


def test_plan_cpu(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dp = 2
    plan = plan_for(cfg, Devices(gpus=[], cpus=[0, 1, 2, 3]), rows=10)
    assert plan.device_kind == "cpu"
    assert [rp.devices for rp in plan.rank_plans] == [["0", "1"], ["2", "3"]]
    assert [rp.rows for rp in plan.rank_plans] == [5, 5]
    # VLLM_CPU_KVCACHE_SPACE (cluster.cpu_kvcache_gib), which vLLM's CPU build puts in place of the
    # tiny model's kv_cache_memory_bytes (256 MiB)
    assert plan.memory.kv_gib == pytest.approx(1.0)


def test_plan_cpu_oversubscribed_note(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dp = 3
    plan = plan_for(cfg, Devices(gpus=[], cpus=[0, 1]), rows=10)
    assert any("3 CPU worker(s) share 2 core(s)" in n for n in plan.notes)


def test_plan_rank_shards(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dp = 2
    cfg.data.shard_rows = 3
    plan = plan_for(cfg, Devices(gpus=["0", "1"], gpu_memory_gib=80), rows=10, files=2)
    assert plan.shards == sum(len(rp.shards) for rp in plan.rank_plans)
    assert [rp.rows for rp in plan.rank_plans] == [5, 5]
    assert plan.rank_plans[0].shards == [0, 1] and plan.rank_plans[1].shards == [2, 3]


def test_format_plan_gpu(llama_cfg):
    cfg = copy.deepcopy(llama_cfg)
    cfg.dp = 2
    plan = plan_for(cfg, Devices(gpus=["0", "1"], gpu_memory_gib=80), rows=10)
    text = format_plan(plan)
    lines = text.splitlines()
    assert "layout     dp=2 x tp=1 x pp=1 = 2 GPU(s), ep=off" in lines
    rank_lines = [line for line in lines if line.startswith("  rank ")]
    assert len(rank_lines) == 2
    assert "gpu 0" in rank_lines[0] and "5 rows" in rank_lines[0]
    assert "gpu 1" in rank_lines[1]
    assert "8.03B params" in text
    assert "memory     per GPU: weights" in text


def test_format_plan_cpu(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dp = 3
    plan = plan_for(cfg, Devices(gpus=[], cpus=[0, 1, 2]), rows=7)
    text = format_plan(plan)
    assert "dp=3 x tp=1 x pp=1 = 3 engine worker(s) on CPU" in text
    assert len([line for line in text.splitlines() if line.startswith("  rank ")]) == 3
    assert "7 rows in 1 file(s)" in text


# ---- devices.split ------------------------------------------------------------------------------
def test_split_gpus_in_groups():
    d = Devices(gpus=[str(i) for i in range(8)])
    assert split(d, 2, 4) == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert split(d, 8, 1) == [[str(i)] for i in range(8)]
    assert split(d, 3, 2) == [["0", "1"], ["2", "3"], ["4", "5"]]


def test_split_gpus_uses_visible_ids():
    d = Devices(gpus=["3", "5", "6", "7"])
    assert split(d, 2, 2) == [["3", "5"], ["6", "7"]]


def test_split_too_few_gpus():
    with pytest.raises(ValueError):
        split(Devices(gpus=["0", "1"]), 2, 2)


def test_split_cpu_near_equal_contiguous():
    d = Devices(cpus=list(range(10)))
    groups = split(d, 3, 1)
    assert groups == [["0", "1", "2", "3"], ["4", "5", "6"], ["7", "8", "9"]]
    assert split(Devices(cpus=[4, 5, 6, 7]), 1, 1) == [["4", "5", "6", "7"]]


def test_split_cpu_more_ranks_than_cores_round_robin():
    assert split(Devices(cpus=[0, 1]), 5, 1) == [["0"], ["1"], ["0"], ["1"], ["0"]]
    assert split(Devices(cpus=[2, 3]), 2, 1) == [["2"], ["3"]]


# ---- prepare(build=False): the plan-only path ---------------------------------------------------
def test_prepare_plan_only_writes_nothing(tiny_cfg, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hpcinfer.launch import launcher_for
    from hpcinfer.planning.models import BUILD_VERSION
    from hpcinfer.planning.prepare import prepare

    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(9)]}), data)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.dp = 2
    cfg.cluster.gpus = 0  # CPU layout whatever this machine has
    cfg.data.input = str(data)
    cfg.cache_dir = str(tmp_path / "cache")
    before = sorted(p.name for p in tmp_path.iterdir())
    prep = prepare(cfg, launcher_for(cfg), build=False)
    assert prep.plan.rows == 9 and prep.plan.ranks == 2 and prep.plan.device_kind == "cpu"
    assert [rp.rows for rp in prep.plan.rank_plans] == [5, 4]
    assert prep.plan.engine_args["model"] == str(tmp_path / "cache" / "models" / f"tiny-llama-{BUILD_VERSION}")
    # "With build=False (plan only) nothing is written": not even the cache directory
    assert sorted(p.name for p in tmp_path.iterdir()) == before
