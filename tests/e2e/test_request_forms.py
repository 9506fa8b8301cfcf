"""End to end on real vLLM (CPU build): requests in the forms users have (issue 13).

- chat conversations in Parquet (`data.messages_column`, `model.chat_template=<file>`,
  `chat.template_kwargs`) at dp=2: every row once, in order, pass-through columns equal, errors
  only for the empty, null and over-long conversations, and the greedy text and prompt tokens
  equal to one in-process `vllm.LLM(**engine_args).chat(...)`; the same rows as JSON Lines give
  the same results.parquet;
- an OpenAI Batch file of chat lines with a malformed line inserted, at dp=2: `results.jsonl` has
  that line's error in its place, and every other line equal (content, finish_reason, usage) to
  what vLLM's own run-batch writes for the file without it (run-batch fails the whole file with it);
- CSV rows through a prompt template over two columns (from a file, with a newline): the text
  equal to `LLM.generate` of the filled prompts;
- sampled rows (temperature 0.7, top_p 0.95, seed 0: row i seeded i) long enough that a rank's
  prompts exceed one step's token budget, at dp=2: the text equal to `LLM.generate` with each
  row's seed in one engine (so it does not depend on the layout), and no `CPU Generator does not
  use offset` failure (vLLM 0.32 on CPU, with a chunked prefill: config.engine_args turns it off).

Two dp=2 runs started at once, then vLLM's references (one in-process engine, run-batch) and two
dp=1 runs, at once: their start-ups (most of a small run's time) overlap, four engines at a time. JSON Lines and CSV against Parquet row by row, and the
bad-input exits, are in tests/planning/test_convert.py and tests/e2e/test_bad_input.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

pytestmark = pytest.mark.vllm

MAX_TOKENS = 6
# A chat template other than the built-in one: model.chat_template must replace it; its `tag`
# comes from chat.template_kwargs (the chat runs set it, the OpenAI Batch run does not).
KWARGS = {"tag": "conversation"}
TEMPLATE = (
    "{{ bos_token }}{% if tag %}<{{ tag }}>{% endif %}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}\n"
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
# ~450 prompt tokens a row: a rank's 12 rows (~5,400 tokens) exceed vLLM's CPU step budget (4,096)
LONG_PROMPTS = [f"Document {i}: " + "the river flows past the old mill and " * 34 for i in range(24)]
SAMPLED = {"temperature": 0.7, "top_p": 0.95}  # conf/sampling/default.yaml, seed 0


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
    pq.write_table(pa.table({"prompt": LONG_PROMPTS}), d / "long.parquet")
    rows = chat.to_pylist()  # the same rows as JSON Lines: messages as JSON arrays (null, [] too)
    (d / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return d


def _run_all(commands, env, timeout=900):
    """Run `commands` ({name: argv}) at once (their start-ups overlap: most of a small run's time);
    {name: CompletedProcess}, each checked to have succeeded."""
    procs = {
        name: subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, argv in commands.items()
    }
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=timeout)
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        assert p.returncode == 0, f"{name}: {err[-4000:]}"
    return done


def _submit(run_dir, *args):
    greedy = ["sampling=greedy", f"sampling.max_tokens={MAX_TOKENS}", f"run_dir={run_dir}"]
    return [sys.executable, "-m", "hpcinfer.submit", *args, *greedy]


def _fast(env):
    """vLLM's engine in the rank's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the same greedy
    text (fp32, eager), without an engine-core process to start per rank; the other e2e tests run
    the default engine."""
    return {**env, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory, cli_env):
    """The dp=2 runs (real submits, at once), once for the module: chat Parquet, the OpenAI Batch
    file with a malformed line."""
    root = tmp_path_factory.mktemp("runs")
    chat_template = f"model.chat_template={files / 't.jinja'}"
    dirs = {name: root / name for name in ("chat", "batch")}
    _run_all(
        {
            "chat": _submit(
                dirs["chat"],
                "dp=2",
                "data.shard_rows=2",
                f"data.input={files / 'chat.parquet'}",
                "data.messages_column=messages",
                chat_template,
                f"+chat.template_kwargs.tag={KWARGS['tag']}",
            ),
            "batch": _submit(dirs["batch"], "dp=2", f"data.input={files / 'batch_bad.jsonl'}", chat_template),
        },
        _fast(cli_env),
    )
    return dirs


def _rows(run_dir):
    return pq.read_table(run_dir / "results.parquet").to_pylist()


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


REFERENCE = f"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
sp = SamplingParams(temperature=0, max_tokens={MAX_TOKENS})
chat = llm.chat(json.loads(sys.argv[2]), sp, chat_template=sys.argv[3], chat_template_kwargs={KWARGS!r}, use_tqdm=False)
gen = llm.generate(json.loads(sys.argv[4]), sp, use_tqdm=False)
long = json.loads(sys.argv[5])
seeded = [SamplingParams(**{SAMPLED!r}, max_tokens={MAX_TOKENS}, seed=i) for i in range(len(long))]
sampled = llm.generate(long, seeded, use_tqdm=False)
print(json.dumps([[(o.outputs[0].text, len(o.prompt_token_ids)) for o in outs] for outs in (chat, gen, sampled)]))
"""


@pytest.fixture(scope="module")
def reference(runs, files, tmp_path_factory, cli_env):
    """What vLLM itself gives, both at once: one in-process vllm.LLM(**summary["engine_args"])
    (its chat of the good conversations, its generate of the filled CSV prompts, greedy; its
    generate of the long prompts, sampled with row i's seed i; unchunked prefill, as on the
    sampled run's ranks: vLLM 0.32's CPU generators fail with a chunked one), and
    vLLM's own run-batch over batch.jsonl (the file without the malformed line: run-batch fails
    the whole file on it) with the same model, chat template and engine settings; and, at the
    same time, two dp=1 runs (the chat run's rows as JSON Lines, CSV through a template file)
    and the sampled dp=2 run of the long prompts."""
    a = json.loads((runs["chat"] / "summary.json").read_text())["engine_args"]
    convs = [c for i, c in enumerate(CONVERSATIONS) if i not in ERROR_ROWS]
    prompts = [PROMPT_TEMPLATE.format(title=t, text=x) for t, x in CSV_ROWS]
    out = tmp_path_factory.mktemp("run-batch") / "out.jsonl"
    batch = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(files / "batch.jsonl")]
    batch += ["-o", str(out), "--model", a["model"], "--served-model-name", "tiny", "--dtype", a["dtype"]]
    batch += ["--max-model-len", str(a["max_model_len"]), "--enforce-eager", "--seed", str(a["seed"])]
    batch += ["--chat-template", str(files / "t.jinja")]
    llm = [sys.executable, "-c", REFERENCE, json.dumps({**a, "enable_chunked_prefill": False}), json.dumps(convs)]
    llm += [TEMPLATE, json.dumps(prompts), json.dumps(LONG_PROMPTS)]
    env = _fast(cli_env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    jsonl = out.parent / "chat-jsonl"
    chat_jsonl = _submit(
        jsonl,
        f"data.input={files / 'chat.jsonl'}",
        "data.messages_column=messages",
        f"model.chat_template={files / 't.jinja'}",
        f"+chat.template_kwargs.tag={KWARGS['tag']}",
    )
    csv = out.parent / "csv"
    csv_run = _submit(csv, f"data.input={files / 'rows.csv'}", f"prompt.template_file={files / 'prompt.txt'}")
    sampled = out.parent / "sampled"
    sampled_run = [sys.executable, "-m", "hpcinfer.submit", "dp=2", f"data.input={files / 'long.parquet'}"]
    sampled_run += ["sampling=default", f"sampling.max_tokens={MAX_TOKENS}", f"run_dir={sampled}"]
    commands = {"run_batch": batch, "llm": llm, "jsonl": chat_jsonl, "csv": csv_run, "sampled": sampled_run}
    done = _run_all(commands, env)
    chat, gen, sampled_ref = json.loads(done["llm"].stdout.strip().splitlines()[-1])
    return {
        "chat": chat,
        "generate": gen,
        "run_batch": [json.loads(x) for x in out.read_text().splitlines()],
        "jsonl_run": jsonl,
        "csv_run": csv,
        "sampled": sampled_ref,
        "sampled_run": sampled,
    }


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


def test_chat_rows_as_json_lines_give_the_same_results_as_in_parquet(runs, reference):
    jsonl = pq.read_table(reference["jsonl_run"] / "results.parquet")
    assert jsonl.equals(pq.read_table(runs["chat"] / "results.parquet"))  # columns, types, every value


# ---- OpenAI Batch ----------------------------------------------------------------------------
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


def test_results_jsonl_equals_vllm_run_batch_line_by_line(runs, reference):
    """Every valid line of the file equals run-batch's line for it (content, finish_reason, usage)."""
    run_batch_output = reference["run_batch"]
    ours = [x for x in _lines(runs["batch"]) if x["custom_id"] is not None]
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


def test_a_malformed_line_gets_its_error_in_its_place_and_leaves_the_others(runs, reference):
    """One line per input line, in input order: the malformed one (third) has its error, the
    lines around it are run-batch's for the file without it."""
    lines = _lines(runs["batch"])
    assert len(lines) == len(BATCH_LINES) + 1
    bad = lines.pop(2)
    assert bad["custom_id"] is None and bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    assert "not valid JSON" in bad["error"]
    assert [_essence(x) for x in lines] == [_essence(x) for x in reference["run_batch"]]
    assert [r["custom_id"] for r in _rows(runs["batch"])] == ["req-0", "req-1", None, "req-2", "req-3"]
    s = json.loads((runs["batch"] / "summary.json").read_text())
    assert s["rows"] == len(BATCH_LINES) + 1 and s["rows_failed"] == 1 and s["layout"]["ranks"] == 2
    assert s["results_jsonl"] == str(runs["batch"] / "results.jsonl")


# ---- CSV through a prompt template ------------------------------------------------------------
def test_csv_template_over_two_columns_equals_generate_of_the_filled_prompts(reference):
    rows = _rows(reference["csv_run"])
    assert [(r["id"], r["title"], r["text"]) for r in rows] == [(i, t, x) for i, (t, x) in enumerate(CSV_ROWS)]
    assert all(r["error"] is None for r in rows)
    assert [(r["generated_text"], r["prompt_tokens"]) for r in rows] == [tuple(x) for x in reference["generate"]]
    assert sorted(p.name for p in (reference["csv_run"] / "inputs").iterdir()) == ["000000.parquet", "sources.json"]


# ---- sampled rows with seeds, prompts beyond one step's token budget ---------------------------
def test_sampled_long_prompts_equal_generate_with_each_rows_seed_at_dp2(reference):
    rows = _rows(reference["sampled_run"])
    assert [r["prompt"] for r in rows] == LONG_PROMPTS and all(r["error"] is None for r in rows)
    assert all(r["prompt_tokens"] > 400 for r in rows)
    assert [(r["generated_text"], r["prompt_tokens"]) for r in rows] == [tuple(x) for x in reference["sampled"]]
    assert len({r["generated_text"] for r in rows}) > len(rows) // 2  # sampled: the rows differ
    s = json.loads((reference["sampled_run"] / "summary.json").read_text())
    assert s["layout"]["ranks"] == 2 and s["engine_args"]["enable_chunked_prefill"] is False
