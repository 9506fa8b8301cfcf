"""One vLLM engine per rank: build it from the run's engine_args, generate a batch of rows.

Rows that cannot be generated (null prompt, empty after tokenization, longer than the context)
get a per-row `error` instead of failing the batch: vLLM rejects a whole `generate` call if any
prompt is too long, so lengths are checked here first. Everything vLLM-specific lives in this
module; `row_error` and `sampling_kwargs` are pure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .config import SamplingConfig


@dataclass
class RowResult:
    generated_text: Optional[str]
    finish_reason: Optional[str]
    prompt_tokens: int
    output_tokens: int
    error: Optional[str]


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


class Engine:
    """A vLLM `LLM` built from exactly `engine_args`."""

    def __init__(self, engine_args: Dict[str, Any], sampling: SamplingConfig):
        from vllm import LLM

        self.llm = LLM(**engine_args)
        self.sampling = sampling
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, prompts: Sequence[Optional[str]], rows: Sequence[int],
                 on_progress: Optional[Callable[[int], None]] = None) -> List[RowResult]:
        """Results for `prompts` (global row numbers `rows`), in the same order."""
        from vllm import SamplingParams

        texts = [p for p in prompts if p is not None]
        ids = iter(self.tokenizer(texts)["input_ids"] if texts else [])
        token_ids = [None if p is None else next(ids) for p in prompts]
        results: List[Optional[RowResult]] = [None] * len(prompts)
        todo, params = [], []
        base = sampling_kwargs(self.sampling)
        for i, (prompt, toks) in enumerate(zip(prompts, token_ids, strict=True)):
            err = row_error(prompt, None if toks is None else len(toks), self.max_model_len)
            if err:
                results[i] = RowResult(None, None, 0 if toks is None else len(toks), 0, err)
            else:
                todo.append(i)
                params.append(SamplingParams(**base, seed=row_seed(self.sampling, rows[i])))
        if todo:
            outs = self.llm.generate([{"prompt_token_ids": token_ids[i]} for i in todo], params,
                                     use_tqdm=_progress_hook(on_progress) if on_progress else False)
            for i, out in zip(todo, outs, strict=True):
                c = out.outputs[0]
                results[i] = RowResult(c.text, c.finish_reason, len(out.prompt_token_ids), len(c.token_ids), None)
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        """Stop engine-core processes so the rank can exit without hanging."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def _progress_hook(callback: Callable[[int], None]):
    """A tqdm factory for `LLM.generate(use_tqdm=...)` that reports finished requests to
    `callback` instead of drawing a bar."""
    import os

    from tqdm import tqdm

    class _Hook(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = open(os.devnull, "w")
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            super().update(n)
            callback(n)

        def close(self):
            super().close()
            self.fp.close()

    return _Hook
