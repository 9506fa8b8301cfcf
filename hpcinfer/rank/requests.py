"""The request seam: what a row asks of the engine, and what the engine's answer becomes.

Two functions, the only places where rows meet vLLM's request and output types:

- `build_requests`: a shard's rows -> per row, either a `Request` (prompt token ids and the
  SamplingParams keyword arguments, its per-row seed and max_tokens included) or, for a row that
  cannot be generated (null prompt, empty after tokenization, longer than the context), its
  `RowResult` with the error at once: vLLM rejects a whole batch if one prompt is too long, so
  lengths are checked here first.
- `row_result`: a finished vLLM `RequestOutput` -> the row's `RowResult` (the output columns,
  rundir/output.py).

Rows are raw prompts, prompt templates filled from columns, chat conversations rendered with the
chat template (by vLLM's own rendering, `ChatRenderer`), or OpenAI Batch lines (their bodies read
by vLLM's own protocol classes), as the run's RequestSpec (plan.json) says.

What a row asks of the model beyond its prompt lives here too (issue 14): its own sampling
(`data.sampling_column` over `sampling.*`, `row_kwargs`; an invalid value is the row's error),
n samples and their seeds (`row_seed`), structured output (`sampling_kwargs`:
`structured_outputs`), logprobs (`row_result`, `token_logprobs`), its LoRA adapter
(`lora_request`), and the reasoning split of its completions (`split_reasoning`). Which output
columns a run has, and their shapes, is the plan's OutputSpec (rundir/output.py). The engine
(engine.py) adds requests and steps, and renders what vLLM must render itself. Pure, apart from
calling the tokenizer and the renderer it is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import pyarrow as pa

from hpcinfer.config import RunConfig, SamplingConfig, row_sampling
from hpcinfer.rundir.output import RowResult, Sample
from hpcinfer.rundir.records import MESSAGES, OPENAI_BATCH, RequestSpec


@dataclass(frozen=True)
class Request:
    """One row's request to the engine."""

    row: int  # the row's global number (request ids; its seed is derived from it)
    prompt_token_ids: List[int]
    # SamplingParams keyword arguments, seed and max_tokens included; an OpenAI Batch row: the
    # SamplingParams vLLM's protocol classes made of its body
    sampling: Any
    # the row's LoRA adapter as vLLM's LoRARequest takes it: (name, id >= 1, path); None: the base model
    lora: Optional[Tuple[str, int, str]] = None


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
    """SamplingParams keyword arguments (without the per-row seed); structured output as
    `structured_outputs`, the keyword arguments of vLLM's StructuredOutputsParams (json, regex,
    choice, grammar), absent without it. Pure."""
    kw = asdict(s)
    kw.pop("seed")
    st = kw.pop("structured")
    kw["stop"] = list(s.stop) or None
    so = {
        "json": json.loads(st["json_schema"]) if st["json_schema"] is not None else None,
        "regex": st["regex"],
        "choice": list(st["choice"]) if st["choice"] is not None else None,
        "grammar": st["grammar"],
    }
    so = {k: v for k, v in so.items() if v is not None}
    if so:
        kw["structured_outputs"] = so
    return kw


def row_seed(s: SamplingConfig, row: int, stride: int = 1) -> Optional[int]:
    """Seed of global row `row`: independent of which rank or shard generates it. `stride`: the
    run's largest n (RequestSpec.seed_stride): a row's samples take seed .. seed + n - 1 (vLLM
    seeds sample j with the request's seed + j), so rows never share a sample's seed. Pure."""
    return None if s.seed is None or s.temperature == 0 else s.seed + row * stride


def run_sampling(cfg: RunConfig, spec: RequestSpec) -> SamplingConfig:
    """The run's sampling as the ranks use it: `sampling.*`, its json_schema's text as read when
    the run was planned (a file's). Pure."""
    if spec.json_schema is None:
        return cfg.sampling
    return replace(cfg.sampling, structured=replace(cfg.sampling.structured, json_schema=spec.json_schema))


