"""The request seam: what a row asks of the engine, and what the engine's answer becomes.

Two functions, the only places where rows meet vLLM's request and output types:

- `build_requests`: a shard's rows -> per row, either a `Request` (prompt token ids and the
  SamplingParams keyword arguments, its per-row seed and max_tokens included) or, for a row that
  cannot be generated (null prompt, empty after tokenization, longer than the context), its
  `RowResult` with the error at once: vLLM rejects a whole batch if one prompt is too long, so
  lengths are checked here first.
- `row_result`: a finished vLLM `RequestOutput` -> the row's `RowResult` (the output columns,
  rundir/output.py).

Features that change what is asked of the model (chat templates, per-row sampling, n > 1,
structured output, logprobs, LoRA) belong here: a new request field on `Request` and in
`build_requests`, a new output column on `RowResult` (and `GENERATED`) and in `row_result`. The
engine (engine.py) only adds requests and steps. Pure, apart from calling the tokenizer it is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import pyarrow as pa

from hpcinfer.config import RunConfig, SamplingConfig
from hpcinfer.rundir.output import RowResult


@dataclass(frozen=True)
class Request:
    """One row's request to the engine."""

    row: int  # the row's global number (request ids; its seed is derived from it)
    prompt_token_ids: List[int]
    sampling: Dict[str, Any]  # SamplingParams keyword arguments, seed and max_tokens included


def row_error(prompt: Any, n_tokens: Optional[int], max_model_len: int) -> Optional[str]:
    """Why this row cannot be generated, or None. A prompt plus at least one output token must
    fit in max_model_len (vLLM's own rule)."""
    if prompt is None:
        return "prompt is null"
    if n_tokens == 0:
        return "prompt is empty (0 tokens)"
    if n_tokens is not None and n_tokens >= max_model_len:
        return f"prompt has {n_tokens} tokens; max_model_len={max_model_len} leaves no room for output"
    return None


def sampling_kwargs(s: SamplingConfig) -> Dict[str, Any]:
    """SamplingParams keyword arguments (without the per-row seed)."""
    kw = asdict(s)
    kw.pop("seed")
    kw["stop"] = list(s.stop) or None
    return kw


def row_seed(s: SamplingConfig, row: int) -> Optional[int]:
    """Seed of global row `row`: independent of which rank or shard generates it."""
    return None if s.seed is None or s.temperature == 0 else s.seed + row


def build_requests(
    table: pa.Table, positions: Sequence[int], rows: Sequence[int], cfg: RunConfig, tokenizer: Any, max_model_len: int
) -> List[Union[Request, RowResult]]:
    """The requests of rows `positions` of a shard's input `table` (global row numbers `rows`):
    for each, in order, its Request, or its RowResult when it cannot be generated (`row_error`).

    The prompt is `cfg.data.prompt_column`, tokenized by `tokenizer` (a Hugging Face tokenizer:
    called on the list of prompts, as vLLM's own input processing tokenizes a text prompt); the
    output cap is the row's `cfg.data.max_tokens_column` value when it has one, else
    `cfg.sampling.max_tokens`; the seed is `row_seed`."""
    take = pa.array(positions, pa.int64())
    prompts = table.column(cfg.data.prompt_column).take(take).to_pylist()
    caps = (
        table.column(cfg.data.max_tokens_column).take(take).to_pylist()
        if cfg.data.max_tokens_column
        else [None] * len(prompts)
    )
    texts = [p for p in prompts if p is not None]
    ids = iter(tokenizer(texts)["input_ids"] if texts else [])
    token_ids = [None if p is None else next(ids) for p in prompts]
    base = sampling_kwargs(cfg.sampling)
    out: List[Union[Request, RowResult]] = []
    for prompt, toks, cap, row in zip(prompts, token_ids, caps, rows, strict=True):
        err = row_error(prompt, None if toks is None else len(toks), max_model_len)
        if err:
            out.append(RowResult(None, None, 0 if toks is None else len(toks), 0, err))
            continue
        out.append(
            Request(
                row,
                toks,
                {**base, "max_tokens": base["max_tokens"] if cap is None else cap, "seed": row_seed(cfg.sampling, row)},
            )
        )
    return out


def row_result(output: Any) -> RowResult:
    """The output columns of a finished request from its vLLM `RequestOutput` (one completion)."""
    c = output.outputs[0]
    return RowResult(c.text, c.finish_reason, len(output.prompt_token_ids), len(c.token_ids), None)
