"""Per-row generation control (issue 14) without vLLM: each row's own sampling
(`data.sampling_column`), n samples, structured output and logprobs as requests.py builds the
requests and reads vLLM's outputs back, and the output columns they give (rundir/output.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pytest

from hpcinfer.cli import compose
from hpcinfer.config import SamplingConfig, StructuredConfig, row_sampling
from hpcinfer.rank.requests import Request, build_requests, row_kwargs, row_result, sampling_kwargs
from hpcinfer.rundir.output import (
    LOGPROB,
    OutputSpec,
    RowResult,
    Sample,
    explode,
    generated_schema,
    output_table,
    result_schema,
    token_sum,
)
from hpcinfer.rundir.records import RequestSpec


class WordTokenizer:
    def __call__(self, texts):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


# ---- a row's sampling value ---------------------------------------------------------------------
BASE = SamplingConfig(max_tokens=16, temperature=0.7, seed=0)


def test_row_sampling_non_null_fields_override_the_base():
    assert row_sampling(None, BASE) is BASE
    assert row_sampling("", BASE) == BASE
    own = row_sampling({"temperature": 0.0, "max_tokens": 3, "top_p": None, "stop": "END"}, BASE)
    assert (own.temperature, own.max_tokens, own.top_p, own.stop) == (0.0, 3, 1.0, ["END"])
    own = row_sampling('{"n": 3, "logprobs": 2, "seed": 9}', BASE)
    assert (own.n, own.logprobs, own.seed, own.max_tokens) == (3, 2, 9, 16)


@pytest.mark.parametrize(
    "value, why",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an object"),
        ({"temprature": 1.0}, "unknown field(s) ['temprature']"),
        ({"max_tokens": "5"}, "max_tokens='5' has the wrong type"),
        ({"max_tokens": True}, "wrong type"),
        ({"max_tokens": 0}, "sampling.max_tokens must be >= 1, got 0"),
        ({"temperature": -1}, "sampling.temperature must be >= 0"),
        ({"n": 0}, "sampling.n must be >= 1"),
        ({"stop": [1]}, "stop must be a string or a list of strings"),
        ({"structured": {"choice": []}}, "choice must be a non-empty list"),
        ({"structured": {"choice": ["a"], "regex": "a"}}, "set one of"),
        ({"structured": {"json": "{}"}}, "unknown structured field(s) ['json']"),
        ({"structured": {"json_schema": "schema.json"}}, "json_schema: not valid JSON"),
    ],
)
def test_row_sampling_invalid_values_say_why(value, why):
    got = row_sampling(value, BASE)
    assert isinstance(got, str) and got.startswith("sampling_column: ") and why in got, got


def test_row_structured_replaces_the_base_and_takes_an_inline_schema():
    base = SamplingConfig(structured=StructuredConfig(regex="[ab]+"))
    own = row_sampling({"structured": {"json_schema": {"type": "object"}}}, base)
    assert own.structured == StructuredConfig(json_schema='{"type": "object"}')
    assert sampling_kwargs(own)["structured_outputs"] == {"json": {"type": "object"}}
    assert "structured_outputs" not in sampling_kwargs(SamplingConfig())
    assert sampling_kwargs(base)["structured_outputs"] == {"regex": "[ab]+"}
    assert sampling_kwargs(SamplingConfig(structured=StructuredConfig(choice=["yes", "no"])))["structured_outputs"] == {
        "choice": ["yes", "no"]
    }


def test_row_kwargs_seed_cap_and_n():
    # the derived seed: seed + row x stride (the run's largest n); a row's own seed is exact
    assert row_kwargs(BASE, None, None, 5)["seed"] == 5
    assert row_kwargs(BASE, None, None, 5, stride=3)["seed"] == 15
    assert row_kwargs(BASE, {"seed": 0}, None, 5, stride=3)["seed"] == 0
    assert row_kwargs(BASE, {"temperature": 0}, None, 5)["seed"] is None  # greedy: unseeded
    # the cap: the row's own max_tokens, else data.max_tokens_column's, else sampling.max_tokens
    assert row_kwargs(BASE, None, None, 0)["max_tokens"] == 16
    assert row_kwargs(BASE, None, 4, 0)["max_tokens"] == 4
    assert row_kwargs(BASE, {"max_tokens": 2}, 4, 0)["max_tokens"] == 2
    assert row_kwargs(BASE, {"n": 3}, None, 0, stride=3)["n"] == 3
    assert "exceeds the run's planned largest n (1)" in row_kwargs(BASE, {"n": 3}, None, 0)


def test_build_requests_with_a_sampling_column_struct_and_json():
    cfg = compose(["sampling.max_tokens=8", "sampling.temperature=0.5", "sampling.seed=10", "data.sampling_column=s"])
    spec = RequestSpec(prompt_column="prompt", sampling_column="s", seed_stride=2)
    struct = pa.struct([("temperature", pa.float64()), ("max_tokens", pa.int64()), ("n", pa.int64())])
    table = pa.table(
        {
            "prompt": ["a", "b c", "d", "e"],
            "s": pa.array(
                [None, {"temperature": 0.0, "max_tokens": 3, "n": None}, {"temperature": None, "max_tokens": 0, "n": 1}]
                + [{"temperature": None, "max_tokens": None, "n": 2}],
                struct,
            ),
        }
    )
    out = build_requests(table, range(4), [100, 101, 102, 103], cfg, WordTokenizer(), 50, spec)
    base = sampling_kwargs(cfg.sampling)
    assert out[0] == Request(100, [1], {**base, "seed": 10 + 200})
    assert out[1] == Request(101, [1, 1], {**base, "temperature": 0.0, "max_tokens": 3, "seed": None})
    assert out[2] == RowResult(None, None, 1, 0, "sampling_column: sampling.max_tokens must be >= 1, got 0")
    assert out[3] == Request(103, [1], {**base, "n": 2, "seed": 10 + 206})
    texts = pa.table({"prompt": ["a", "b"], "s": ['{"top_k": 5}', '{"top_k": "x"}']})
    ok, bad = build_requests(texts, [0, 1], [0, 1], cfg, WordTokenizer(), 50, spec)
    assert ok.sampling["top_k"] == 5 and "top_k='x' has the wrong type" in bad.error


def test_build_requests_uses_the_planned_json_schema_text():
    cfg = compose(["sampling.structured.json_schema=/somewhere/schema.json"])
    spec = RequestSpec(prompt_column="prompt", json_schema='{"type": "object"}')
    (req,) = build_requests(pa.table({"prompt": ["a"]}), [0], [0], cfg, WordTokenizer(), 50, spec)
    assert req.sampling["structured_outputs"] == {"json": {"type": "object"}}


# ---- vLLM's outputs -> the row's columns --------------------------------------------------------
def lp(logprob, rank, token):
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=token)


def test_row_result_n_samples_in_index_order_with_logprobs():
    def completion(index, text, ids, entries):
        return SimpleNamespace(
            index=index, text=text, finish_reason="length", token_ids=ids, logprobs=entries, cumulative_logprob=-1.5
        )

    # token 7 sampled at rank 3 (outside the top 2): top_logprobs are ranks 1 and 2 only
    entries = [{7: lp(-1.0, 3, "x"), 8: lp(-0.1, 1, "y"), 9: lp(-0.5, 2, "z")}, {8: lp(-0.5, 1, "y")}]
    out = SimpleNamespace(
        prompt_token_ids=[1, 2],
        prompt_logprobs=[None, {2: lp(-2.0, 4, "p"), 5: lp(-0.2, 1, "q")}],
        outputs=[completion(1, "b", [7, 8], entries), completion(0, "a", [7], entries[:1])],
    )
    r = row_result(out, logprobs=2, prompt_logprobs=1)
    assert (r.generated_text, r.output_tokens, [s.text for s in r.samples]) == ("a", 3, ["a", "b"])
    first = r.samples[0].logprobs[0]
    assert first["token"] == "x" and first["logprob"] == -1.0
    assert [t["token_id"] for t in first["top_logprobs"]] == [8, 9]
    assert r.samples[1].logprobs[1]["top_logprobs"] == [{"token_id": 8, "token": "y", "logprob": -0.5}]
    assert r.prompt_logprobs[0] == {"token_id": 1, "token": None, "logprob": None, "top_logprobs": []}
    assert r.prompt_logprobs[1]["logprob"] == -2.0 and len(r.prompt_logprobs[1]["top_logprobs"]) == 1
    pa.array(r.prompt_logprobs, pa.list_(LOGPROB).value_type)  # fits the column type


# ---- the output columns -------------------------------------------------------------------------
def results():
    two = [Sample("a0", "stop", 1), Sample("a1", "length", 2)]
    return [
        RowResult("a0", "stop", 4, 3, None, two),
        RowResult(None, None, 0, 0, "prompt is null"),
        RowResult("c", "stop", 2, 1, None),  # made without samples (one)
    ]


def test_schema_follows_the_output_spec():
    plain = generated_schema()
    assert plain.names == ["generated_text", "finish_reason", "prompt_tokens", "output_tokens", "error"]
    lists = generated_schema(OutputSpec(samples=True, logprobs=True, prompt_logprobs=True))
    assert lists.names == [
        "generated_text",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "cumulative_logprob",
        "logprobs",
        "prompt_logprobs",
        "error",
    ]
    assert lists.field("generated_text").type == pa.list_(pa.string())
    assert lists.field("prompt_tokens").type == pa.int64()
    assert lists.field("logprobs").type == pa.list_(pa.list_(LOGPROB))
    exploded = result_schema(pa.schema([("id", pa.int64())]), OutputSpec(samples=True, explode=True))
    assert exploded.names[:3] == ["id", "sample_index", "generated_text"]
    assert exploded.field("generated_text").type == pa.string()


def test_list_columns_and_explode_keep_input_order():
    inputs = pa.table({"id": [10, 11, 12]})
    spec = OutputSpec(samples=True, explode=True)
    t = output_table(inputs, [0, 1, 2], results(), 0, spec)
    assert t.column("generated_text").to_pylist() == [["a0", "a1"], None, ["c"]]
    assert t.column("output_tokens").to_pylist() == [[1, 2], None, [1]]
    assert token_sum(t.column("output_tokens")) == 4
    x = explode(t.drop_columns(["__hpcinfer_row"]))
    assert x.schema == result_schema(inputs.schema, spec)
    rows = x.to_pylist()
    assert [(r["id"], r["sample_index"], r["generated_text"], r["error"]) for r in rows] == [
        (10, 0, "a0", None),
        (10, 1, "a1", None),
        (11, None, None, "prompt is null"),
        (12, 0, "c", None),
    ]
    assert [r["finish_reason"] for r in rows] == ["stop", "length", None, "stop"]
    assert explode(t.slice(0, 0).drop_columns(["__hpcinfer_row"])).num_rows == 0


def test_scalar_columns_take_the_first_samples_logprobs():
    r = RowResult(
        "a",
        "stop",
        1,
        1,
        None,
        [Sample("a", "stop", 1, -0.5, [{"token_id": 3, "token": "a", "logprob": -0.5, "top_logprobs": []}])],
    )
    t = output_table(pa.table({"id": [1, 2]}), [0, 1], [r, results()[1]], 0, OutputSpec(logprobs=True))
    assert t.column("cumulative_logprob").to_pylist() == [-0.5, None]
    assert t.column("logprobs").to_pylist()[0][0]["token"] == "a"
    assert token_sum(t.column("output_tokens")) == 1


def test_request_spec_round_trips_its_new_fields():
    spec = RequestSpec(sampling_column="s", json_schema="{}", seed_stride=3)
    assert RequestSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


# ---- the reasoning split ---------------------------------------------------------------------------
def test_split_reasoning_puts_the_reasoning_aside_per_sample():
    from hpcinfer.rank.requests import split_reasoning

    def split(text):  # as vLLM's think-tag parsers: (reasoning, answer)
        head, sep, tail = text.partition("</think>")
        return (head, tail or None) if sep else (text, None)

    r = RowResult("a</think>b", "stop", 1, 3, None, [Sample("a</think>b", "stop", 2), Sample("c", "length", 1)])
    out = split_reasoning(r, split)
    assert out.generated_text == "b" and [(s.reasoning_text, s.text) for s in out.samples] == [("a", "b"), ("c", "")]
    assert split_reasoning(RowResult("x</think>y", "stop", 1, 1, None), split).samples[0].reasoning_text == "x"
    err = RowResult(None, None, 0, 0, "prompt is null")
    assert split_reasoning(err, split) is err and split_reasoning(r, None) is r
    t = output_table(pa.table({"id": [1]}), [0], [out], 0, OutputSpec(samples=True, reasoning=True))
    assert t.column("reasoning_text").to_pylist() == [["a", "c"]] and t.column("generated_text").to_pylist() == [
        ["b", ""]
    ]
    assert generated_schema(OutputSpec(reasoning=True)).field("reasoning_text").type == pa.string()


# ---- a request vLLM refuses is that row's error, not the rank's --------------------------------
def test_a_request_the_engine_refuses_becomes_its_rows_error():
    import itertools

    from hpcinfer.rank.engine import VllmEngine

    class Params:
        def __init__(self, **kw):
            self.logprobs, self.prompt_logprobs = kw.get("logprobs"), kw.get("prompt_logprobs")

    class LLMEngine:
        def __init__(self):
            self.added = []

        def add_request(self, request_id, prompt, params, lora_request=None):
            if prompt["prompt_token_ids"] == [9]:
                raise ValueError("Invalid regex: (")
            self.added.append(request_id)
            return request_id

        def step(self):
            return []

        def abort_request(self, ids):
            pass

    e = VllmEngine.__new__(VllmEngine)
    e.llm = SimpleNamespace(llm_engine=LLMEngine())
    e._params, e._final_only, e._requests = Params, "final", itertools.count()
    e._pending, e._aliases, e._logprobs, e._refused = {}, {}, {}, []
    e.add("s", 0, Request(0, [1, 2], {"max_tokens": 2}))
    e.add("s", 1, Request(1, [9], {"max_tokens": 2}))
    assert e.pending == 2 and len(e.llm.llm_engine.added) == 1
    ((tag, i, result),) = e.step()
    assert (tag, i, result.prompt_tokens, result.generated_text) == ("s", 1, 1, None)
    assert result.error == "the engine refused the request: ValueError: Invalid regex: ("
    assert e.pending == 1 and e.step() == []
    e.add("t", 0, Request(2, [9], {}))
    e.abort("t")
    assert e.step() == []
