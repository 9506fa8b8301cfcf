"""bench/start_gap.py's pure parts: the times of vLLM's log lines (the main process's bare, as on the
GPU machine, or prefixed, as on CPU) and a start-only run split by part."""

from __future__ import annotations

import datetime

import pytest
from conftest import bench_module

GPU_LOG = """INFO 12-03 16:36:26 [api_utils.py:273] non-default args: {'dtype': 'bfloat16', 'model': '/tmp/llama-8b'}
INFO 12-03 16:36:26 [model.py:623] Resolved architecture: LlamaForCausalLM
(EngineCore pid=1515) INFO 12-03 16:36:28 [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config: ...
(EngineCore pid=1515) INFO 12-03 16:36:33 [model_runner.py:305] Model loading took 13.04 GiB and 4.127739 seconds
(EngineCore pid=1515) INFO 12-03 16:36:47 [core.py:340] init engine (profile, create kv cache, warmup model) took 14.62 s
"""
CPU_LOG = """(MainProcess pid=20101) INFO 12-03 16:16:07 [api_utils.py:286] non-default args: {'max_model_len': 256}
(MainProcess pid=20101) WARNING 12-03 16:16:07 [cpu.py:224] Triton is not installed.
"""


@pytest.fixture(scope="module")
def start_gap():
    return bench_module("start_gap")


def at(stamp: str) -> float:
    return datetime.datetime.strptime(f"2026-{stamp}", "%Y-%m-%d %H:%M:%S").timestamp()


def test_the_engine_core_is_told_from_the_main_process_bare_or_prefixed(start_gap):
    assert start_gap.log_times(GPU_LOG, 2026) == {"llm_call": at("12-03 16:36:26"), "core_up": at("12-03 16:36:28")}
    # on CPU the engine runs in the rank's own process: its main process's lines alone
    assert start_gap.log_times(CPU_LOG, 2026) == {"llm_call": at("12-03 16:16:07")}
    # a log cut after its first line (no newline at the end) still has it
    assert start_gap.log_times(CPU_LOG.splitlines()[0], 2026) == {"llm_call": at("12-03 16:16:07")}


def test_llm_is_split_into_the_engine_cores_start_weights_init_and_the_rest(start_gap):
    end = at("12-03 16:36:48")
    p = start_gap.parts(0.1, 21.5, 22.0, GPU_LOG, end)
    assert p["to_core_s"] == 2.0 and p["weights_s"] == 4.127739 and p["init_engine_s"] == 14.62
    assert p["rest_s"] == pytest.approx(22.0 - 2.0 - 4.127739 - 14.62)
    assert start_gap.parts(0.1, 8.0, 3.0, CPU_LOG, end)["rest_s"] is None  # no engine core, no init line: unknown
