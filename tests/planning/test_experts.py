"""Expert parallelism (ep=true, MoE): the `expert.*` options as vLLM's engine arguments, their
validation (as vLLM validates them), and the plan's EP numbers (EP size, experts per GPU, memory)."""

import copy
import re

import pytest
from conftest import plan_for

from hpcinfer.cli import compose
from hpcinfer.config import ALL2ALL_BACKENDS, LAYOUT_ENGINE_ARGS, engine_args, validate
from hpcinfer.errors import ConfigError
from hpcinfer.planning.devices import Devices
from hpcinfer.planning.layout import expert_layout, memory_per_gpu, model_shape
from hpcinfer.planning.render import format_plan
from hpcinfer.rundir.records import ExpertLayout

MOE_EP = ["model=tiny_moe", "ep=true", "dp=2"]
GPUS = Devices(gpus=[str(i) for i in range(8)], gpu_memory_gib=80.0)
CPUS = Devices(cpus=[0, 1])


def errors_of(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides))
    return str(e.value)


def plan_of(overrides, devices=GPUS, rows=100):
    return plan_for(compose(overrides), devices, rows)


# ---- engine arguments -------------------------------------------------------------------------
def test_defaults_add_nothing_but_expert_parallel():
    args = engine_args(compose(MOE_EP), "/m")
    assert args["enable_expert_parallel"] is True
    assert not {"enable_eplb", "eplb_config", "expert_placement_strategy", "all2all_backend"} & set(args)


def test_options_map_to_vllm_engine_argument_names():
    cfg = compose(
        MOE_EP
        + [
            "expert.placement=round_robin",
            "expert.all2all_backend=deepep_low_latency",
            "expert.eplb=true",
            "expert.eplb_window_size=500",
            "expert.eplb_step_interval=2000",
            "expert.redundant_experts=2",
        ]
    )
    validate(cfg)
    args = engine_args(cfg, "/m")
    assert args["expert_placement_strategy"] == "round_robin"
    assert args["all2all_backend"] == "deepep_low_latency"
    assert args["enable_eplb"] is True
    assert args["eplb_config"] == {"window_size": 500, "step_interval": 2000, "num_redundant_experts": 2}


def test_eplb_config_holds_only_what_is_set():
    args = engine_args(compose(MOE_EP + ["expert.eplb=true", "expert.eplb_window_size=64"]), "/m")
    assert args["enable_eplb"] is True and args["eplb_config"] == {"window_size": 64}
    assert "eplb_config" not in engine_args(compose(MOE_EP + ["expert.eplb=true"]), "/m")


# engine arguments hpcinfer sets from expert.* and the layout: +engine.<key> is refused, naming the field to set
ENGINE_KEYS = [
    "enable_eplb",
    "eplb_config",
    "expert_placement_strategy",
    "all2all_backend",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
]


def test_vllm_accepts_these_names():
    """The names exist in the installed vLLM's EngineArgs and EPLBConfig (both 0.26 and 0.32 have them)."""
    import dataclasses

    vllm_args = pytest.importorskip("vllm.engine.arg_utils")
    fields = {f.name for f in dataclasses.fields(vllm_args.EngineArgs)}
    assert set(ENGINE_KEYS) <= fields
    from typing import get_args

    from vllm.config.parallel import All2AllBackend, EPLBConfig, ExpertPlacementStrategy

    assert set(get_args(ExpertPlacementStrategy)) == {"linear", "round_robin"}
    assert set(ALL2ALL_BACKENDS) <= set(get_args(All2AllBackend))
    EPLBConfig(window_size=500, step_interval=2000, num_redundant_experts=2)


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_these_engine_keys_are_set_by_hpcinfer(key):
    msg = errors_of(MOE_EP + [f"+engine.{key}=1"])
    assert f"engine.{key}=1: set {LAYOUT_ENGINE_ARGS[key]} instead" in msg


# ---- validation -------------------------------------------------------------------------------
def test_ep_on_a_dense_model_is_still_refused():
    assert "ep=true needs a mixture-of-experts model; model 'tiny' is dense" in errors_of(["ep=true"])


