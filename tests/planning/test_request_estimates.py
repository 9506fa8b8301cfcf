"""Work estimates of the request forms (issue 13): the prompt the engine gets (a filled template,
a conversation, an OpenAI Batch body and its max_tokens); the demo conversations."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from hpcinfer.planning.inputs import InputFile
from hpcinfer.planning.models import ensure_demo_data
from hpcinfer.planning.sharding import row_tokens
from hpcinfer.rundir.records import RequestSpec

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def _one(tmp_path, table, spec, **kw):
    pq.write_table(table, tmp_path / "x.parquet")
    (est,) = row_tokens([InputFile(str(tmp_path / "x.parquet"), table.num_rows)], "prompt", None, 10, spec, **kw)
    return est.tolist()


def test_a_long_conversation_weighs_more_and_a_null_one_least(tmp_path):
    convs = [[{"role": "user", "content": "x" * 4000}], [{"role": "user", "content": "hi"}], None, []]
    table = pa.table({"messages": pa.array(convs, pa.list_(MESSAGE))})
    est = _one(tmp_path, table, RequestSpec(kind="messages", prompt_column=None, messages_column="messages"))
    assert est[0] > est[1] > est[2] and est[2] == est[3] and est[0] >= 10 + 4000 // 4 // 4


def test_a_template_counts_its_text_and_the_columns_it_fills(tmp_path):
    table = pa.table({"a": ["x" * 400, "y"], "b": ["z" * 400, None]})
    both = _one(tmp_path, table, RequestSpec(prompt_column=None, template="{a} {b}"))
    one = _one(tmp_path, table, RequestSpec(prompt_column=None, template="{a}"))
    assert both[0] > one[0] and both[1] == one[1]


def test_an_openai_batch_body_gives_its_prompt_and_its_max_tokens(tmp_path):
    bodies = [{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, {"messages": []}, "not json"]
    table = pa.table({"body": [json.dumps(b) if isinstance(b, dict) else b for b in bodies]})
    est = _one(tmp_path, table, RequestSpec(kind="openai_batch", prompt_column=None), max_model_len=300)
    assert est[0] > 500 > est[1] >= 300 and est[2] >= 300  # no max_tokens: the context fills, as vLLM's server


def test_demo_conversations(tmp_path):
    t = pq.read_table(ensure_demo_data(20, str(tmp_path), chat=True))
    assert t.column_names == ["id", "messages", "topic"] and t.num_rows == 20
    convs = t.column("messages").to_pylist()
    assert all(c[-1]["role"] == "user" for c in convs) and any(c[0]["role"] == "system" for c in convs)
    assert any(len(c) > 2 for c in convs)
