"""The request seam's request kinds (rank/requests.py, issue 13) without vLLM: chat messages,
prompt templates (raw or as a chat), OpenAI Batch lines; a fake renderer stands in for vLLM's
chat rendering (the e2e tests compare with vLLM itself)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from hpcinfer.cli import compose
from hpcinfer.rank.requests import Failed, Request, batch_line_error, build_requests, conversation, fill
from hpcinfer.rundir.output import RowResult
from hpcinfer.rundir.records import RequestSpec, template_columns

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])


class FakeRenderer:
    """Renders a conversation as one token per message plus one (the generation prompt); a
    conversation with a 'bad' role cannot be rendered. Records its calls."""

    def __init__(self):
        self.calls = []

    def render_chat(self, conversations, chat_template, kwargs):
        self.calls.append((conversations, chat_template, kwargs))
        return ["bad role" if any(m["role"] == "bad" for m in c) else [7] * (len(c) + 1) for c in conversations]

    def batch_request(self, url, body, chat_template, kwargs):
        if "messages" not in body:
            raise ValueError("invalid request body: messages: Field required")
        return [1] * len(body["messages"]), FakeParams(body.get("temperature", 1.0))


class FakeParams:
    def __init__(self, temperature):
        self.temperature, self.seed, self.n = temperature, None, 1


class WordTokenizer:
    def __call__(self, texts):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_conversation_accepts_lists_and_json_text_and_names_what_is_wrong():
    msgs = [{"role": "user", "content": "hi", "name": None}]
    assert conversation(msgs) == [{"role": "user", "content": "hi"}]  # null struct fields dropped
    assert conversation(json.dumps(msgs)) == [{"role": "user", "content": "hi"}]
    assert conversation(None) == Failed("messages is null")
    assert conversation([]) == Failed("messages is empty")
    assert "not valid JSON" in conversation("[{").why
    assert "not a list" in conversation({"role": "user"}).why
    assert conversation([{"role": None, "content": "x"}]) == Failed("message 0 has no role")
    assert conversation([{"role": "user", "content": "x"}, {"role": "user"}]) == Failed(
        "message 1 (user) has no content"
    )
    assert "not a {role, content} object" in conversation(["hi"]).why


def test_templates_name_columns_and_fill_them():
    assert template_columns("Summarize:\n{text} ({lang}) {text} {{x}}") == ["text", "lang"]
    assert fill("{a}+{b!r}={c:>3}", {"a": 1, "b": "x", "c": 2}) == "1+'x'=  2"
    assert fill("{col.with.dots}", {"col.with.dots": "v"}) == "v"  # a field's name is the whole column name
    for bad in ("{}", "{0}", "{a"):
        with pytest.raises(ValueError):
            template_columns(bad)


def test_messages_rows_are_rendered_as_chat_and_bad_ones_get_their_error():
    cfg = compose(["sampling.max_tokens=4"])
    convs = [
        [{"role": "user", "content": "hi", "name": None}],
        None,
        [],
        [{"role": "bad", "content": "x", "name": None}],
        [{"role": "system", "content": "s", "name": None}, {"role": "user", "content": "u", "name": "me"}],
        [{"role": "user", "content": "a", "name": None}] * 5,  # renders to 6 tokens: beyond max_model_len=6
    ]
    table = pa.table({"messages": pa.array(convs, pa.list_(MESSAGE))})
    spec = RequestSpec(
        kind="messages",
        prompt_column=None,
        messages_column="messages",
        chat_template="T",
        chat_template_kwargs={"k": 1},
    )
    r = FakeRenderer()
    out = build_requests(table, range(6), range(6), cfg, None, 6, spec, r)
    assert len(r.calls) == 1 and r.calls[0][1:] == ("T", {"k": 1})  # one call, only the renderable rows
    assert r.calls[0][0][2] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "me"}]
    assert isinstance(out[0], Request) and out[0].prompt_token_ids == [7, 7]
    assert out[1] == RowResult(None, None, 0, 0, "messages is null")
    assert out[2] == RowResult(None, None, 0, 0, "messages is empty")
    assert out[3].error == "bad role"
    assert isinstance(out[4], Request) and out[4].sampling["max_tokens"] == 4
    assert "max_model_len=6" in out[5].error and out[5].prompt_tokens == 6


def test_a_template_is_filled_from_columns_raw_or_as_a_user_message():
    cfg = compose(["sampling.max_tokens=4"])
    table = pa.table({"title": ["Tea", "Maps", None], "text": ["hot water", "paper", "x"]})
    raw = RequestSpec(prompt_column=None, template="{title}: {text}")
    out = build_requests(table, [0, 1, 2], [0, 1, 2], cfg, WordTokenizer(), 100, raw)
    assert out[0].prompt_token_ids == [4, 3, 5] and out[1].prompt_token_ids == [5, 5]
    assert out[2].error == "prompt.template: column 'title' is null"
    chat = RequestSpec(prompt_column=None, template="{title}: {text}", chat=True, system="Be brief.")
    r = FakeRenderer()
    out = build_requests(table, [1], [1], cfg, None, 100, chat, r)
    assert r.calls[0][0] == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Maps: paper"}]]
    assert out[0].prompt_token_ids == [7, 7, 7]


def test_openai_batch_rows_take_their_body_and_invalid_lines_get_their_error():
    cfg = compose(["sampling.seed=100"])
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5})
    table = pa.table(
        {
            "custom_id": ["a", None, "c", "d", "e"],
            "method": ["POST", None, "POST", "GET", "POST"],
            "url": ["/v1/chat/completions", None, "/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings"],
            "body": [good, "{not json", json.dumps({"model": "m"}), good, good],
        }
    )
    out = build_requests(
        table, range(5), [10, 11, 12, 13, 14], cfg, None, 100, RequestSpec(kind="openai_batch"), FakeRenderer()
    )
    assert isinstance(out[0], Request) and out[0].sampling.seed == 110  # unseeded, sampled: row_seed's rule
    assert "not valid JSON" in out[1].error
    assert out[2].error == "invalid request body: messages: Field required"
    assert out[3].error == "method 'GET' is not POST"
    assert "/v1/embeddings" in out[4].error
    assert batch_line_error(None, "POST", "/v1/chat/completions", "{}") == "the line has no custom_id (a string)"
    assert batch_line_error(None, None, None, '{"custom_id": "x"}') == "the line has no body"
