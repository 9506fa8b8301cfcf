"""End to end on real vLLM (CPU build): per-row generation control (issue 14).

One input of tiny prompts, each row with its own sampling in `data.sampling_column` (JSON text):
greedy rows, per-row `max_tokens` with `ignore_eos` (honoured exactly), seeded rows with `n=3`
(the row's own seed, and a seed derived from the row), `logprobs=2` and `logprobs=0`, a `choice`
constraint, two invalid values (row errors), and a row through a LoRA adapter written here
(`data.lora_column`). It runs at dp=2 (list columns) and at dp=1 with
`output.explode_samples=true`; each row equals one in-process `LLM(enable_lora=...).generate`
with a list of SamplingParams and LoRARequests (every sample's text, finish reasons, token
counts, logprobs), and the two layouts give the same samples. A run with a global JSON schema
from a file (nested object, enums, an array with maxItems) has every row parse and validate,
and scores its prompts (`prompt_logprobs=1`: not with LoRA, which vLLM 0.32 fails). OpenAI Batch
lines with `n` and logprobs give n choices and OpenAI-shaped logprobs equal to vLLM's.

The dp=2 and schema runs start at once; the reference engine, the dp=1 run and the OpenAI Batch
run start together once the dp=2 run has given its engine_args.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_lora_adapter

pytestmark = pytest.mark.vllm

PROMPTS = ["The river", "Tea is", "Clocks tick", "A cat", "Snow falls", "Bread and", "Yes or no?", "Pick:", "x", "y"]
N = 3
CHOICES = ["yes", "no", "maybe"]
ROWS = [
    None,  # sampling.* (greedy, 6 tokens)
    {"max_tokens": 3, "ignore_eos": True},
    {"max_tokens": 8, "ignore_eos": True},
    {"temperature": 0.8, "top_p": 0.9, "seed": 5, "n": N, "max_tokens": 5},  # its own seed
    {"temperature": 1.0, "n": N, "max_tokens": 4},  # seed derived: sampling.seed + row x 3
    {"logprobs": 2, "max_tokens": 4},
    {"logprobs": 0, "max_tokens": 2},
    {"structured": {"choice": CHOICES}, "temperature": 1.0, "seed": 3},
    {"temperature": -1},  # invalid: the row's error
    {"max_tokens": "many"},  # invalid: the row's error
]
ERRORS = {8: "sampling.temperature must be >= 0", 9: "max_tokens='many' has the wrong type"}
# a last row: row 0's prompt through a LoRA adapter (data.lora_column; the others: the base model)
PROMPTS.append(PROMPTS[0])
ROWS.append(None)
ADAPTERS = [None] * (len(PROMPTS) - 1) + ["ad"]
# and a row whose regex vLLM refuses when it is added: that row's error, the rank goes on
PROMPTS.append("z")
ROWS.append({"structured": {"regex": "(ab"}})
ADAPTERS.append(None)
ERRORS[len(ROWS) - 1] = "the engine refused the request"
# LoRA in these runs (CPU: the engine's max_loras is the adapters + 1, see config.lora_engine_args)
LORA_E2E = True
MAX_TOKENS = 6
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog"]},
        "meta": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
            "required": ["ok", "level"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["kind", "meta", "tags"],
    "additionalProperties": False,
}
SCHEMA_PROMPTS = ["Describe a pet:", "JSON:", "{"]
# The reasoning split: a chat template that opens a think tag, a regex that makes the random model
# close it, vLLM's qwen3 reasoning parser
THINK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}"
)
THINK_REGEX = "(ab|cd)</think>(ef|gh)"
THINK_PROMPTS = ["Think about rivers.", "Why?"]
# OpenAI Batch lines with n choices and logprobs (results.jsonl in the OpenAI shape)
BATCH_BODY = {"model": "tiny", "prompt": "The river", "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 11}
BATCH_LINES = [
    {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions", "body": {**BATCH_BODY, "logprobs": 2}},
    {
        "custom_id": "chat",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 3}
        | {"temperature": 0.9, "logprobs": True, "top_logprobs": 1},
    },
]


def _fast(env):
    """vLLM's engine in the rank's own process (as tests/e2e/test_request_forms.py)."""
    return {**env, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _start(argv, env):
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(name, p, timeout=900):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{name}: {err[-4000:]}"
    return out


def _submit(run_dir, *args):
    greedy = ["sampling=greedy", f"sampling.max_tokens={MAX_TOKENS}", f"run_dir={run_dir}"]
    return [sys.executable, "-m", "hpcinfer.submit", *greedy, *args]  # args last: they win


REFERENCE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm.lora.request import LoRARequest
llm = LLM(**json.loads(sys.argv[1]))
lora = [None if a is None else LoRARequest(a, 1, sys.argv[5]) for a in json.loads(sys.argv[4])] + [None]
params = []
for kw in json.loads(sys.argv[3]):
    if "structured_outputs" in kw:
        kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
    params.append(SamplingParams(**kw))
params.append(SamplingParams(n=2, seed=11, temperature=1.0, max_tokens=4, logprobs=2))  # the completion line
outs = llm.generate(json.loads(sys.argv[2]) + ["The river"], params, lora_request=lora, use_tqdm=False)
from vllm.reasoning import ReasoningParserManager
parser = ReasoningParserManager.get_reasoning_parser("qwen3")(llm.get_tokenizer())
think = llm.chat(
    [[{"role": "user", "content": p}] for p in json.loads(sys.argv[8])],
    SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(regex=sys.argv[7])),
    chat_template=sys.argv[6],
    use_tqdm=False,
)
think = [list(parser.extract_reasoning(o.outputs[0].text, None)) for o in think]
def lp(ids, entries):
    if entries is None:
        return None
    return [None if e is None else [t, e[t].logprob] for t, e in zip(ids, entries)]
print(json.dumps([
    {
        "texts": [c.text for c in o.outputs],
        "reasons": [c.finish_reason for c in o.outputs],
        "tokens": [len(c.token_ids) for c in o.outputs],
        "logprobs": [lp(c.token_ids, c.logprobs) for c in o.outputs],
        "cumulative": [c.cumulative_logprob for c in o.outputs],
        "prompt_logprobs": lp(o.prompt_token_ids, o.prompt_logprobs),
        "prompt_tokens": len(o.prompt_token_ids),
    }
    for o in outs
] + [think]))
"""


