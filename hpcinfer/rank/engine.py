"""A rank's inference engine: the `Engine` protocol the shard loop drives, and `VllmEngine`, one
vLLM engine built from the run's engine_args.

An engine takes requests (requests.py builds them from rows) under a tag (the shard) and an index
(the row's place in that shard's batch of requests), runs them in one continuous batch, and
hands back each finished one as (tag, index, RowResult). It never sees rows, columns or the run
directory. `create_engine` is the one factory the worker calls (tests replace it with a fake
engine). Everything vLLM-specific lives here and in requests.py; vLLM is imported only when a
VllmEngine is built.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Protocol, Tuple, runtime_checkable

from hpcinfer.rank.requests import Request, row_result
from hpcinfer.rundir.output import RowResult

Finished = Tuple[Any, int, RowResult]  # (tag given to Engine.add, index given with it, result)


@runtime_checkable
class Engine(Protocol):
    """What the shard loop (worker.py) needs of an engine."""

    tokenizer: Any  # tokenizes prompts for requests.build_requests (a Hugging Face tokenizer)
    max_model_len: int  # prompt + output tokens of one request, at most

    @property
    def max_num_seqs(self) -> int:
        """How many requests the engine runs at once (its batch)."""
        ...

    @property
    def pending(self) -> int:
        """Requests added and not finished yet."""
        ...

    def add(self, tag: Any, index: int, request: Request) -> None:
        """Queue `request` under `tag` (its shard) and `index` (its place among the tag's requests)."""
        ...

    def step(self) -> List[Finished]:
        """Run one engine step; the requests it finished."""
        ...

    def abort(self, tag: Any) -> None:
        """Drop the unfinished requests added under `tag`."""
        ...

    def group_busy(self) -> bool:
        """Lockstep (MoE data-parallel group): whether any rank of the group still has requests."""
        ...

    def shutdown(self) -> None:
        """Stop the engine so that the rank can exit without hanging."""
        ...


def create_engine(engine_args: Dict[str, Any]) -> Engine:
    """The rank's engine, built from exactly `engine_args`."""
    return VllmEngine(engine_args)


class VllmEngine:
    """A vLLM `LLM` built from exactly `engine_args`, driven request by request through its
    `llm_engine` (add_request / step), as `LLM.generate` drives it."""

    def __init__(self, engine_args: Dict[str, Any]):
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.llm = LLM(**engine_args)
        self._params, self._final_only = SamplingParams, RequestOutputKind.FINAL_ONLY
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

    def add(self, tag: Any, index: int, request: Request) -> None:
        request_id = f"hpcinfer-{request.row}-{next(self._requests)}"
        # FINAL_ONLY, as LLM.generate sets it: no per-step partial outputs to detokenize and copy
        params = self._params(**request.sampling, output_kind=self._final_only)
        self._pending[request_id] = (tag, index)
        internal = self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": request.prompt_token_ids}, params)
        if isinstance(internal, str) and internal != request_id:  # outputs carry one or the other
            self._aliases[internal] = request_id

    def step(self) -> List[Finished]:
        """One engine step: the requests it finished, as (tag, index, result)."""
        done = []
        for out in self.llm.llm_engine.step():
            if out.finished:
                tag, i = self._pending.pop(self._aliases.pop(out.request_id, out.request_id))
                done.append((tag, i, row_result(out)))
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
