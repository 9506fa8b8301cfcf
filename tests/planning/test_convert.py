"""Input formats (planning/convert.py): detection, JSON Lines / CSV / OpenAI Batch converted to
Parquet row for row, malformed OpenAI Batch lines kept as rows, duplicate custom_ids, reuse."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.errors import DataError
from hpcinfer.planning.convert import batch_row, convert, file_format, input_format

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
ROWS = [
    {"id": 1, "text": "plain", "messages": [{"role": "user", "content": "hi"}]},
    {
        "id": 2,
        "text": "unicode — 日本語 🚀",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ça va?"}],
    },
    {"id": 3, "text": None, "messages": None},
    {"id": 4, "text": "", "messages": []},
]


def _parquet_table():
    return pa.table(
        {
            "id": pa.array([r["id"] for r in ROWS], pa.int64()),
            "text": pa.array([r["text"] for r in ROWS], pa.string()),
            "messages": pa.array([r["messages"] for r in ROWS], pa.list_(MESSAGE)),
        }
    )


def test_jsonl_converts_to_the_same_rows_as_parquet(tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    (out,) = convert([str(src)], "jsonl", tmp_path / "inputs")
    assert pq.read_table(out).equals(_parquet_table())


def test_csv_converts_to_the_same_rows_as_parquet(tmp_path):
    src = tmp_path / "rows.csv"
    src.write_text('id,title,text\n1,Rivers,"a, b"\n2,Tea,"— 茶"\n')
    (out,) = convert([str(src)], "csv", tmp_path / "inputs")
    want = pa.table({"id": pa.array([1, 2], pa.int64()), "title": ["Rivers", "Tea"], "text": ["a, b", "— 茶"]})
    assert pq.read_table(out).equals(want)


def test_conversion_streams_blocks_into_row_groups(tmp_path, monkeypatch):
    from hpcinfer.planning import convert as mod

    monkeypatch.setattr(mod, "BLOCK_BYTES", 256)
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(200)))
    (out,) = convert([str(src)], "jsonl", tmp_path / "inputs")
    pf = pq.ParquetFile(out)
    assert pf.metadata.num_rows == 200 and pf.metadata.num_row_groups > 1
    assert pf.read().column("id").to_pylist() == list(range(200))


def test_formats_by_extension_and_openai_batch_by_its_first_line(tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}) + "\n")
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert file_format(str(batch)) == "openai_batch"
    assert file_format(str(plain)) == "jsonl"
    assert file_format("x.parquet") == "parquet" and file_format("x.CSV") == "csv"
    assert file_format("x.txt", "csv") == "csv"
    with pytest.raises(DataError, match="cannot tell its format"):
        file_format("x.txt")
    with pytest.raises(DataError, match="mixes formats"):
        input_format([str(plain), "y.parquet"])
    with pytest.raises(DataError, match="mixes formats"):
        input_format([str(plain), str(batch)])


def test_a_file_that_is_not_json_lines_is_refused(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text("this is not JSON\n")
    with pytest.raises(DataError, match="not valid JSON Lines"):
        convert([str(src)], "jsonl", tmp_path / "inputs")


def test_openai_batch_lines_one_by_one_a_malformed_line_is_a_row(tmp_path):
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [], "n": 1}}
    src = tmp_path / "b.jsonl"
    src.write_text(json.dumps(good) + "\n\n{not json\n" + json.dumps({**good, "custom_id": "b"}) + "\n")
    (out,) = convert([str(src)], "openai_batch", tmp_path / "inputs")
    rows = pq.read_table(out).to_pylist()
    assert [r["custom_id"] for r in rows] == ["a", None, "b"]  # the empty line is skipped, as run-batch does
    assert json.loads(rows[0]["body"]) == good["body"] and rows[0]["url"] == "/v1/chat/completions"
    assert rows[1] == {"custom_id": None, "method": None, "url": None, "body": "{not json"}
    assert batch_row('{"custom_id": "c", "body": "text"}')["custom_id"] == "c"


def test_duplicate_custom_ids_are_named(tmp_path):
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    src = tmp_path / "b.jsonl"
    src.write_text("".join(json.dumps({**line, "custom_id": c}) + "\n" for c in ["x", "y", "x", "z", "y"]))
    with pytest.raises(DataError, match=r"custom_id must be unique.*2 repeat\(s\): '(x|y)', '(x|y)'"):
        convert([str(src)], "openai_batch", tmp_path / "inputs")


def test_a_conversion_is_reused_and_a_changed_input_refused(tmp_path):
    src = tmp_path / "rows.csv"
    src.write_text("id,text\n1,a\n")
    (first,) = convert([str(src)], "csv", tmp_path / "inputs")
    mtime = os.stat(first).st_mtime_ns
    assert convert([str(src)], "csv", tmp_path / "inputs") == [first]
    assert os.stat(first).st_mtime_ns == mtime  # not converted again
    src.write_text("id,text\n1,a\n2,b\n")
    with pytest.raises(DataError, match="input files changed"):
        convert([str(src)], "csv", tmp_path / "inputs")


def test_a_row_larger_than_a_block_is_read_with_larger_blocks(tmp_path, monkeypatch):
    from hpcinfer.planning import convert as mod

    monkeypatch.setattr(mod, "BLOCK_BYTES", 64)
    src = tmp_path / "long.jsonl"
    rows = [{"id": 1, "text": "short"}, {"id": 2, "text": "x" * 1000}, {"id": 3, "text": "y"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out,) = convert([str(src)], "jsonl", tmp_path / "inputs")
    assert pq.read_table(out).to_pylist() == rows
    csv = tmp_path / "long.csv"
    csv.write_text("id,text\n1,a\n2," + "z" * 1000 + "\n")
    (out,) = convert([str(csv)], "csv", tmp_path / "inputs2")
    assert pq.read_table(out).column("text").to_pylist() == ["a", "z" * 1000]