def test_eplb_without_ep():
    msg = errors_of(["model=tiny_moe", "dp=2", "expert.eplb=true"])
    assert "expert.eplb=true needs ep=true" in msg


def test_redundant_experts_without_eplb():
    msg = errors_of(MOE_EP + ["expert.redundant_experts=2"])
    assert "expert.redundant_experts=2 needs expert.eplb=true" in msg


def test_eplb_needs_more_than_one_expert_parallel_gpu():
    msg = errors_of(["model=tiny_moe", "ep=true", "expert.eplb=true"])
    assert "needs more than one expert-parallel GPU (dp x tp > 1), got dp=1 tp=1" in msg
    validate(compose(["model=tiny_moe", "ep=true", "tp=2", "expert.eplb=true"]))  # tp alone is enough


@pytest.mark.parametrize(
    "override,quoted",
    [
        ("expert.placement=diagonal", "expert.placement='diagonal' is not one of ['linear', 'round_robin']"),
        ("expert.all2all_backend=fastest", "expert.all2all_backend='fastest' is not one of"),
        ("expert.all2all_backend=pplx", "expert.all2all_backend='pplx' was removed from vLLM"),
        ("expert.redundant_experts=-1", "expert.redundant_experts must be in [0, 1023], got -1"),
        ("expert.redundant_experts=1024", "expert.redundant_experts must be in [0, 1023], got 1024"),
        ("expert.eplb_window_size=0", "expert.eplb_window_size must be >= 1 or null, got 0"),
        ("expert.eplb_step_interval=-5", "expert.eplb_step_interval must be >= 1 or null, got -5"),
    ],
)
def test_values_as_vllm_allows_them(override, quoted):
    assert quoted in errors_of(MOE_EP + ["expert.eplb=true", override])


def test_eplb_settings_without_eplb_and_ep_settings_without_ep():
    msg = errors_of(MOE_EP + ["expert.eplb_window_size=10"])
    assert "expert.eplb_window_size=10 applies only with expert.eplb=true" in msg
    msg = errors_of(["model=tiny_moe", "expert.placement=linear", "expert.all2all_backend=deepep_v2"])
    assert "expert.placement='linear' applies only with ep=true" in msg
    assert "expert.all2all_backend='deepep_v2' applies only with ep=true" in msg


def test_every_allowed_value_is_valid():
    for backend in ALL2ALL_BACKENDS:
        validate(compose(MOE_EP + [f"expert.all2all_backend={backend}"]))
    validate(compose(MOE_EP + ["expert.placement=round_robin", "expert.eplb=true", "expert.redundant_experts=4"]))


# ---- plan: EP size and experts per GPU --------------------------------------------------------
@pytest.mark.parametrize(
    "experts,dp,tp,redundant,size,lo,hi",
    [
        (4, 2, 1, 0, 2, 2, 2),
        (8, 2, 2, 0, 4, 2, 2),
        (8, 4, 1, 4, 4, 3, 3),
        (4, 3, 1, 0, 3, 1, 2),
        (256, 8, 4, 32, 32, 9, 9),
        (4, 8, 1, 0, 8, 0, 1),
    ],
)
def test_expert_layout(experts, dp, tp, redundant, size, lo, hi):
    x = expert_layout(experts, dp, tp, redundant)
    assert (x.ep_size, x.per_gpu_min, x.per_gpu_max) == (size, lo, hi)


def test_expert_layout_unknown_count_and_vllm_defaults():
    x = expert_layout(None, 2, 2)
    assert (x.ep_size, x.per_gpu_min, x.per_gpu_max) == (4, None, None)
    assert (x.placement, x.all2all_backend) == ("linear", "allgather_reducescatter")


def test_plan_shows_ep_size_and_experts_per_gpu():
    plan = plan_of(MOE_EP)  # tiny_moe: 4 experts, top-2
    assert plan.experts == ExpertLayout(2, 4, 0, 2, 2)
    text = format_plan(plan)
    assert (
        "experts    EP size 2 (dp=2 x tp=1): 4 experts per MoE layer -> 2 per GPU; placement linear, "
        "all2all allgather_reducescatter, EPLB off"
    ) in text


