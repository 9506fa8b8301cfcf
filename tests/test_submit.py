"""submit.config_differences: when may a run directory be continued with a new config?"""

import copy

import pytest

from hpcinfer.cli import compose
from hpcinfer.config import load_run_config, to_yaml
from hpcinfer.submit import config_differences


@pytest.fixture(scope="module")
def base():
    return compose([])


def test_equal_configs_have_no_differences(base):
    assert config_differences(base, copy.deepcopy(base)) == []
    assert config_differences(base, compose([])) == []


def test_saved_config_equals_composed(base, tmp_path):
    # what submit compares on resume: config.yaml of the run vs the newly composed config
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(base))
    assert config_differences(load_run_config(p), compose([])) == []


def test_temperature_difference_is_named(base):
    new = compose(["sampling.temperature=0.2"])
    diff = config_differences(base, new)
    assert diff == ["sampling.temperature: 0.7 -> 0.2"]


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: setattr(c, "dp", 2), "dp"),
        (lambda c: setattr(c, "ep", True), "ep"),
        (lambda c: c.engine.update(max_model_len=128), "engine.max_model_len"),
        (lambda c: c.engine.update(kv_cache_dtype="fp8"), "engine.kv_cache_dtype"),
        (lambda c: setattr(c.data, "input", "/data/x.parquet"), "data.input"),
        (lambda c: setattr(c.data, "shard_rows", 10), "data.shard_rows"),
        (lambda c: setattr(c.model, "path", "/models/y"), "model.path"),
        (lambda c: c.model.engine.update(dtype="float16"), "model.engine.dtype"),
        (lambda c: c.sampling.stop.append("###"), "sampling.stop"),
    ],
)
def test_result_affecting_differences_are_named(base, mutate, key):
    new = copy.deepcopy(base)
    mutate(new)
    diff = config_differences(base, new)
    assert [d.split(":")[0] for d in diff] == [key]


def test_model_switch_lists_model_keys(base):
    diff = config_differences(base, compose(["model=tiny_moe"]))
    keys = {d.split(":")[0] for d in diff}
    assert {"model.name", "model.builtin", "model.moe", "model.num_experts"} <= keys
    assert all(k.startswith("model.") for k in keys)


@pytest.mark.parametrize(
    "overrides",
    [
        ["run_dir=/tmp/other"],
        ["cluster.gpus=2"],
        ["cluster.cpu_kvcache_gib=8"],
        ["cache_dir=/tmp/cache"],
        ["run_dir=/a", "cluster.gpu_memory_gib=40"],
    ],
)
def test_run_dir_cluster_and_cache_are_ignored(base, overrides):
    assert config_differences(base, compose(overrides)) == []


def test_submit_checks_the_cluster_before_writing_anything(tmp_path, monkeypatch):
    """launcher.check(plan) (Slurm: the partition offers what the jobs need) runs before the run
    directory exists: a refusal leaves nothing behind."""
    from types import SimpleNamespace

    import conftest

    from hpcinfer import submit as submit_module
    from hpcinfer.errors import UserError

    plan = conftest.bare_plan(1)
    checked = []

    class Refusing:
        def prestart(self):  # the Launcher interface's optional start before planning: nothing here
            pass

        def close(self):
            pass

        def check(self, p):
            checked.append(p)
            raise UserError("cluster.gpus_per_node=8, but the nodes of partition 'debug' have no GPUs")

    monkeypatch.setattr(submit_module, "launcher_for", lambda cfg: Refusing())
    monkeypatch.setattr(submit_module, "prepare", lambda cfg, launcher, **kw: SimpleNamespace(plan=plan))
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="have no GPUs"):
        submit_module.submit(compose(["cluster=slurm", f"run_dir={run_dir}"]))
    assert checked and checked[0].ranks == plan.ranks
    assert not run_dir.exists()