def _reference_params():
    """Each valid row's SamplingParams as hpcinfer builds them, written out by hand: greedy
    (temperature 0, no seed), max_tokens 6, the row's fields over them; a sampled row without
    its own seed gets sampling.seed (0) + row x 3 (the run's largest n)."""
    out = []
    for i, row in enumerate(ROWS):
        if i in ERRORS:
            continue
        kw = {"temperature": 0.0, "max_tokens": MAX_TOKENS, **(row or {})}
        if "structured" in kw:
            kw["structured_outputs"] = {"choice": kw.pop("structured")["choice"]}
        if kw["temperature"] > 0 and "seed" not in kw:
            kw["seed"] = i * N
        out.append(kw)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_env):
    d = tmp_path_factory.mktemp("row-control")
    table = pa.table(
        {
            "id": list(range(len(PROMPTS))),
            "prompt": PROMPTS,
            "s": [json.dumps(r) if r else None for r in ROWS],
            "adapter": pa.array(ADAPTERS, pa.string()),
        }
    )
    pq.write_table(table, d / "rows.parquet")
    pq.write_table(pa.table({"prompt": SCHEMA_PROMPTS}), d / "schema_rows.parquet")
    (d / "schema.json").write_text(json.dumps(SCHEMA))
    (d / "think.jinja").write_text(THINK_TEMPLATE)
    pq.write_table(pa.table({"prompt": THINK_PROMPTS}), d / "think.parquet")
    (d / "batch.jsonl").write_text("".join(json.dumps(x) + "\n" for x in BATCH_LINES))
    env = _fast(cli_env)
    from hpcinfer.planning.models import ensure_builtin_model

    model = ensure_builtin_model("tiny-llama", cli_env["HPCINFER_CACHE"])
    adapter = write_lora_adapter(d / "adapter", Path(model))
    common = [f"data.input={d / 'rows.parquet'}", "data.sampling_column=s"]
    common += ["data.lora_column=adapter"] if LORA_E2E else []
    common += [f"+lora.adapters.ad={adapter}"] if LORA_E2E else []
    dirs = {name: d / name for name in ("dp2", "dp1", "schema", "batch", "think")}
    procs = {
        "dp2": _start(_submit(dirs["dp2"], "dp=2", "data.shard_rows=3", *common), env),
        "schema": _start(
            _submit(
                dirs["schema"],
                f"data.input={d / 'schema_rows.parquet'}",
                f"sampling.structured.json_schema={d / 'schema.json'}",
                "sampling.max_tokens=160",
                # compact JSON: the random model otherwise fills the object with whitespace
                "+engine.structured_outputs_config={backend:xgrammar,disable_any_whitespace:true}",
                "sampling.prompt_logprobs=1",
            ),
            env,
        ),
    }
    _wait("dp2", procs["dp2"])
    args = json.loads((dirs["dp2"] / "summary.json").read_text())["engine_args"]
    valid = [p for i, p in enumerate(PROMPTS) if i not in ERRORS]
    ref = [sys.executable, "-c", REFERENCE, json.dumps(args), json.dumps(valid), json.dumps(_reference_params())]
    ref += [json.dumps([a if LORA_E2E else None for i, a in enumerate(ADAPTERS) if i not in ERRORS]), str(adapter)]
    ref += [THINK_TEMPLATE, THINK_REGEX, json.dumps(THINK_PROMPTS)]
    procs["llm"] = _start(ref, env)
    procs["dp1"] = _start(_submit(dirs["dp1"], "output.explode_samples=true", *common), env)
    procs["batch"] = _start(_submit(dirs["batch"], f"data.input={d / 'batch.jsonl'}"), env)
    think = [f"data.input={d / 'think.parquet'}", "prompt.chat=true", f"model.chat_template={d / 'think.jinja'}"]
    think += [f"sampling.structured.regex='{THINK_REGEX}'", "output.reasoning_parser=qwen3"]
    procs["think"] = _start(_submit(dirs["think"], *think, "sampling.max_tokens=16"), env)
    out = _wait("llm", procs["llm"]).strip().splitlines()[-1]
    (d / "reference.json").write_text(out)  # for a look when a comparison fails
    *reference, batch_reference, think_reference = json.loads(out)
    _wait("dp1", procs["dp1"])
    _wait("schema", procs["schema"])
    _wait("batch", procs["batch"])
    _wait("think", procs["think"])
    return {
        **dirs,
        "reference": reference,
        "batch_reference": batch_reference,
        "think_ref": think_reference,
        "args": args,
    }


