"""Config composition (Hydra overrides -> typed RunConfig), validation rules and engine_args."""

import copy

import pytest

from hpcinfer import config
from hpcinfer.cli import compose, compose_sweep
from hpcinfer.config import LocalClusterConfig, RunConfig, engine_args, validate
from hpcinfer.errors import ConfigError


@pytest.fixture(scope="module")
def composed_default() -> RunConfig:
    return compose([])


@pytest.fixture
def cfg(composed_default) -> RunConfig:
    """A fresh, mutable copy of the default config (tiny model, local cluster)."""
    return copy.deepcopy(composed_default)


@pytest.fixture(scope="module")
def composed_moe() -> RunConfig:
    return compose(["model=tiny_moe"])


def validation_error(cfg, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg, **kw)
    return str(e.value)


# ---- composition -------------------------------------------------------------------------
def test_defaults(cfg):
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == "tiny"
    assert cfg.model.builtin == "tiny-llama"
    assert (cfg.tp, cfg.pp, cfg.dp, cfg.ep) == (1, 1, 1, False)
    assert isinstance(cfg.cluster, LocalClusterConfig)
    assert cfg.cluster.name == "local"
    assert cfg.data.input is None
    assert cfg.run_dir is None
    validate(cfg)  # the default config is valid


def test_layout_overrides_parse_with_types():
    c = compose(["tp=2", "pp=1", "dp=8", "ep=true"])  # compose does not validate (ep on dense)
    assert (c.tp, c.pp, c.dp, c.ep) == (2, 1, 8, True)
    assert all(type(v) is int for v in (c.tp, c.pp, c.dp))
    assert c.ep is True
    assert c.gpus_per_rank == 2
    assert c.world_gpus == 16


def test_engine_overrides_reach_engine_args():
    c = compose(["engine.max_model_len=128", "+engine.kv_cache_dtype=fp8"])
    args = engine_args(c, "/models/x")
    assert args["max_model_len"] == 128  # top-level override beats the model default (512)
    assert args["kv_cache_dtype"] == "fp8"
    assert args["model"] == "/models/x"


def test_group_and_nested_overrides():
    c = compose(["model=tiny_moe", "sampling=greedy", "sampling.max_tokens=7", "data.shard_rows=5"])
    assert c.model.name == "tiny_moe" and c.model.moe is True
    assert c.sampling.temperature == 0.0
    assert c.sampling.max_tokens == 7
    assert c.data.shard_rows == 5


@pytest.mark.parametrize(
    "override, must_name",
    [
        ("foo=1", "foo"),
        ("tp=abc", "abc"),
        ("model=nope", "nope"),
        ("engine.not_a_vllm_arg=1", "not_a_vllm_arg"),  # needs '+' to add a key
        ("sampling.temperature=hot", "hot"),
    ],
)
def test_bad_overrides_raise_one_line_config_error(override, must_name):
    with pytest.raises(ConfigError) as e:
        compose([override])
    msg = str(e.value)
    assert must_name in msg
    assert "\n" not in msg
    assert "Traceback" not in msg


def test_bad_type_message_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        compose(["tp=abc"])
    assert "tp=abc" in str(e.value)


def test_sweep_gives_cartesian_product():
    cfgs = compose_sweep(["tp=1,2", "dp=1,2"])
    assert len(cfgs) == 4
    assert sorted((c.tp, c.dp) for c in cfgs) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_sweep_without_sweep_override_gives_one_config():
    cfgs = compose_sweep(["tp=2"])
    assert len(cfgs) == 1 and cfgs[0].tp == 2


def test_sweep_with_bad_value_raises():
    with pytest.raises(ConfigError):
        compose_sweep(["tp=1,abc"])


# ---- validate: layout ----------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("dp", 0), ("tp", -1), ("pp", 0), ("dp", -3)])
def test_layout_sizes_must_be_positive(cfg, key, value):
    setattr(cfg, key, value)
    msg = validation_error(cfg)
    assert f"{key}={value}" in msg


def test_tp_must_divide_heads(cfg):
    cfg.tp = 3
    msg = validation_error(cfg)
    assert "tp=3" in msg
    assert "heads" in msg
    assert "4" in msg


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_dividing_heads_is_ok(cfg, tp):
    cfg.tp = tp
    validate(cfg)


