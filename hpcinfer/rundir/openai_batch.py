"""The OpenAI Batch output file: `<run_dir>/results.jsonl`, written by finalize for OpenAI Batch
input, besides results.parquet. One JSON line per input line, in input order, as vLLM's run-batch
writes them (vllm/entrypoints/launchers/run_batch.py, BatchRequestOutput):

    {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": {"id", "object":
     "chat.completion" | "text_completion", "created", "model", "choices": [...], "usage":
     {"prompt_tokens", "total_tokens", "completion_tokens", ...}}}, "error": null}

A line that could not be generated gets `"response": {"status_code": 400, "request_id", "body":
null}` and its `error` (the row's error). Streamed from results.parquet a batch at a time
(memory bounded); ids are derived from the run and the line, so a rerun writes the same file.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import pyarrow.parquet as pq

from hpcinfer.rundir.files import atomic_path

BATCH_ROWS = 16 * 1024


def _ids(run: str, row: int) -> Dict[str, str]:
    h = uuid.uuid5(uuid.NAMESPACE_URL, f"hpcinfer:{run}:{row}").hex
    return {"id": f"vllm-{h}", "request_id": f"vllm-batch-{h}", "completion": h}


def output_line(row: Dict[str, Any], n: int, run: str, created: int, default_model: str) -> Dict[str, Any]:
    """One results.parquet row of OpenAI Batch input (custom_id, url, body, generated columns) as
    its output line. Pure."""
    ids = _ids(run, n)
    if row.get("error") is not None:
        return {
            "id": ids["id"],
            "custom_id": row.get("custom_id"),
            "response": {"status_code": 400, "request_id": ids["request_id"], "body": None},
            "error": row["error"],
        }
    model = _model(row.get("body")) or default_model
    samples = _samples(row)
    usage = {
        "prompt_tokens": row["prompt_tokens"],
        "total_tokens": row["prompt_tokens"] + sum(s["output_tokens"] for s in samples),
        "completion_tokens": sum(s["output_tokens"] for s in samples),
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    extra = {
        "service_tier": None,
        "system_fingerprint": None,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }
    if row.get("url") == "/v1/completions":
        body: Dict[str, Any] = {
            "id": f"cmpl-{ids['completion']}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "text": s["text"],
                    "logprobs": completion_logprobs(s["logprobs"]),
                    "finish_reason": s["finish_reason"],
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                }
                for i, s in enumerate(samples)
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage,
            "kv_transfer_params": None,
        }
    else:
        body = {
            "id": f"chatcmpl-{ids['completion']}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": s["text"],
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": s["reasoning_text"],
                    },
                    "logprobs": chat_logprobs(s["logprobs"]),
                    "finish_reason": s["finish_reason"],
                    "stop_reason": None,
                    "token_ids": None,
                }
                for i, s in enumerate(samples)
            ],
            "usage": usage,
            **extra,
        }
    return {
        "id": ids["id"],
        "custom_id": row.get("custom_id"),
        "response": {"status_code": 200, "request_id": ids["request_id"], "body": body},
        "error": None,
    }


def _samples(row: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A row's samples (list columns when the run may have n > 1, else one) as dicts of text,
    finish_reason, output_tokens, logprobs. Pure."""
    texts = row["generated_text"]
    if not isinstance(texts, list):
        return [
            {
                "text": texts,
                "finish_reason": row["finish_reason"],
                "output_tokens": row["output_tokens"],
                "logprobs": row.get("logprobs"),
                "reasoning_text": row.get("reasoning_text"),
            }
        ]
    logprobs = row.get("logprobs") or [None] * len(texts)
    reasoning = row.get("reasoning_text") or [None] * len(texts)
    return [
        {"text": t, "finish_reason": f, "output_tokens": o, "logprobs": lp, "reasoning_text": r}
        for t, f, o, lp, r in zip(texts, row["finish_reason"], row["output_tokens"], logprobs, reasoning, strict=True)
    ]


def _bytes(token: Optional[str]) -> Optional[List[int]]:
    return None if token is None else list(token.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: Optional[List[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """A sample's `logprobs` column (output.LOGPROB rows) as a chat completion choice's logprobs
    (`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`). Pure."""
    if tokens is None:
        return None
    return {
        "content": [
            {
                "token": t["token"],
                "logprob": t["logprob"],
                "bytes": _bytes(t["token"]),
                "top_logprobs": [
                    {"token": x["token"], "logprob": x["logprob"], "bytes": _bytes(x["token"])}
                    for x in t["top_logprobs"] or []
                ],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens: Optional[List[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """A sample's `logprobs` column as a text completion choice's logprobs (`text_offset`,
    `token_logprobs`, `tokens`, `top_logprobs`: per position {token: logprob}). Pure."""
    if tokens is None:
        return None
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["token"] or "")
    return {
        "text_offset": offsets,
        "token_logprobs": [t["logprob"] for t in tokens],
        "tokens": [t["token"] for t in tokens],
        "top_logprobs": [{x["token"]: x["logprob"] for x in t["top_logprobs"] or []} for t in tokens],
    }


def _model(body: Optional[str]) -> Optional[str]:
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        return None
    return obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), str) else None


def write_results_jsonl(results: Path, out: Path, run: str, default_model: str) -> int:
    """Write `out` (atomically) from `results` (results.parquet of OpenAI Batch input), streaming;
    the number of lines."""
    created, n = int(time.time()), 0
    columns = ["custom_id", "url", "body", "generated_text", "finish_reason", "prompt_tokens", "output_tokens", "error"]
    pf = pq.ParquetFile(results)
    columns += [c for c in ("logprobs", "reasoning_text") if c in pf.schema_arrow.names]
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    f.write(json.dumps(output_line(row, n, run, created, default_model), ensure_ascii=False) + "\n")
                    n += 1
    return n