def row_kwargs(
    base: SamplingConfig, value: Any, cap: Optional[int], row: int, stride: int = 1
) -> Union[Dict[str, Any], str]:
    """One row's SamplingParams keyword arguments, seed included: `base`, its output cap `cap`
    (data.max_tokens_column; None: base's), then its own sampling `value` (data.sampling_column:
    a dict, JSON text or None) over them; or why the value is invalid (its error). The seed is
    the row's own when it gives one (exact, as SamplingParams(seed=...)), else `row_seed`. A
    row asking for more samples than the run was planned for (`stride`) is an error. Pure."""
    own = row_sampling(value, replace(base, seed=None, max_tokens=base.max_tokens if cap is None else cap))
    if isinstance(own, str):
        return own
    if own.n > stride:
        return f"sampling_column: n={own.n} exceeds the run's planned largest n ({stride})"
    seed = own.seed if own.seed is not None else row_seed(replace(own, seed=base.seed), row, stride)
    return {**sampling_kwargs(own), "seed": seed}


class ChatRenderer(Protocol):
    """What chat and OpenAI Batch rows need of the engine (engine.py's VllmEngine): vLLM's own
    rendering, so that a prompt is exactly what vLLM would make of the row."""

    def render_chat(
        self, conversations: List[List[Dict[str, Any]]], chat_template: Optional[str], kwargs: Dict[str, Any]
    ) -> List[Union[List[int], str]]:
        """Each conversation's prompt token ids (as LLM.chat renders it), or why it cannot be rendered."""
        ...

    def batch_request(
        self, url: str, body: Dict[str, Any], chat_template: Optional[str], kwargs: Dict[str, Any]
    ) -> Tuple[List[int], Any]:
        """An OpenAI Batch body's (prompt token ids, SamplingParams); ValueError when invalid."""
        ...


def build_requests(
    table: pa.Table,
    positions: Sequence[int],
    rows: Sequence[int],
    cfg: RunConfig,
    tokenizer: Any,
    max_model_len: int,
    spec: Optional[RequestSpec] = None,
    renderer: Optional[ChatRenderer] = None,
) -> List[Union[Request, RowResult]]:
    """The requests of rows `positions` of a shard's input `table` (global row numbers `rows`):
    for each, in order, its Request, or its RowResult when it cannot be generated (`row_error`,
    or a conversation that is null, empty or malformed, a template column that is null, an
    OpenAI Batch line that is not a valid request).

    What the prompt is comes from `spec` (plan.json's RequestSpec; None: `cfg.data.prompt_column`):
    a text (the prompt column, or the template filled from the row) tokenized by `tokenizer` (a
    Hugging Face tokenizer: called on the list of prompts, as vLLM's own input processing
    tokenizes a text prompt), or a conversation rendered by `renderer` (vLLM's chat rendering).
    The output cap is the row's `cfg.data.max_tokens_column` value when it has one, else
    `cfg.sampling.max_tokens`; the seed is `row_seed`. An OpenAI Batch row's body gives its
    prompt and its sampling, as vLLM's server reads it (`renderer.batch_request`)."""
    spec = spec or RequestSpec(prompt_column=cfg.data.prompt_column)
    take = pa.array(positions, pa.int64())
    if spec.kind == OPENAI_BATCH:
        return _batch_requests(
            table.select(["custom_id", "method", "url", "body"]).take(take), rows, cfg, max_model_len, spec, renderer
        )
    caps = (
        table.column(cfg.data.max_tokens_column).take(take).to_pylist()
        if cfg.data.max_tokens_column
        else [None] * len(positions)
    )
    prompts: List[Any]  # per row: the text, the conversation, or an error (Failed)
    if spec.kind == MESSAGES:
        prompts = [conversation(v) for v in table.column(spec.messages_column).take(take).to_pylist()]
    else:
        prompts = _texts(table, take, spec)
        if spec.chat:
            system = [{"role": "system", "content": spec.system}] if spec.system is not None else []
            prompts = [p if isinstance(p, Failed) else system + [{"role": "user", "content": p}] for p in prompts]
    ok = [p for p in prompts if not isinstance(p, Failed)]
    if spec.renders_chat:
        if renderer is None:
            raise TypeError("chat rows need an engine that renders chat (render_chat)")
        rendered = iter(renderer.render_chat(ok, spec.chat_template, spec.chat_template_kwargs) if ok else [])
    else:
        rendered = iter(tokenizer(ok)["input_ids"] if ok else [])
    base = run_sampling(cfg, spec)
    values = (
        table.column(spec.sampling_column).take(take).to_pylist() if spec.sampling_column else [None] * len(positions)
    )
    adapters = table.column(spec.lora_column).take(take).to_pylist() if spec.lora_column else [None] * len(positions)
    out: List[Union[Request, RowResult]] = []
    for prompt, cap, value, adapter, row in zip(prompts, caps, values, adapters, rows, strict=True):
        toks = None if isinstance(prompt, Failed) else next(rendered)
        if isinstance(toks, str):
            prompt, toks = Failed(toks), None
        err = prompt.why if isinstance(prompt, Failed) else row_error(prompt, len(toks), max_model_len)
        kwargs = None if err else row_kwargs(base, value, cap, row, spec.seed_stride)
        if isinstance(kwargs, str):
            err = kwargs
        if not err and adapter is not None and adapter not in spec.lora_adapters:  # planning checks them
            err = f"data.lora_column: {adapter!r} is not one of lora.adapters {sorted(spec.lora_adapters)}"
        if err:
            out.append(RowResult(None, None, 0 if toks is None else len(toks), 0, err))
            continue
        out.append(Request(row, toks, kwargs, lora_request(spec.lora_adapters, adapter)))
    return out


