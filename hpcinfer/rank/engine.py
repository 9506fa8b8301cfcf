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
import time
from typing import Any, Dict, List, Optional, Protocol, Tuple, Union, runtime_checkable

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
        t0 = time.monotonic()
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # `import vllm` (a fork of the preloaded process: ~0), a part of the rank's start-up split
        self.import_seconds = time.monotonic() - t0
        self.llm = LLM(**engine_args)
        self._params, self._final_only = SamplingParams, RequestOutputKind.FINAL_ONLY
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._requests = itertools.count()
        self._pending: Dict[str, Tuple[Any, int]] = {}  # request id -> (tag, index)
        self._aliases: Dict[str, str] = {}  # engine-internal id -> our request id
        self.cached_tokens = 0  # prompt tokens of finished requests served by the prefix cache
        self._logprobs: Dict[str, Tuple[Optional[int], Optional[int]]] = {}  # request id -> its k's
        self._refused: List[Finished] = []  # requests vLLM would not take: their rows' errors, at the next step

    @property
    def pending(self) -> int:
        """Requests added and not finished yet."""
        return len(self._pending) + len(self._refused)

    @property
    def max_num_seqs(self) -> int:
        """How many requests the engine runs at once (its batch)."""
        sched = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        return int(getattr(sched, "max_num_seqs", None) or 256)

    def add(self, tag: Any, index: int, request: Request) -> None:
        request_id = f"hpcinfer-{request.row}-{next(self._requests)}"
        try:
            params, lora = self._request_params(request)
            self._pending[request_id] = (tag, index)
            self._logprobs[request_id] = (params.logprobs, params.prompt_logprobs)
            internal = self.llm.llm_engine.add_request(
                request_id, {"prompt_token_ids": request.prompt_token_ids}, params, lora_request=lora
            )
        except _refusals() as e:  # e.g. a row's regex or schema vLLM cannot compile: that row's error
            self._pending.pop(request_id, None)
            self._logprobs.pop(request_id, None)
            why = f"the engine refused the request: {_why(e)}"
            self._refused.append((tag, index, RowResult(None, None, len(request.prompt_token_ids), 0, why)))
            return
        if isinstance(internal, str) and internal != request_id:  # outputs carry one or the other
            self._aliases[internal] = request_id

    def _request_params(self, request: Request) -> Tuple[Any, Any]:
        """(SamplingParams, LoRARequest or None) of `request`; FINAL_ONLY outputs, as
        LLM.generate sets them: no per-step partial outputs to detokenize and copy."""
        if isinstance(request.sampling, dict):
            kw = dict(request.sampling)
            if "structured_outputs" in kw:  # requests.sampling_kwargs: StructuredOutputsParams' arguments
                from vllm.sampling_params import StructuredOutputsParams

                kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
            params = self._params(**kw, output_kind=self._final_only)
        else:  # an OpenAI Batch line's SamplingParams, made by vLLM's protocol classes (batch_request)
            params = request.sampling
            params.output_kind = self._final_only
        lora = None
        if getattr(request, "lora", None) is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(*request.lora)
        return params, lora

    def step(self) -> List[Finished]:
        """One engine step: the requests it finished, as (tag, index, result); requests it
        refused (add) first, with their errors."""
        done, self._refused = self._refused, []
        for out in self.llm.llm_engine.step():
            if out.finished:
                self.cached_tokens += int(getattr(out, "num_cached_tokens", None) or 0)
                rid = self._aliases.pop(out.request_id, out.request_id)
                tag, i = self._pending.pop(rid)
                done.append((tag, i, row_result(out, *self._logprobs.pop(rid, (None, None)))))
        return done

    # ---- rendering (requests.ChatRenderer): vLLM's own code paths, so the prompts are its prompts
    def render_chat(
        self, conversations: List[List[Dict[str, Any]]], chat_template: Optional[str], kwargs: Dict[str, Any]
    ) -> List[Union[List[int], str]]:
        """The prompt token ids of each conversation as `LLM.chat(conversations,
        chat_template=chat_template, chat_template_kwargs=kwargs)` renders them (its own
        `_preprocess_chat`: the chat template, the generation prompt, no special tokens added
        twice), or, for one that cannot be rendered, why."""

        def render(convs):
            preprocess = getattr(self.llm, "_preprocess_chat", None)
            if preprocess is None:  # a vLLM without it (before 0.3x): the tokenizer's template, as it applies it
                return [self._hf_render(c, chat_template, kwargs) for c in convs]
            inputs = preprocess(convs, chat_template=chat_template, chat_template_kwargs=kwargs or None)
            return [list(i["prompt_token_ids"]) for i in inputs]

        try:
            return render(conversations)
        except Exception:  # one of them is bad: render them one by one to find it
            pass
        out: List[Union[List[int], str]] = []
        for conv in conversations:
            try:
                out.extend(render([conv]))
            except Exception as e:
                out.append(self._too_long(e) or f"the messages cannot be rendered with the chat template: {_why(e)}")
        return out

    def _hf_render(self, conv: List[Dict[str, Any]], chat_template: Optional[str], kwargs: Dict[str, Any]) -> List[int]:
        text = self.tokenizer.apply_chat_template(
            conv, chat_template=chat_template, add_generation_prompt=True, tokenize=False, **(kwargs or {})
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def batch_request(
        self, url: str, body: Dict[str, Any], chat_template: Optional[str], kwargs: Dict[str, Any]
    ) -> Tuple[List[int], Any]:
        """An OpenAI Batch line's (prompt token ids, SamplingParams), as vLLM's OpenAI server makes
        them for its body (what `vllm run-batch` runs): its protocol class validates the body,
        renders the chat (`chat_template` as --chat-template, `kwargs` as the default chat template
        kwargs) or tokenizes the prompt, and turns the body's sampling fields into SamplingParams
        over the model's generation-config defaults. ValueError (one line) when it is invalid."""
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        try:
            if url == "/v1/chat/completions":
                from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

                req = ChatCompletionRequest.model_validate(body)
                chat_params = req.build_chat_params(chat_template, "auto").with_defaults(kwargs or None)
                tok_params = req.build_tok_params(self.llm.model_config)
                _, inputs = self.llm.renderer.render_chat([req.messages], chat_params, tok_params)
                cap = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            elif url == "/v1/completions":
                from vllm.entrypoints.openai.completion.protocol import CompletionRequest

                req = CompletionRequest.model_validate(body)
                if not isinstance(req.prompt, str):
                    raise ValueError("body.prompt must be one string (one line, one completion)")
                inputs = self.llm._preprocess_cmpl([req.prompt], {"add_special_tokens": req.add_special_tokens})
                cap = req.max_tokens
            else:
                raise ValueError(f"url {url!r} is not /v1/chat/completions or /v1/completions")
            if getattr(req, "stream", False):
                raise ValueError("stream=true: a batch line is answered whole")
            ids = list(inputs[0]["prompt_token_ids"])
            max_tokens = get_max_tokens(self.max_model_len, cap, len(ids), self._defaults)
            return ids, req.to_sampling_params(max_tokens, self._defaults)
        except Exception as e:  # pydantic's ValidationError, vLLM's VLLMValidationError, ...
            raise ValueError(self._too_long(e) or _why(e)) from None

    def _too_long(self, e: BaseException) -> Optional[str]:
        """vLLM's refusal of a prompt beyond the context, in the words of requests.row_error."""
        if getattr(e, "parameter", None) != "input_tokens":
            return None
        return (
            f"prompt has at least {getattr(e, 'value', '?')} tokens (rendered); "
            f"max_model_len={self.max_model_len} leaves no room for output"
        )

    @property
    def _defaults(self) -> Dict[str, Any]:
        """The model's generation-config sampling defaults, as vLLM's server uses them."""
        if not hasattr(self, "_sampling_defaults"):
            self._sampling_defaults = self.llm.llm_engine.model_config.get_diff_sampling_param()
        return self._sampling_defaults

    def abort(self, tag: Any) -> None:
        """Drop the unfinished requests added under `tag` (their shard went to another rank)."""
        self._refused = [f for f in self._refused if f[0] != tag]
        ids = [rid for rid, (t, _) in self._pending.items() if t == tag]
        for rid in ids:
            del self._pending[rid]
            self._logprobs.pop(rid, None)
        if ids:
            self.llm.llm_engine.abort_request(ids)

    def group_busy(self) -> bool:
        """Lockstep (MoE data-parallel group): whether any rank of the group still has requests.
        An idle rank must keep stepping while it does (vLLM runs dummy batches for it)."""
        return bool(self.llm.llm_engine.has_unfinished_requests())

    def shutdown(self) -> None:
        """Stop engine-core processes so the rank can exit without hanging. An engine in this
        process (one CPU worker: VLLM_ENABLE_V1_MULTIPROCESSING=0) has none: its shutdown only
        frees memory for a next engine in the same process (~0.5-1 s on CPU), and the rank exits."""
        from vllm.v1.engine.core_client import InprocClient

        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown") and not isinstance(core, InprocClient):
            core.shutdown()


def reasoning_split(name: str, tokenizer: Any):
    """vLLM's reasoning parser `name` (ReasoningParserManager) over `tokenizer`, as a function
    text -> (reasoning, answer): the parser's `extract_reasoning`, as vLLM's server splits a
    chat completion's message into `reasoning` and `content`."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.reasoning import ReasoningParserManager

    parser = ReasoningParserManager.get_reasoning_parser(name)(tokenizer)
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": ""}]})

    def split(text: str) -> Tuple[Optional[str], Optional[str]]:
        return parser.extract_reasoning(text, request)

    return split


def _refusals() -> Tuple[type, ...]:
    """The exceptions with which vLLM refuses one request (its fault, not the engine's):
    ValueError, TypeError, and vLLM's VLLMClientError (VLLMValidationError: a regex that does not
    compile), which is no ValueError."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # a vLLM without it
        return (ValueError, TypeError)
    return (ValueError, TypeError, VLLMClientError)


def _why(e: BaseException) -> str:
    """An exception as one line: pydantic's errors as their first problem, others with their type."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            return f"invalid request body: {where}: {first.get('msg')}"[:500]
        except Exception:
            pass
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