def _rows(run_dir):
    return pq.read_table(run_dir / "results.parquet").to_pylist()


def test_every_row_once_in_order_with_its_errors(runs):
    rows = _rows(runs["dp2"])
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))
    for i, r in enumerate(rows):
        if i in ERRORS:
            assert ERRORS[i] in r["error"] and r["generated_text"] is None, r
        else:
            assert r["error"] is None, r
    s = json.loads((runs["dp2"] / "summary.json").read_text())
    assert s["layout"]["ranks"] == 2 and s["rows_failed"] == len(ERRORS)
    assert s["output_tokens"] == sum(sum(r["output_tokens"]) for r in rows if r["error"] is None)
    assert s["engine_args"]["enable_chunked_prefill"] is False  # rows may be seeded


def test_per_row_params_equal_llm_generate_with_a_list_of_sampling_params(runs):
    rows = [r for r in _rows(runs["dp2"]) if r["error"] is None]
    ref = runs["reference"]
    differ = [(i, r["generated_text"], x["texts"]) for i, (r, x) in enumerate(zip(rows, ref, strict=True))]
    assert [d for d in differ if d[1] != d[2]] == []
    assert [r["finish_reason"] for r in rows] == [x["reasons"] for x in ref]
    assert [r["output_tokens"] for r in rows] == [x["tokens"] for x in ref]
    assert [r["prompt_tokens"] for r in rows] == [x["prompt_tokens"] for x in ref]


def test_per_row_max_tokens_exact_with_ignore_eos(runs):
    rows = _rows(runs["dp2"])
    assert rows[1]["output_tokens"] == [3] and rows[2]["output_tokens"] == [8]
    assert rows[1]["finish_reason"] == rows[2]["finish_reason"] == ["length"]


def test_n3_seeded_samples_same_at_dp1_and_dp2(runs):
    dp2 = _rows(runs["dp2"])
    for i in (3, 4):
        assert len(dp2[i]["generated_text"]) == N
        assert len(set(dp2[i]["generated_text"])) > 1  # sampled: the samples differ
    exploded = _rows(runs["dp1"])
    back = {}
    for r in exploded:
        back.setdefault(r["id"], []).append(r)
    assert list(back) == list(range(len(PROMPTS)))  # input order
    for i, r in enumerate(dp2):
        samples = back[i]
        if i in ERRORS:
            assert len(samples) == 1 and samples[0]["sample_index"] is None and samples[0]["error"]
            continue
        assert [x["sample_index"] for x in samples] == list(range(len(r["generated_text"])))
        assert [x["generated_text"] for x in samples] == r["generated_text"]
        assert [x["output_tokens"] for x in samples] == r["output_tokens"]