def lora_request(adapters: Dict[str, str], name: Optional[str]) -> Optional[Tuple[str, int, str]]:
    """(name, id, path) of adapter `name` of `adapters` (RequestSpec.lora_adapters), None for
    the base model: ids are 1 + the name's place among the sorted names, the same on every rank. Pure."""
    if name is None:
        return None
    return name, 1 + sorted(adapters).index(name), adapters[name]


@dataclass(frozen=True)
class Failed:
    """A row that cannot become a request, and why (its `error`)."""

    why: str


def _texts(table: pa.Table, take: pa.Array, spec: RequestSpec) -> List[Any]:
    """Each row's prompt text (rows `take` of `table`): its prompt column, or the template filled
    from its columns; Failed for a null prompt or a null template column. Reads only those columns."""
    if spec.template is None:
        prompts = table.column(spec.prompt_column).take(take).to_pylist()
        return [Failed("prompt is null") if p is None else p for p in prompts]
    columns = {c: table.column(c).take(take).to_pylist() for c in spec.template_columns()}
    out: List[Any] = []
    for i in range(len(take)):
        values = {c: v[i] for c, v in columns.items()}
        nulls = [c for c, v in values.items() if v is None]
        out.append(Failed(f"prompt.template: column {nulls[0]!r} is null") if nulls else fill(spec.template, values))
    return out


def fill(template: str, values: Dict[str, Any]) -> str:
    """`template` with each `{column}` field replaced by that column's value (format specs and
    conversions as str.format applies them; a field's name is the whole column name). Pure."""
    import string

    f = string.Formatter()
    parts = []
    for literal, name, spec, conversion in f.parse(template):
        parts.append(literal)
        if name is not None:
            parts.append(f.format_field(f.convert_field(values[name], conversion), spec or ""))
    return "".join(parts)


def conversation(value: Any) -> Union[List[Dict[str, Any]], Failed]:
    """A row's messages as a conversation (a list of {role, content, ...} dicts), or Failed: null,
    not JSON, not a list, empty, or a message without a string role and content. A list of
    structs (Parquet) gives each message every field of the struct: null ones are dropped. Pure."""
    if value is None:
        return Failed("messages is null")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            return Failed(f"messages is not valid JSON: {e}")
    if not isinstance(value, list):
        return Failed(f"messages is not a list of messages (got {type(value).__name__})")
    if not value:
        return Failed("messages is empty")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return Failed(f"message {i} is not a {{role, content}} object (got {type(m).__name__})")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str) or not m["role"]:
            return Failed(f"message {i} has no role")
        if not isinstance(m.get("content"), (str, list)):
            return Failed(f"message {i} ({m['role']}) has no content")
        out.append(m)
    return out


def _batch_requests(
    table: pa.Table, rows: Sequence[int], cfg: RunConfig, max_model_len: int, spec: RequestSpec, renderer: Any
) -> List[Union[Request, RowResult]]:
    """OpenAI Batch rows (custom_id, method, url, body): each body as vLLM's server reads it."""
    if renderer is None:
        raise TypeError("OpenAI Batch rows need an engine that reads request bodies (batch_request)")
    out: List[Union[Request, RowResult]] = []
    columns = [table.column(c).to_pylist() for c in ("custom_id", "method", "url", "body")]
    for (custom_id, method, url, body), row in zip(zip(*columns), rows, strict=True):
        err, toks = batch_line_error(custom_id, method, url, body), None
        if err is None:
            try:
                toks, params = renderer.batch_request(
                    url, json.loads(body), spec.chat_template, spec.chat_template_kwargs
                )
            except ValueError as e:
                err = str(e)
        if err is None:
            err = row_error("", len(toks), max_model_len)
        if err:
            out.append(RowResult(None, None, 0 if toks is None else len(toks), 0, err))
            continue
        if params.n > spec.seed_stride:
            out.append(RowResult(None, None, len(toks), 0, f"n={params.n} exceeds the run's planned largest n"))
            continue
        if params.seed is None and params.temperature != 0 and cfg.sampling.seed is not None:
            params.seed = cfg.sampling.seed + row * spec.seed_stride  # as row_seed: independent of the layout
        out.append(Request(row, toks, params))
    return out


