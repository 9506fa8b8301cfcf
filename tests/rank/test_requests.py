"""The request seam (rank/requests.py) and the output columns it fills (rundir/output.py), without vLLM."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pyarrow as pa

from hpcinfer.cli import compose
from hpcinfer.rank.requests import Request, build_requests, row_result, sampling_kwargs
from hpcinfer.rundir.output import GENERATED, OUTPUT_COLUMNS, RowResult, Sample


# ---- the output columns -------------------------------------------------------------------------
def test_row_result_is_the_generated_columns():
    names = [f.name for f in dataclasses.fields(RowResult)]
    assert names[: len(GENERATED)] == GENERATED.names == list(OUTPUT_COLUMNS)[: len(GENERATED)]
    assert names[len(GENERATED) :] == ["samples", "prompt_logprobs"]  # shaped by the run's OutputSpec


# ---- requests.py --------------------------------------------------------------------------------
class WordTokenizer:
    """One token per word, called as a Hugging Face tokenizer is (a list of texts)."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_build_requests_makes_a_request_per_row_or_its_error():
    cfg = compose(
        ["sampling.max_tokens=16", "sampling.temperature=0.7", "sampling.seed=100", "data.max_tokens_column=cap"]
    )
    table = pa.table(
        {
            "prompt": ["a b", None, "   ", "one two three four five", "x"],
            "cap": pa.array([None, 3, 4, 5, 6], pa.int32()),
        }
    )
    tok = WordTokenizer()
    out = build_requests(table, [4, 0, 1, 2, 3], [14, 10, 11, 12, 13], cfg, tok, max_model_len=5)
    assert tok.calls == [["x", "a b", "   ", "one two three four five"]]  # one call, nulls left out
    base = sampling_kwargs(cfg.sampling)
    assert out[0] == Request(14, [1], {**base, "max_tokens": 6, "seed": 114})  # the row's own cap
    assert out[1] == Request(10, [1, 1], {**base, "max_tokens": 16, "seed": 110})  # null cap: sampling.max_tokens
    assert out[2] == RowResult(None, None, 0, 0, "prompt is null")
    assert out[3] == RowResult(None, None, 0, 0, "prompt is empty (0 tokens)")
    assert out[4] == RowResult(None, None, 5, 0, "prompt has 5 tokens; max_model_len=5 leaves no room for output")


def test_build_requests_greedy_rows_have_no_seed_and_the_configured_sampling():
    cfg = compose(["sampling.temperature=0", "sampling.seed=7", "sampling.max_tokens=9", "sampling.stop=[END]"])
    (req,) = build_requests(pa.table({"prompt": ["hi there"]}), [0], [3], cfg, WordTokenizer(), 100)
    assert req.sampling["seed"] is None and req.sampling["max_tokens"] == 9 and req.sampling["stop"] == ["END"]
    assert req.sampling["temperature"] == 0 and "output_kind" not in req.sampling
    assert build_requests(pa.table({"prompt": pa.array([], pa.string())}), [], [], cfg, WordTokenizer(), 100) == []


def test_row_result_from_a_request_output():
    out = SimpleNamespace(
        prompt_token_ids=[1, 2, 3],
        finished=True,
        outputs=[SimpleNamespace(index=0, text="hello", finish_reason="stop", token_ids=[5, 6], logprobs=None)],
    )
    assert row_result(out) == RowResult("hello", "stop", 3, 2, None, [Sample("hello", "stop", 2)])
