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
from typing import Any, Dict, Optional

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
    text, reason = row["generated_text"], row["finish_reason"]
    usage = {
        "prompt_tokens": row["prompt_tokens"],
        "total_tokens": row["prompt_tokens"] + row["output_tokens"],
        "completion_tokens": row["output_tokens"],
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
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                }
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
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                    "token_ids": None,
                }
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
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for batch in pq.ParquetFile(results).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    f.write(json.dumps(output_line(row, n, run, created, default_model), ensure_ascii=False) + "\n")
                    n += 1
    return n