def test_pp_beyond_layers(cfg):
    cfg.pp = 5  # tiny has 4 layers
    msg = validation_error(cfg)
    assert "pp=5" in msg and "4 layers" in msg


def test_ep_on_dense_model_is_an_error(cfg):
    cfg.ep = True
    msg = validation_error(cfg)
    assert "ep=true" in msg
    assert "dense" in msg
    assert "'tiny'" in msg


def test_ep_on_moe_model_is_ok(composed_moe):
    c = copy.deepcopy(composed_moe)
    c.ep = True
    validate(c)


def test_gpu_count_check(cfg):
    cfg.dp, cfg.tp = 4, 2
    msg = validation_error(cfg, gpus_available=4)
    assert "8" in msg and "4" in msg
    assert "needs 8 GPUs" in msg and "offers 4" in msg


@pytest.mark.parametrize("gpus,refused", [(None, False), (0, False), (7, True), (8, False), (16, False)])
def test_gpu_count_is_checked_only_when_known(cfg, gpus, refused):
    """dp=4 x tp=2 needs 8 GPUs: refused with 7; not checked when unknown (None) or on a CPU-only
    machine (0, where ranks run on cores); the limit is exactly the count offered."""
    cfg.dp, cfg.tp = 4, 2
    if refused:
        assert "needs 8 GPUs" in validation_error(cfg, gpus_available=gpus)
    else:
        validate(cfg, gpus_available=gpus)


# ---- validate: sampling ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, quoted",
    [
        ("temperature", -1.0, "-1.0"),
        ("top_p", 0.0, "0.0"),
        ("top_p", 1.5, "1.5"),
        ("max_tokens", 0, "got 0"),
        ("min_p", 2.0, "2.0"),
        ("top_k", -2, "-2"),
        ("repetition_penalty", 0.0, "0.0"),
        ("presence_penalty", 2.5, "2.5"),
        ("frequency_penalty", -3.0, "-3.0"),
        ("seed", -1, "-1"),
    ],
)
def test_sampling_ranges(cfg, field, value, quoted):
    setattr(cfg.sampling, field, value)
    msg = validation_error(cfg)
    assert f"sampling.{field}" in msg
    assert quoted in msg


def test_sampling_ranges_via_overrides():
    c = compose(["sampling.temperature=-1"])
    msg = validation_error(c)
    assert "sampling.temperature" in msg and "-1" in msg


@pytest.mark.parametrize(
    "field, value",
    [("top_p", 1.0), ("min_p", 1.0), ("min_p", 0.0), ("top_k", -1), ("seed", None), ("temperature", 0.0)],
)
def test_sampling_boundaries_are_valid(cfg, field, value):
    setattr(cfg.sampling, field, value)
    validate(cfg)


def test_several_errors_are_reported_together(cfg):
    cfg.dp = 0
    cfg.sampling.top_p = 0.0
    msg = validation_error(cfg)
    assert "dp=0" in msg and "sampling.top_p" in msg


# ---- validate: engine -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, layout_name",
    [
        ("tensor_parallel_size", 2, "tp"),
        ("pipeline_parallel_size", 2, "pp"),
        ("data_parallel_size", 2, "dp"),
        ("enable_expert_parallel", True, "ep"),
        ("model", "/models/x", "model.path"),
    ],
)
def test_layout_keys_under_engine_are_errors(cfg, key, value, layout_name):
    cfg.engine[key] = value
    msg = validation_error(cfg)
    assert f"engine.{key}" in msg
    assert f"set {layout_name} instead" in msg


def test_layout_key_under_model_engine_is_an_error(cfg):
    cfg.model.engine["tensor_parallel_size"] = 2
    msg = validation_error(cfg)
    assert "model.engine.tensor_parallel_size" in msg and "set tp instead" in msg


def test_layout_key_via_override_is_an_error():
    c = compose(["+engine.tensor_parallel_size=2"])
    msg = validation_error(c)
    assert "tensor_parallel_size" in msg and "tp" in msg


def test_null_layout_key_under_engine_is_ignored(cfg):
    cfg.engine["tensor_parallel_size"] = None
    validate(cfg)


