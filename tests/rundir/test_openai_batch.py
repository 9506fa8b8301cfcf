"""results.jsonl (rundir/openai_batch.py): OpenAI Batch output lines as vLLM's run-batch writes
them, streamed from results.parquet in input order."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from hpcinfer.rundir.openai_batch import output_line, write_results_jsonl

CHAT = "/v1/chat/completions"


def _row(**kw):
    row = dict(custom_id="a", url=CHAT, body='{"model": "m1"}', generated_text="hi", finish_reason="stop")
    return {**row, "prompt_tokens": 5, "output_tokens": 2, "error": None, **kw}


def test_a_chat_line():
    line = output_line(_row(), 0, "/run", 123, "tiny")
    assert line["custom_id"] == "a" and line["error"] is None and line["id"].startswith("vllm-")
    resp = line["response"]
    assert resp["status_code"] == 200 and resp["request_id"].startswith("vllm-batch-")
    body = resp["body"]
    assert body["object"] == "chat.completion" and body["model"] == "m1" and body["created"] == 123
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == "hi"
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    assert {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
    }
    assert output_line(_row(), 0, "/run", 123, "tiny") == line  # the same run and line: the same ids
    assert output_line(_row(), 1, "/run", 123, "tiny")["id"] != line["id"]


def test_a_completion_line_an_error_line_and_a_body_without_model():
    body = output_line(_row(url="/v1/completions", body="{}"), 0, "/r", 1, "tiny")["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "hi" and body["model"] == "tiny"
    err = output_line(_row(custom_id=None, generated_text=None, error="the line is not valid JSON"), 2, "/r", 1, "t")
    assert err["response"]["status_code"] == 400 and err["response"]["body"] is None
    assert err["error"] == "the line is not valid JSON" and err["custom_id"] is None


def test_written_line_by_line_in_order(tmp_path):
    rows = [_row(custom_id=f"c{i}") for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "results.parquet", row_group_size=2)
    n = write_results_jsonl(tmp_path / "results.parquet", tmp_path / "results.jsonl", "/r", "tiny")
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert n == 5 and [x["custom_id"] for x in lines] == [f"c{i}" for i in range(5)]


def test_n_choices_and_logprobs_in_the_openai_shape():
    """Issue 14: a line with n > 1 (list columns) has n choices; its logprobs as OpenAI gives them."""
    tok = {
        "token_id": 5,
        "token": "hi",
        "logprob": -0.5,
        "top_logprobs": [{"token_id": 5, "token": "hi", "logprob": -0.5}],
    }
    row = _row(
        generated_text=["hi", "yo"],
        finish_reason=["stop", "length"],
        output_tokens=[1, 3],
        logprobs=[[tok], None],
    )
    body = output_line(row, 0, "/r", 1, "t")["response"]["body"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "hi", "stop"),
        (1, "yo", "length"),
    ]
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["total_tokens"] == 9
    lp = body["choices"][0]["logprobs"]["content"][0]
    assert lp == {
        "token": "hi",
        "logprob": -0.5,
        "bytes": [104, 105],
        "top_logprobs": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105]}],
    }
    assert body["choices"][1]["logprobs"] is None
    cmpl = output_line(_row(url="/v1/completions", logprobs=[tok, {**tok, "token": "!"}]), 0, "/r", 1, "t")
    assert cmpl["response"]["body"]["choices"][0]["logprobs"] == {
        "text_offset": [0, 2],
        "token_logprobs": [-0.5, -0.5],
        "tokens": ["hi", "!"],
        "top_logprobs": [{"hi": -0.5}, {"hi": -0.5}],
    }
