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