@pytest.mark.parametrize("max_tokens, mml", [(512, 512), (600, 512), (128, 128)])
def test_max_tokens_must_leave_room_in_max_model_len(cfg, max_tokens, mml):
    cfg.sampling.max_tokens = max_tokens
    cfg.engine["max_model_len"] = mml
    msg = validation_error(cfg)
    assert f"sampling.max_tokens={max_tokens}" in msg
    assert f"max_model_len={mml}" in msg


def test_max_tokens_below_max_model_len_is_ok(cfg):
    cfg.sampling.max_tokens = 511
    validate(cfg)  # tiny: max_model_len=512


@pytest.mark.parametrize("mml", [1, 0, "big"])
def test_bad_max_model_len(cfg, mml):
    cfg.engine["max_model_len"] = mml
    msg = validation_error(cfg)
    assert "engine.max_model_len" in msg and repr(mml) in msg


@pytest.mark.parametrize("gmu", [0, 1.5, -0.1])
def test_bad_gpu_memory_utilization(cfg, gmu):
    cfg.engine["gpu_memory_utilization"] = gmu
    msg = validation_error(cfg)
    assert "engine.gpu_memory_utilization" in msg and repr(gmu) in msg


def test_non_numeric_gpu_memory_utilization_is_a_config_error():
    # engine.* values are untyped (Dict[str, Any]), so a typo reaches validate() as a string.
    c = compose(["engine.gpu_memory_utilization=abc"])
    msg = validation_error(c)
    assert "engine.gpu_memory_utilization" in msg and "abc" in msg


# ---- validate: model and data -------------------------------------------------------------------
def test_missing_local_model_path():
    c = compose(["model=llama", "model.path=/nonexistent/x"])
    msg = validation_error(c)
    assert "model.path='/nonexistent/x'" in msg
    assert "does not exist" in msg


def test_existing_local_model_path_is_ok(tmp_path):
    c = compose(["model=llama", f"model.path={tmp_path}"])
    validate(c)


def test_hub_id_is_not_checked_locally():
    c = compose(["model=llama"])  # path: meta-llama/Llama-3.1-8B-Instruct
    validate(c)


def test_model_without_path_or_builtin(cfg):
    cfg.model.builtin = None
    msg = validation_error(cfg)
    assert "has no path" in msg and "'tiny'" in msg


def test_unknown_builtin(cfg):
    cfg.model.builtin = "tiny-gpt"
    msg = validation_error(cfg)
    assert "model.builtin='tiny-gpt'" in msg


@pytest.mark.parametrize("group, builtin", [("tiny", "tiny-llama"), ("tiny_moe", "tiny-mixtral")])
def test_model_path_on_a_builtin_model_is_refused(group, builtin):
    """model.path without model=llama used to run the built-in model and ignore the path."""
    msg = validation_error(compose([f"model={group}", "model.path=/models/x"]))
    assert f"model.path='/models/x' is set, but model '{group}' is the built-in '{builtin}'" in msg
    assert "use model=llama model.path=/models/x" in msg


def test_model_builtin_on_a_model_with_a_path_is_refused():
    msg = validation_error(compose(["model=llama", "model.builtin=tiny-llama"]))
    assert "model.path='meta-llama/Llama-3.1-8B-Instruct' is set" in msg


# ---- validate: values this config would ignore ----------------------------------------------------
COMPOSED_DEFAULTS = [
    [],
    ["model=tiny_moe"],
    ["model=llama"],
    ["sampling=greedy"],
    ["schedule.mode=static"],
    ["model=tiny_moe", "ep=true"],
    ["cluster=slurm"],
    ["cluster=slurm_cpu"],
    ["cluster=slurm", "model=tiny_moe", "ep=true", "dp=2"],
    ["data.input=/data/x.parquet"],
    ["cluster.gpus=0"],
]