def test_plan_with_tp_and_redundant_experts():
    plan = plan_of(["model=tiny_moe", "ep=true", "dp=2", "tp=2", "expert.eplb=true", "expert.redundant_experts=4"])
    assert (plan.experts.ep_size, plan.experts.per_gpu_min, plan.experts.redundant) == (4, 2, 4)
    assert "EP size 4 (dp=2 x tp=2): 4 experts + 4 redundant per MoE layer -> 2 per GPU" in format_plan(plan)
    assert "EPLB on" in format_plan(plan)


def test_plan_uneven_experts_and_no_ep():
    assert "-> 1-2 per GPU" in format_plan(plan_of(["model=tiny_moe", "ep=true", "dp=3"]))
    plan = plan_of(["model=tiny_moe", "dp=2"])
    assert plan.experts is None and "experts " not in format_plan(plan)


def test_plan_ep_size_counts_the_ranks_started():
    plan = plan_of(["model=tiny_moe", "ep=true", "dp=4"], rows=3)  # 3 rows: 3 ranks form the group
    assert plan.ranks == 3 and plan.experts.ep_size == 3


def test_plan_refuses_eplb_that_vllm_refuses():
    with pytest.raises(ConfigError, match="4 experts \\+ 1 redundant to divide evenly over the EP size 2"):
        plan_of(MOE_EP + ["expert.eplb=true", "expert.redundant_experts=1"])
    with pytest.raises(ConfigError, match="needs GPUs: vLLM runs EPLB on CUDA/ROCm devices only"):
        plan_of(MOE_EP + ["expert.eplb=true"], devices=CPUS)


@pytest.mark.parametrize(
    "overrides, quoted",
    [
        (MOE_EP, "ep=true with dp=2 x tp=1 (EP size 2) needs GPUs"),
        (["model=tiny_moe", "ep=true", "tp=2"], "ep=true with dp=1 x tp=2 (EP size 2) needs GPUs"),
    ],
)
def test_plan_refuses_ep_on_cpu_which_vllms_cpu_build_cannot_run(overrides, quoted):
    with pytest.raises(ConfigError, match=re.escape(quoted)):
        plan_of(overrides, devices=CPUS)


def test_plan_on_cpu_allows_what_vllms_cpu_build_runs():
    assert plan_of(["model=tiny_moe", "ep=true"], devices=CPUS).experts.ep_size == 1  # EP over one worker
    assert plan_of(["model=tiny_moe", "dp=2"], devices=CPUS).experts is None  # independent engines


def test_plan_notes_round_robin_fallback():
    plan = plan_of(MOE_EP + ["expert.placement=round_robin"])
    assert any("round_robin" in n and "places linearly" in n for n in plan.notes)


def test_plan_unknown_expert_count_says_so():
    plan = plan_for(compose(MOE_EP + ["model.num_experts=null"]), GPUS, rows=10)
    assert "experts per GPU unknown" in format_plan(plan)
    assert any("model.num_experts" in n for n in plan.notes)


# ---- memory: experts split over the EP group -------------------------------------------------
def test_expert_weights_split_by_ep_size():
    shape = model_shape(compose(["model=tiny_moe"]).model)
    # 4 layers x 3 x hidden 256 x intermediate 512 x 4 experts
    assert shape.expert_params_b == pytest.approx(4 * 3 * 256 * 512 * 4 / 1e9)
    engine = {"dtype": "float32"}
    whole = memory_per_gpu(shape, engine, 1, 1, None).weights_gib
    split = memory_per_gpu(shape, engine, 1, 1, None, ep_size=4).weights_gib
    dense_part = (shape.num_params_b - shape.expert_params_b) * 1e9 * 4 / 1024**3
    assert split == pytest.approx(dense_part + shape.expert_params_b * 1e9 * 4 / 4 / 1024**3)
    assert split < whole
    assert memory_per_gpu(shape, engine, 2, 1, None, ep_size=2).weights_gib == pytest.approx(whole / 2)


def test_given_model_size_is_not_split():
    m = copy.deepcopy(compose(["model=tiny_moe"]).model)
    m.num_params_b = 0.001  # smaller than the experts the shape implies: do not guess a split
    assert model_shape(m).expert_params_b is None