def batch_line_error(custom_id: Any, method: Any, url: Any, body: Any) -> Optional[str]:
    """Why an OpenAI Batch line (as planning/convert.py keeps it) is not a request, or None. Pure."""
    if url is None and method is None:  # kept as text: not a JSON object with an object body
        try:
            obj = json.loads(body) if body is not None else None
        except ValueError as e:
            return f"the line is not valid JSON: {e}"
        if not isinstance(obj, dict):
            return "the line is not a JSON object"
        if "body" not in obj:
            return "the line has no body"
        return "the line's body is not a JSON object"
    if custom_id is None:
        return "the line has no custom_id (a string)"
    if method != "POST":
        return f"method {method!r} is not POST"
    if url not in ("/v1/chat/completions", "/v1/completions"):
        return f"url {url!r} is not /v1/chat/completions or /v1/completions"
    return None


def row_result(output: Any, logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None) -> RowResult:
    """The output columns of a finished request from its vLLM `RequestOutput`: every completion
    (n of them, in vLLM's order: sample index) as a Sample, with its logprobs when it has them
    (the request's `logprobs` = k: the top k alternatives), and the prompt's logprobs when
    asked for (`prompt_logprobs` = k)."""
    samples = [
        Sample(
            c.text,
            c.finish_reason,
            len(c.token_ids),
            c.cumulative_logprob if c.logprobs is not None else None,
            token_logprobs(c.token_ids, c.logprobs, logprobs),
        )
        for c in sorted(output.outputs, key=lambda c: c.index)
    ]
    first = samples[0]
    prompt = output.prompt_token_ids
    return RowResult(
        first.text,
        first.finish_reason,
        len(prompt),
        sum(s.output_tokens for s in samples),
        None,
        samples,
        token_logprobs(prompt, getattr(output, "prompt_logprobs", None), prompt_logprobs),
    )


def split_reasoning(result: RowResult, split: Any) -> RowResult:
    """`result` with each sample's text split by `split` (text -> (reasoning, answer), vLLM's
    reasoning parser: engine.reasoning_split) into its reasoning_text and its text (the answer;
    "" when there is none). An error row is returned as it is. Pure, apart from `split`."""
    if result.error is not None or split is None:
        return result
    samples = []
    for s in result.samples or [Sample(result.generated_text or "", result.finish_reason, result.output_tokens)]:
        reasoning, answer = split(s.text)
        samples.append(replace(s, text=answer or "", reasoning_text=reasoning))
    return replace(result, generated_text=samples[0].text, samples=samples)


def token_logprobs(token_ids: Sequence[int], logprobs: Any, k: Optional[int]) -> Optional[List[Dict[str, Any]]]:
    """vLLM's logprobs of `token_ids` (per position: {token id: Logprob(logprob, rank,
    decoded_token)}, the top k and the token itself; None for a prompt's first token) as rows of
    output.LOGPROB: each token's id, text and logprob, and the top k alternatives (rank 1..k),
    best first (k None: every entry). None without logprobs. Pure."""
    if logprobs is None:
        return None
    out = []
    for tid, entry in zip(token_ids, logprobs, strict=False):
        if entry is None:
            out.append({"token_id": int(tid), "token": None, "logprob": None, "top_logprobs": []})
            continue
        own = entry.get(tid)
        top = sorted(
            (lp.rank, int(t), lp) for t, lp in entry.items() if k is None or (lp.rank is not None and lp.rank <= k)
        )
        out.append(
            {
                "token_id": int(tid),
                "token": getattr(own, "decoded_token", None),
                "logprob": None if own is None else float(own.logprob),
                "top_logprobs": [
                    {"token_id": t, "token": lp.decoded_token, "logprob": float(lp.logprob)} for _, t, lp in top
                ],
            }
        )
    return out