@pytest.mark.parametrize("overrides", COMPOSED_DEFAULTS, ids=" ".join)
def test_defaults_of_every_group_are_not_refused_as_ignored(overrides):
    """Only values that differ from the defaults were set by the user: the defaults of conf/*.yaml
    never count as a value that would be ignored."""
    validate(compose(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["schedule.mode=static", "schedule.shards_per_rank=16"],
            "schedule.shards_per_rank=16 applies only to the dynamic schedule, and this run is static "
            "(schedule.mode=static)",
        ),
        (["schedule.mode=static", "schedule.lease_s=30"], "schedule.lease_s=30.0 applies only to the dynamic"),
        (["model=tiny_moe", "ep=true", "schedule.lease_s=30"], "(ep=true: lockstep ranks always run static)"),
        (
            ["data.input=/data/x.parquet", "data.demo_rows=40"],
            "data.demo_rows=40 applies only to the built-in demo prompts (data.input=null), and "
            "data.input='/data/x.parquet' is set",
        ),
        (
            ["cluster=slurm", "cluster.cpu_kvcache_gib=4"],
            "cluster.cpu_kvcache_gib=4 applies only to CPU nodes (cluster.gpus_per_node=0)",
        ),
        (["cluster=slurm_cpu", "cluster.gpu_memory_gib=80"], "cluster.gpu_memory_gib=80.0 applies only to GPU nodes"),
    ],
)
def test_values_that_would_be_ignored_are_refused(overrides, message):
    assert message in validation_error(compose(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["schedule.shards_per_rank=16", "schedule.lease_s=30"],  # dynamic: both apply
        ["model=tiny_moe", "schedule.mode=static", "schedule.shards_per_rank=8"],  # the default value
        ["data.demo_rows=40"],
        ["cluster=slurm_cpu", "cluster.cpu_kvcache_gib=4"],
        ["cluster=slurm", "cluster.gpu_memory_gib=80"],
    ],
    ids=" ".join,
)
def test_values_that_apply_are_accepted(overrides):
    validate(compose(overrides))


def test_a_key_of_another_cluster_kind_names_its_kind():
    with pytest.raises(ConfigError) as e:
        compose(["cluster=slurm", "cluster.gpus=4"])
    assert "unknown config key 'cluster.gpus' for the chosen cluster: only cluster=local has it" in str(e.value)
    with pytest.raises(ConfigError, match="only cluster=slurm has it"):
        compose(["cluster.partition=gpu"])


@pytest.mark.parametrize("column", ["error", "generated_text"])
def test_prompt_column_cannot_be_an_output_column(cfg, column):
    cfg.data.prompt_column = column
    msg = validation_error(cfg)
    assert repr(column) in msg


def test_id_column_must_differ_from_prompt_column(cfg):
    cfg.data.id_column = "prompt"
    msg = validation_error(cfg)
    assert "data.id_column='prompt'" in msg


def test_shard_rows_must_be_positive(cfg):
    cfg.data.shard_rows = 0
    msg = validation_error(cfg)
    assert "data.shard_rows" in msg and "0" in msg


# ---- engine_args --------------------------------------------------------------------------------
def test_engine_args_model_defaults_and_layout(cfg):
    args = engine_args(cfg, "/cache/tiny")
    assert args == {
        "model": "/cache/tiny",
        "dtype": cfg.model.engine["dtype"],  # whatever conf/model/tiny.yaml chooses
        "max_model_len": 512,
        "enforce_eager": True,
        "seed": 0,
        "kv_cache_memory_bytes": 268435456,
        "enable_prefix_caching": True,  # schedule.prefix=auto: placement is for the prefix cache
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
    }


def test_engine_args_prefix_caching_follows_schedule_prefix(cfg):
    cfg.schedule.prefix = "off"
    assert "enable_prefix_caching" not in engine_args(cfg, "m")  # the model's default
    cfg.schedule.prefix = "on"
    assert engine_args(cfg, "m")["enable_prefix_caching"] is True
    cfg.engine["enable_prefix_caching"] = False  # what the user sets wins
    assert engine_args(cfg, "m")["enable_prefix_caching"] is False


def test_schedule_prefix_must_be_known(cfg):
    cfg.schedule.prefix = "maybe"
    assert "schedule.prefix" in validation_error(cfg)


def test_engine_args_top_level_overrides_model_defaults(cfg):
    cfg.engine["max_model_len"] = 256
    other = "float16" if cfg.model.engine["dtype"] != "float16" else "float32"
    cfg.engine["dtype"] = other
    cfg.engine["max_num_seqs"] = 8
    args = engine_args(cfg, "m")
    assert args["max_model_len"] == 256
    assert args["dtype"] == other
    assert args["max_num_seqs"] == 8
    assert args["enforce_eager"] is True  # untouched model default


def test_engine_args_nulls_ignored(cfg):
    model_dtype = cfg.model.engine["dtype"]
    assert model_dtype is not None
    cfg.engine["dtype"] = None  # "not set": the model default stays
    cfg.model.engine["quantization"] = None
    args = engine_args(cfg, "m")
    assert args["dtype"] == model_dtype
    assert "quantization" not in args
    assert None not in args.values()