def test_logprobs_equal_vllms(runs):
    rows = [r for r in _rows(runs["dp2"]) if r["error"] is None]
    ref = runs["reference"]
    k = [i for i, row in enumerate(r for j, r in enumerate(ROWS) if j not in ERRORS) if row and "logprobs" in row][0]
    lps, theirs = rows[k]["logprobs"][0], ref[k]["logprobs"][0]
    assert [x["token_id"] for x in lps] == [t for t, _ in theirs]
    assert [x["logprob"] for x in lps] == pytest.approx([v for _, v in theirs])
    assert all(len(x["top_logprobs"]) == 2 for x in lps)
    assert all(x["top_logprobs"][0]["logprob"] >= x["top_logprobs"][1]["logprob"] for x in lps)
    assert rows[k]["cumulative_logprob"][0] == pytest.approx(ref[k]["cumulative"][0])
    assert all(r["logprobs"] == [None] * len(r["generated_text"]) for j, r in enumerate(rows) if j not in (k, k + 1))
    zero = rows[k + 1]["logprobs"][0]  # logprobs=0: each token's own logprob, no alternatives
    assert [x["token_id"] for x in zero] == [t for t, _ in ref[k + 1]["logprobs"][0]]
    assert all(x["top_logprobs"] == [] and x["logprob"] <= 0 for x in zero)


def test_prompt_logprobs_score_every_prompt_token(runs):
    """sampling.prompt_logprobs=1 (the schema run; vLLM 0.32 fails prompt logprobs with LoRA
    enabled, so hpcinfer refuses them together): one entry per prompt token, the first without."""
    for r in _rows(runs["schema"]):
        plp = r["prompt_logprobs"]
        assert len(plp) == r["prompt_tokens"] and plp[0]["logprob"] is None and plp[0]["top_logprobs"] == []
        assert all(x["logprob"] <= 0 and len(x["top_logprobs"]) == 1 for x in plp[1:])
        assert all(x["top_logprobs"][0]["logprob"] >= x["logprob"] - 1e-6 for x in plp[1:])


@pytest.mark.skipif(not LORA_E2E, reason="LoRA on vLLM 0.32's CPU build: see LORA_E2E")
def test_lora_row_equals_generate_with_its_lora_request(runs):
    """The row before last is row 0's prompt through adapter 'ad': LLM.generate with LoRARequest gives
    the same text (test_per_row_params...), and the adapter changes it."""
    rows = _rows(runs["dp2"])
    assert rows[-2]["adapter"] == "ad" and rows[-2]["error"] is None
    assert rows[-2]["generated_text"] != rows[0]["generated_text"]
    a = runs["args"]
    assert (a["enable_lora"], a["max_loras"], a["max_lora_rank"]) == (True, 2, 8)  # CPU: an empty last slot


def test_choice_row_yields_one_of_the_choices(runs):
    assert _rows(runs["dp2"])[7]["generated_text"][0] in CHOICES


def test_json_schema_every_row_parses_and_validates(runs):
    rows = _rows(runs["schema"])
    assert len(rows) == len(SCHEMA_PROMPTS)
    for r in rows:
        assert r["error"] is None and r["finish_reason"] == "stop", r
        jsonschema.validate(json.loads(r["generated_text"]), SCHEMA)


def test_openai_batch_n_choices_and_logprobs_in_the_openai_shape(runs):
    lines = [json.loads(x) for x in (runs["batch"] / "results.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["cmpl", "chat"] and all(x["error"] is None for x in lines)
    cmpl, chat = (x["response"]["body"] for x in lines)
    ref = runs["batch_reference"]
    assert [c["text"] for c in cmpl["choices"]] == ref["texts"] and [c["index"] for c in cmpl["choices"]] == [0, 1]
    assert cmpl["usage"]["completion_tokens"] == sum(ref["tokens"])
    for choice, theirs in zip(cmpl["choices"], ref["logprobs"], strict=True):
        lp = choice["logprobs"]
        assert lp["token_logprobs"] == pytest.approx([x[1] for x in theirs])
        assert len(lp["tokens"]) == len(lp["text_offset"]) == len(theirs) and all(
            len(t) == 2 for t in lp["top_logprobs"]
        )
    assert len(chat["choices"]) == 3 and chat["object"] == "chat.completion"
    for c in chat["choices"]:
        content = c["logprobs"]["content"]
        assert 1 <= len(content) <= 3 and all(
            len(t["top_logprobs"]) == 1 and isinstance(t["bytes"], list) for t in content
        )


def test_reasoning_split_with_a_template_that_opens_a_think_tag(runs):
    """output.reasoning_parser=qwen3: reasoning_text is what came before </think>, generated_text
    the answer after it, as vLLM's parser splits LLM.chat's text."""
    rows = _rows(runs["think"])
    assert [[r["reasoning_text"], r["generated_text"]] for r in rows] == runs["think_ref"]
    assert all(r["reasoning_text"] in ("ab", "cd") and r["generated_text"] in ("ef", "gh") for r in rows)
