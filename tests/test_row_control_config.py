"""Config and planning of per-row generation control (issue 14): what is refused (exit 2, one
line), the JSON schema file read when planned, the rows' own sampling scanned for the output
columns and the seed stride, and work estimates with each row's max_tokens and n."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.cli import compose
from hpcinfer.config import engine_args, validate
from hpcinfer.errors import ConfigError, DataError
from hpcinfer.planning.inputs import InputFile, Inputs
from hpcinfer.planning.prepare import row_control
from hpcinfer.planning.prompts import check_columns, request_spec
from hpcinfer.planning.sharding import RowSampling, row_tokens, scan_row_sampling
from hpcinfer.rundir.output import OutputSpec


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampling.n=0"], "sampling.n must be >= 1, got 0"),
        (["sampling.logprobs=-1"], "sampling.logprobs must be >= 0 or null"),
        (["sampling.prompt_logprobs=-2"], "sampling.prompt_logprobs must be >= 0 or null"),
        (["sampling.structured.regex=a+", "sampling.structured.choice=[x]"], "set one of"),
        (["sampling.structured.choice=[]"], "choice must be a non-empty list"),
        (["sampling.structured.json_schema=/nonexistent.json"], "is neither a JSON object nor a file"),
        (["sampling.structured.json_schema='{\"type\": '"], "json_schema: not valid JSON"),
        (["output.explode_samples=true"], "output.explode_samples=true applies only where a row may have several"),
        (["data.format=openai_batch", "data.sampling_column=s"], "data.sampling_column does not apply to OpenAI"),
        (["data.sampling_column=prompt"], "data.sampling_column='prompt' must differ"),
        (["data.sampling_column=logprobs"], "one of the output columns"),
    ],
)
def test_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")):
        validate(compose(overrides))


def test_accepted():
    for overrides in (
        ["sampling.n=3", "output.explode_samples=true"],
        ["data.sampling_column=s", "output.explode_samples=true"],
        ["sampling.logprobs=0", "sampling.prompt_logprobs=5"],
        ["sampling.structured.choice=[yes,no]"],
        ['sampling.structured.json_schema=\'{"type": "object"}\''],
    ):
        validate(compose(overrides))


def test_the_json_schema_file_is_read_when_planned(tmp_path):
    (tmp_path / "s.json").write_text('{"type": "object"}')
    spec = request_spec(compose([f"sampling.structured.json_schema={tmp_path / 's.json'}"]), "parquet")
    assert spec.json_schema == '{"type": "object"}'
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        request_spec(compose([f"sampling.structured.json_schema={tmp_path / 'bad.json'}"]), "parquet")
    inline = request_spec(compose(['sampling.structured.json_schema=\'{"type": "object"}\'']), "parquet")
    assert inline.json_schema == '{"type": "object"}'
    assert request_spec(compose(["data.sampling_column=s", "sampling.n=2"]), "parquet").seed_stride == 2


def test_the_sampling_column_must_exist_and_be_a_struct_or_text():
    cfg = compose(["data.sampling_column=s"])
    spec = request_spec(cfg, "parquet")
    check_columns(spec, cfg, "x", pa.schema([("prompt", pa.string()), ("s", pa.struct([("n", pa.int64())]))]))
    check_columns(spec, cfg, "x", pa.schema([("prompt", pa.string()), ("s", pa.string())]))
    with pytest.raises(DataError, match="data.sampling_column='s' is not a column"):
        check_columns(spec, cfg, "x", pa.schema([("prompt", pa.string())]))
    with pytest.raises(DataError, match="expected a struct of sampling fields or JSON object text"):
        check_columns(spec, cfg, "x", pa.schema([("prompt", pa.string()), ("s", pa.int64())]))


def _file(tmp_path, rows):
    table = pa.table({"prompt": ["p"] * len(rows), "s": [json.dumps(r) if r is not None else None for r in rows]})
    pq.write_table(table, tmp_path / "x.parquet")
    return [InputFile(str(tmp_path / "x.parquet"), len(rows))], table


def test_work_estimates_use_each_rows_max_tokens_and_n(tmp_path):
    files, _ = _file(tmp_path, [None, {"max_tokens": 100}, {"n": 4}, {"max_tokens": 50, "n": 2}, {"n": -1}])
    cfg = compose(["sampling.max_tokens=10", "data.sampling_column=s"])
    spec = request_spec(cfg, "parquet")
    (est,) = row_tokens(files, "prompt", None, 10, spec, sampling=cfg.sampling)
    prompt = est[0] - 10  # every row has the same prompt
    assert (est - prompt).tolist() == [10, 100, 40, 100, 1]  # an invalid value: its error, little work
    (plain,) = row_tokens(
        files, "prompt", None, 10, replace(spec, sampling_column=None), sampling=replace(cfg.sampling, n=3)
    )
    assert (plain - prompt).tolist() == [30] * 5


def test_the_rows_own_sampling_decides_the_columns_and_the_seed_stride(tmp_path):
    files, _ = _file(tmp_path, [None, {"n": 3}, {"logprobs": 1}, {"n": 9, "temperature": -1}])
    cfg = compose(["data.sampling_column=s"])
    assert scan_row_sampling(files, "s", cfg.sampling) == RowSampling(3, True, False)
    inputs = Inputs(files, pa.schema([("prompt", pa.string()), ("s", pa.string())]))
    request, output = row_control(cfg, inputs, request_spec(cfg, "parquet"), "parquet")
    assert request.seed_stride == 3 and output == OutputSpec(samples=True, logprobs=True)
    plain = compose(["sampling.prompt_logprobs=0"])
    request, output = row_control(plain, inputs, request_spec(plain, "parquet"), "parquet")
    assert request.seed_stride == 1 and output == OutputSpec(prompt_logprobs=True)


def test_a_sampling_column_builds_the_cpu_engine_unchunked():
    assert (
        engine_args(compose(["data.sampling_column=s", "sampling=greedy"]), "m", "cpu")["enable_chunked_prefill"]
        is False
    )
    assert "enable_chunked_prefill" not in engine_args(compose(["sampling=greedy"]), "m", "cpu")


def test_the_plan_says_what_the_rows_ask_for():
    from conftest import bare_plan

    from hpcinfer.planning.render import describe_requests
    from hpcinfer.rundir.records import Plan, RequestSpec

    plan = replace(
        bare_plan(1),
        request=RequestSpec(sampling_column="s", seed_stride=3),
        output=OutputSpec(samples=True, explode=True, logprobs=True),
    )
    assert describe_requests(plan) == (
        "raw prompts from column 'prompt'; each row's own sampling from column 's', up to 3 samples a row, "
        "one output row each (sample_index), logprobs"
    )
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))).output == plan.output


def test_openai_batch_bodies_give_n_and_logprobs(tmp_path):
    from hpcinfer.planning.sharding import scan_batch_bodies

    bodies = [{"prompt": "a", "n": 3}, {"prompt": "b", "logprobs": 2}, "not json", {"prompt": "c", "logprobs": False}]
    table = pa.table({"body": [json.dumps(b) if isinstance(b, dict) else b for b in bodies]})
    pq.write_table(table, tmp_path / "x.parquet")
    files = [InputFile(str(tmp_path / "x.parquet"), 4)]
    assert scan_batch_bodies(files) == RowSampling(3, True, False)
    spec = request_spec(compose([]), "openai_batch")
    (est,) = row_tokens(files, None, None, 10, spec, max_model_len=100)
    assert est[0] - est[3] >= 199  # n=3 of the context's 100 tokens, against one
    with pytest.raises(ConfigError, match="output.explode_samples does not apply to OpenAI Batch"):
        validate(compose(["data.format=openai_batch", "output.explode_samples=true", "sampling.n=2"]))


# ---- LoRA ----------------------------------------------------------------------------------------
def test_lora_engine_args_are_sized_from_the_adapters(tmp_path):
    from conftest import write_lora_adapter

    a = write_lora_adapter(tmp_path / "a", rank=8)
    b = write_lora_adapter(tmp_path / "b", rank=12)
    cfg = compose([f"+lora.adapters.a={a}", f"+lora.adapters.b={b}", "data.lora_column=adapter"])
    validate(cfg)
    args = engine_args(cfg, "m")
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 2, 16)  # 12 -> vLLM's 16
    cfg.lora.max_loras = 1
    assert engine_args(cfg, "m")["max_loras"] == 1
    assert "enable_lora" not in engine_args(compose([]), "m")
    # CPU: every adapter and an empty last slot (vLLM's CPU ops read slot -1, the last, for rows
    # without an adapter)
    assert engine_args(cfg, "m", "cpu")["max_loras"] == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.lora_column=adapter"],
            "data.lora_column='adapter' names each row's adapter, and lora.adapters is empty",
        ),
        (["+lora.adapters.x=/nonexistent"], "no data.lora_column says which rows"),
        (
            ["+lora.adapters.x=/nonexistent", "data.lora_column=a"],
            "lora.adapters.x: /nonexistent/adapter_config.json is not",
        ),
        (["+engine.enable_lora=true"], "engine.enable_lora=True: set lora.adapters instead"),
        (["data.format=openai_batch", "data.lora_column=a"], "data.lora_column does not apply to OpenAI Batch"),
    ],
)
def test_lora_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(compose(overrides))


def test_an_unknown_adapter_name_is_refused_when_planned(tmp_path):
    from conftest import write_lora_adapter

    from hpcinfer.planning.prompts import check_lora_names

    a = write_lora_adapter(tmp_path / "a")
    cfg = compose([f"+lora.adapters.a={a}", "data.lora_column=adapter"])
    spec = request_spec(cfg, "parquet")
    assert spec.lora_adapters == {"a": str(a)} and spec.lora_column == "adapter"
    pq.write_table(pa.table({"prompt": ["x"] * 3, "adapter": ["a", None, "b"]}), tmp_path / "x.parquet")
    files = [InputFile(str(tmp_path / "x.parquet"), 3)]
    with pytest.raises(DataError, match=r"row 2 of .* names adapter 'b', which is not one of lora.adapters \['a'\]"):
        check_lora_names(files, spec)
    pq.write_table(pa.table({"prompt": ["x"] * 2, "adapter": ["a", None]}), tmp_path / "x.parquet")
    check_lora_names(files, spec)
    with pytest.raises(DataError, match="expected adapter names"):
        check_columns(spec, cfg, "x", pa.schema([("prompt", pa.string()), ("adapter", pa.int64())]))


def test_lora_rows_become_requests_with_their_adapter():
    from hpcinfer.rank.requests import build_requests
    from hpcinfer.rundir.records import RequestSpec

    class Tok:
        def __call__(self, texts):
            return {"input_ids": [[1] * len(t) for t in texts]}

    spec = RequestSpec(lora_column="adapter", lora_adapters={"b": "/b", "a": "/a"})
    table = pa.table({"prompt": ["x", "y", "z"], "adapter": ["b", None, "c"]})
    b, base, unknown = build_requests(table, range(3), range(3), compose([]), Tok(), 50, spec)
    assert b.lora == ("b", 2, "/b") and base.lora is None
    assert "'c' is not one of lora.adapters ['a', 'b']" in unknown.error


def test_prompt_logprobs_with_lora_are_refused(tmp_path):
    from conftest import write_lora_adapter

    a = write_lora_adapter(tmp_path / "a")
    with pytest.raises(ConfigError, match="vllm-project/vllm#29955"):
        validate(compose([f"+lora.adapters.a={a}", "data.lora_column=x", "sampling.prompt_logprobs=1"]))
    files, _ = _file(tmp_path, [{"prompt_logprobs": 0}])
    cfg = compose([f"+lora.adapters.a={a}", "data.lora_column=x", "data.sampling_column=s"])
    inputs = Inputs(files, pa.schema([("prompt", pa.string()), ("s", pa.string())]))
    with pytest.raises(ConfigError, match="asks for prompt_logprobs with lora.adapters"):
        row_control(cfg, inputs, request_spec(cfg, "parquet"), "parquet")


def test_the_reasoning_parser_is_one_of_vllms():
    from hpcinfer.planning.prepare import check_reasoning_parser

    check_reasoning_parser("qwen3")
    with pytest.raises(ConfigError, match="output.reasoning_parser='nope' is not one of vLLM's reasoning parsers"):
        check_reasoning_parser("nope")
    with pytest.raises(ConfigError, match="output.reasoning_parser is empty"):
        validate(compose(["output.reasoning_parser=''"]))