@pytest.mark.parametrize(
    "temperature, seed, fmt, device, chunked",
    [
        (0.7, 0, "parquet", "cpu", False),  # sampled with seeds on CPU: unchunked (vLLM 0.32 CPU generators)
        (0.0, 0, "openai_batch", "cpu", False),  # a line's body may sample; hpcinfer seeds it
        (0.0, 0, "parquet", "cpu", None),  # greedy: no generator, vLLM's default
        (0.7, None, "parquet", "cpu", None),  # unseeded: no generator to rewind
        (0.7, 0, "parquet", "cuda", None),  # GPU generators rewind: vLLM's default
        (0.7, 0, None, None, None),  # device unknown (tests, tools): vLLM's default
    ],
)
def test_engine_args_chunked_prefill_off_only_for_seeded_sampling_on_cpu(cfg, temperature, seed, fmt, device, chunked):
    cfg.sampling.temperature, cfg.sampling.seed = temperature, seed
    assert engine_args(cfg, "m", device, fmt).get("enable_chunked_prefill") is chunked


def test_engine_args_chunked_prefill_the_user_set_wins(cfg):
    cfg.sampling.temperature = 0.7
    cfg.engine["enable_chunked_prefill"] = True
    assert engine_args(cfg, "m", "cpu", "parquet")["enable_chunked_prefill"] is True


def test_engine_args_layout(cfg):
    cfg.tp, cfg.pp, cfg.dp = 2, 2, 4
    args = engine_args(cfg, "m")
    assert args["tensor_parallel_size"] == 2
    assert args["pipeline_parallel_size"] == 2
    assert "data_parallel_size" not in args  # dp = independent engines, not a vLLM arg
    assert "enable_expert_parallel" not in args


def test_engine_args_ep_only_when_ep(composed_moe):
    c = copy.deepcopy(composed_moe)
    assert "enable_expert_parallel" not in engine_args(c, "m")
    c.ep = True
    assert engine_args(c, "m")["enable_expert_parallel"] is True


def test_engine_args_is_pure(cfg):
    before = copy.deepcopy(cfg)
    engine_args(cfg, "m")
    assert cfg == before


def test_yaml_round_trip(cfg, tmp_path):
    cfg.tp = 2
    cfg.engine["max_model_len"] = 300
    p = tmp_path / "config.yaml"
    p.write_text(config.to_yaml(cfg))
    assert config.load_run_config(p) == cfg


def test_a_model_path_on_a_model_group_drops_the_groups_shape(tmp_path):
    """`model=llama model.path=<other>`: llama's shape fields and name describe Llama-3.1-8B, not
    the model at the path, so they are cleared (the plan reads the path's config.json) — but a
    shape field set on the command line as well is kept."""
    llama = compose(["model=llama"]).model
    assert (llama.hidden_size, llama.num_params_b) == (4096, 8.03)
    other = compose(["model=llama", f"model.path={tmp_path}/Mistral-7B"]).model
    assert (other.hidden_size, other.num_params_b, other.num_layers, other.vocab_size) == (None,) * 4
    assert other.name == "Mistral-7B" and other.engine == llama.engine
    kept = compose(["model=llama", "model.path=org/other", "model.num_params_b=70", "model.name=x"]).model
    assert (kept.num_params_b, kept.hidden_size, kept.name) == (70, None, "x")
    [a, b] = compose_sweep(["model=llama", "model.path=org/a,org/b"])
    assert (a.model.name, b.model.name, a.model.num_layers) == ("a", "b", None)


def test_submit_drops_the_groups_shape_as_plan_does(tmp_path, monkeypatch):
    """The same through submit's Hydra entry (hydra_main), with a stand-in task."""
    from hpcinfer.cli import hydra_main

    monkeypatch.chdir(tmp_path)  # Hydra writes its outputs/ here
    seen = []
    with pytest.raises(SystemExit) as e:
        hydra_main(
            lambda run: seen.append(run.model) or 0, ["model=llama", "model.path=org/other", "model.num_layers=3"]
        )
    assert e.value.code == 0
    [m] = seen
    assert (m.name, m.hidden_size, m.num_layers) == ("other", None, 3)
