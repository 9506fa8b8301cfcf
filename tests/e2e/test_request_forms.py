"""End to end on real vLLM (CPU build): requests in the forms users have (issue 13).

- chat conversations in Parquet (`data.messages_column`, `model.chat_template=<file>`) at dp=2:
  every row once, in order, errors only for the empty, null and over-long conversations, and the
  greedy text equal to one in-process `vllm.LLM(**engine_args).chat(...)`;
- an OpenAI Batch file of chat lines at dp=2: `results.jsonl` equal, line by line (content,
  finish_reason, usage), to what vLLM's own run-batch writes for the file; the same file with a
  malformed line inserted: that line's error, the others unchanged;
- CSV rows through a prompt template over two columns (from a file, with a newline): the text
  equal to `LLM.generate` of the filled prompts.

Four small runs share one reference engine; JSON Lines and CSV against Parquet row by row, and
the bad-input exits, are in tests/planning/test_convert.py and tests/e2e/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.vllm

MAX_TOKENS = 6
# A chat template other than the built-in one: model.chat_template must replace it.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about rivers."}],
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Explique les glaciers — 日本語 🚀"},
    ],
    [],  # empty: error
    None,  # null: error
    [{"role": "user", "content": "the river " * 400}],  # beyond the 512-token context: error
    [{"role": "user", "content": "List three facts about tea."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
]
ERROR_ROWS = {2: "empty", 3: "null", 4: "max_model_len"}
BATCH_LINES = [
    {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": c, "max_tokens": 4 + i, "temperature": 0},
    }
    for i, c in enumerate(CONVERSATIONS[:2] + CONVERSATIONS[5:])
]
MALFORMED = '{"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [}'
CSV_ROWS = [("Rivers", "Water flows downhill."), ("Tea", "Leaves in hot water — 茶."), ("Clocks", "They tick.")]
PROMPT_TEMPLATE = "Title: {title}\nText: {text}\nSummary:"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("request-forms")
    (d / "t.jinja").write_text(TEMPLATE)
    chat = pa.table(
        {
            "id": pa.array(range(100, 100 + len(CONVERSATIONS)), pa.int64()),
            "messages": pa.array(CONVERSATIONS, pa.list_(MESSAGE)),
            "note": [f"row {i} ✓" for i in range(len(CONVERSATIONS))],
        }
    )
    pq.write_table(chat, d / "chat.parquet", row_group_size=3)
    lines = [json.dumps(x, ensure_ascii=False) for x in BATCH_LINES]
    (d / "batch.jsonl").write_text("\n".join(lines) + "\n")
    (d / "batch_bad.jsonl").write_text("\n".join(lines[:2] + [MALFORMED] + lines[2:]) + "\n")
    (d / "rows.csv").write_text("id,title,text\n" + "".join(f'{i},{t},"{x}"\n' for i, (t, x) in enumerate(CSV_ROWS)))
    (d / "prompt.txt").write_text(PROMPT_TEMPLATE)
    return d


def _submit(hpcinfer, run_dir, *args):
    proc = hpcinfer("submit", *args, "sampling=greedy", f"sampling.max_tokens={MAX_TOKENS}", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory, hpcinfer):
    """The four runs (each a real submit), once for the module."""
    root = tmp_path_factory.mktemp("runs")
    chat_template = f"model.chat_template={files / 't.jinja'}"
    return {
        "chat": _submit(
            hpcinfer,
            root / "chat",
            "dp=2",
            "data.shard_rows=2",
            f"data.input={files / 'chat.parquet'}",
            "data.messages_column=messages",
            chat_template,
        ),
        "batch": _submit(hpcinfer, root / "batch", "dp=2", f"data.input={files / 'batch.jsonl'}", chat_template),
        "batch_bad": _submit(hpcinfer, root / "batch_bad", f"data.input={files / 'batch_bad.jsonl'}", chat_template),
        "csv": _submit(
            hpcinfer, root / "csv", f"data.input={files / 'rows.csv'}", f"prompt.template_file={files / 'prompt.txt'}"
        ),
    }


def _rows(run_dir):
    return pq.read_table(run_dir / "results.parquet").to_pylist()


@pytest.fixture(scope="module")
def reference(runs, files):
    """One in-process vllm.LLM(**summary["engine_args"]): its chat of the good conversations and
    its generate of the filled CSV prompts (greedy)."""
    s = json.loads((runs["chat"] / "summary.json").read_text())
    convs = [c for i, c in enumerate(CONVERSATIONS) if i not in ERROR_ROWS]
    prompts = [PROMPT_TEMPLATE.format(title=t, text=x) for t, x in CSV_ROWS]
    script = f"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
sp = SamplingParams(temperature=0, max_tokens={MAX_TOKENS})
chat = llm.chat(json.loads(sys.argv[2]), sp, chat_template=sys.argv[3], use_tqdm=False)
gen = llm.generate(json.loads(sys.argv[4]), sp, use_tqdm=False)
print(json.dumps([[(o.outputs[0].text, len(o.prompt_token_ids)) for o in outs] for outs in (chat, gen)]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(s["engine_args"]), json.dumps(convs), TEMPLATE, json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    chat, gen = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"chat": chat, "generate": gen}


# ---- chat conversations ----------------------------------------------------------------------
def test_chat_every_row_once_in_order_with_pass_through_columns(runs, files):
    results = pq.read_table(runs["chat"] / "results.parquet")
    inputs = pq.read_table(files / "chat.parquet")
    assert results.num_rows == len(CONVERSATIONS)
    assert results.select(inputs.column_names).equals(inputs)
    assert json.loads((runs["chat"] / "summary.json").read_text())["layout"]["ranks"] == 2


def test_chat_errors_only_for_empty_null_and_too_long(runs):
    rows = _rows(runs["chat"])
    errors = {i: r["error"] for i, r in enumerate(rows) if r["error"] is not None}
    assert set(errors) == set(ERROR_ROWS), errors
    for i, word in ERROR_ROWS.items():
        assert word in errors[i], errors[i]
        assert rows[i]["generated_text"] is None


def test_chat_greedy_text_equals_llm_chat_in_one_process(runs, reference):
    rows = [r for r in _rows(runs["chat"]) if r["error"] is None]
    assert [(r["generated_text"], r["prompt_tokens"]) for r in rows] == [tuple(x) for x in reference["chat"]]
    s = json.loads((runs["chat"] / "summary.json").read_text())
    assert s["prompt_tokens"] == sum(r["prompt_tokens"] for r in _rows(runs["chat"]))


# ---- OpenAI Batch ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_batch_output(runs, files, tmp_path_factory):
    """What vLLM's own run-batch writes for batch.jsonl: the same model, template and engine settings."""
    s = json.loads((runs["batch"] / "summary.json").read_text())
    a = s["engine_args"]
    out = tmp_path_factory.mktemp("run-batch") / "out.jsonl"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(files / "batch.jsonl")]
    cmd += ["-o", str(out), "--model", a["model"], "--served-model-name", "tiny", "--dtype", a["dtype"]]
    cmd += ["--max-model-len", str(a["max_model_len"]), "--enforce-eager", "--seed", str(a["seed"])]
    cmd += ["--chat-template", str(files / "t.jinja")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def _essence(line):
    """What must agree line by line: custom_id, status, content, finish_reason, usage."""
    body = (line["response"] or {}).get("body") or {}
    choice = (body.get("choices") or [{}])[0]
    usage = body.get("usage") or {}
    return (
        line["custom_id"],
        line["response"]["status_code"],
        (choice.get("message") or {}).get("content"),
        choice.get("finish_reason"),
        {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    )


def test_results_jsonl_equals_vllm_run_batch_line_by_line(runs, run_batch_output):
    ours = [json.loads(line) for line in (runs["batch"] / "results.jsonl").read_text().splitlines()]
    assert len(ours) == len(BATCH_LINES) == len(run_batch_output)
    assert [_essence(x) for x in ours] == [_essence(x) for x in run_batch_output]
    for x, theirs in zip(ours, run_batch_output, strict=True):
        assert x.keys() == theirs.keys() and x["error"] is None
        assert x["response"]["body"]["object"] == "chat.completion" and x["response"]["body"]["model"] == "tiny"
        assert set(theirs["response"]["body"]) <= set(x["response"]["body"]) | {
            "prompt_text",
            "ec_transfer_params",
            "metrics",
        }
    results = _rows(runs["batch"])
    assert [r["custom_id"] for r in results] == [x["custom_id"] for x in BATCH_LINES]


def test_a_malformed_line_gets_its_error_and_leaves_the_others(runs):
    good = [json.loads(line) for line in (runs["batch"] / "results.jsonl").read_text().splitlines()]
    bad = [json.loads(line) for line in (runs["batch_bad"] / "results.jsonl").read_text().splitlines()]
    assert len(bad) == len(good) + 1
    assert bad[2]["custom_id"] is None and bad[2]["response"]["status_code"] == 400
    assert "not valid JSON" in bad[2]["error"]
    assert [_essence(x) for x in bad[:2] + bad[3:]] == [_essence(x) for x in good]
    s = json.loads((runs["batch_bad"] / "summary.json").read_text())
    assert s["rows"] == len(BATCH_LINES) + 1 and s["rows_failed"] == 1
    assert s["results_jsonl"] == str(runs["batch_bad"] / "results.jsonl")


# ---- CSV through a prompt template ------------------------------------------------------------
def test_csv_template_over_two_columns_equals_generate_of_the_filled_prompts(runs, reference):
    rows = _rows(runs["csv"])
    assert [(r["id"], r["title"], r["text"]) for r in rows] == [(i, t, x) for i, (t, x) in enumerate(CSV_ROWS)]
    assert all(r["error"] is None for r in rows)
    assert [(r["generated_text"], r["prompt_tokens"]) for r in rows] == [tuple(x) for x in reference["generate"]]
    assert sorted(p.name for p in (runs["csv"] / "inputs").iterdir()) == ["000000.parquet", "sources.json"]
