"""[from engine] One vLLM engine per rank: build it from the run's engine_args, stream rows through it.

Rows that cannot be generated (null prompt, empty after tokenization, longer than the context)
get a per-row `error` instead of failing the batch: vLLM rejects a whole `generate` call if any
prompt is too long, so lengths are checked here first. Everything vLLM-specific lives in this
module; `row_error` and `sampling_kwargs` are pure.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hpcinfer.config import SamplingConfig


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


Finished = Tuple[Any, int, RowResult]  # (tag given to Engine.add, index within that add, result)


class Engine:
    """A vLLM `LLM` built from exactly `engine_args`."""

    def __init__(self, engine_args: Dict[str, Any], sampling: SamplingConfig):
        from vllm import LLM

        self.llm = LLM(**engine_args)
        self.sampling = sampling
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._requests = itertools.count()
        self._pending: Dict[str, Tuple[Any, int]] = {}  # request id -> (tag, index)
        self._aliases: Dict[str, str] = {}  # engine-internal id -> our request id

    @property
    def pending(self) -> int:
        """Requests added and not finished yet."""
        return len(self._pending)

    @property
    def max_num_seqs(self) -> int:
        """How many requests the engine runs at once (its batch)."""
        sched = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        return int(getattr(sched, "max_num_seqs", None) or 256)

    def add(self, tag: Any, prompts: Sequence[Optional[str]], rows: Sequence[int],
            max_tokens: Optional[Sequence[Optional[int]]] = None) -> List[Finished]:
        """Queue `prompts` (global row numbers `rows`, for per-row seeds) under `tag`, each with
        its own output cap when `max_tokens` gives one. Returns the rows that cannot be generated,
        as finished with their error; `step` returns the others."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        texts = [p for p in prompts if p is not None]
        ids = iter(self.tokenizer(texts)["input_ids"] if texts else [])
        token_ids = [None if p is None else next(ids) for p in prompts]
        base, failed = sampling_kwargs(self.sampling), []
        for i, (prompt, toks) in enumerate(zip(prompts, token_ids, strict=True)):
            err = row_error(prompt, None if toks is None else len(toks), self.max_model_len)
            if err:
                failed.append((tag, i, RowResult(None, None, 0 if toks is None else len(toks), 0, err)))
                continue
            request_id = f"hpcinfer-{rows[i]}-{next(self._requests)}"
            # FINAL_ONLY, as LLM.generate sets it: no per-step partial outputs to detokenize and copy
            cap = max_tokens[i] if max_tokens is not None and max_tokens[i] is not None else base["max_tokens"]
            params = SamplingParams(**{**base, "max_tokens": cap}, seed=row_seed(self.sampling, rows[i]),
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            self._pending[request_id] = (tag, i)
            internal = self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": toks}, params)
            if isinstance(internal, str) and internal != request_id:  # outputs carry one or the other
                self._aliases[internal] = request_id
        return failed

    def step(self) -> List[Finished]:
        """One engine step: the requests it finished, as (tag, index in its `add`, result)."""
        done = []
        for out in self.llm.llm_engine.step():
            if out.finished:
                tag, i = self._pending.pop(self._aliases.pop(out.request_id, out.request_id))
                c = out.outputs[0]
                done.append((tag, i, RowResult(c.text, c.finish_reason, len(out.prompt_token_ids), len(c.token_ids),
                                               None)))
        return done

    def abort(self, tag: Any) -> None:
        """Drop the unfinished requests added under `tag` (their shard went to another rank)."""
        ids = [rid for rid, (t, _) in self._pending.items() if t == tag]
        for rid in ids:
            del self._pending[rid]
        if ids:
            self.llm.llm_engine.abort_request(ids)

    def group_busy(self) -> bool:
        """Lockstep (MoE data-parallel group): whether any rank of the group still has requests.
        An idle rank must keep stepping while it does (vLLM runs dummy batches for it)."""
        return bool(self.llm.llm_engine.has_unfinished_requests())

    def shutdown(self) -> None:
        """Stop engine-core processes so the rank can exit without hanging."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
