"""Typed records of the run directory: what each JSON file holds, one dataclass per file, with
`to_json` / `from_json`. Every reader and writer goes through these, so a field has one name and
one meaning everywhere:

    plan.json         Plan (with RankPlan, Memory, JobLayout, ExpertLayout)   written by submit
    ranks/<r>.json    RankRecord: one attempt of a rank, its state and counters  written by the rank
    done/<id>.json    DoneRecord: a finished shard                             written by the rank
    finalize.json     FinalizeOutcome                                          written by finalize (Slurm)
    repairs/*.json    Repair: a file found torn or unreadable, and what was done   written by whoever found it
    jobs.json         Submissions: every Slurm submission's job ids            written by submit (Slurm)

A rank's *attempt* (one start of its process) is identified by its token (`RankRecord.token`,
also in `ranks/<r>.owner`, the heartbeat and its claims). Its states: starting -> running ->
done | failed | stopped; `TERMINAL` are the last three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

from hpcinfer.rundir.output import OutputSpec

T = TypeVar("T")

STARTING, RUNNING, DONE, FAILED, STOPPED = "starting", "running", "done", "failed", "stopped"
TERMINAL = (DONE, FAILED, STOPPED)  # an attempt in one of these has ended


def from_dict(cls: Type[T], d: Dict[str, Any]) -> T:
    """`cls` from a JSON object: known fields only (a record written by another version may have more
    or fewer; missing ones take their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class Record:
    """What every record has: `to_json`, and `from_json` through `from_dict` (Plan overrides it for
    its nested records)."""

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls: Type[T], d: Dict[str, Any]) -> T:
        return from_dict(cls, d)


@dataclass(frozen=True)
class JobLayout(Record):
    groups: int  # worker jobs (array elements)
    ranks_per_group: int  # ranks (tasks with work) per job
    nodes_per_job: int
    tasks_per_node: int
    ranks_per_node: int  # what one node can hold (GPUs per node // GPUs per rank; 1 when a rank spans nodes)
    nodes_per_rank: int = 1  # > 1: each rank is a replica spanning this many nodes (one task per node)

    @property
    def tasks_per_job(self) -> int:
        return self.nodes_per_job * self.tasks_per_node

    @property
    def nodes(self) -> int:
        return self.groups * self.nodes_per_job

    def idle_tasks(self, ranks: int) -> int:
        """Tasks that get no rank (a rank count that does not fill the last node evenly)."""
        return self.groups * self.tasks_per_job - ranks * self.nodes_per_rank


@dataclass
class Memory:
    """Per-GPU (CPU: per engine worker, and per node) memory estimate of one rank's model replica."""

    weights_gib: Optional[float]
    kv_gib: Optional[float]  # KV cache room left (or as configured)
    kv_tokens: Optional[int]  # tokens the KV room holds
    budget_gib: Optional[float]  # GPU memory x gpu_memory_utilization
    gpu_memory_gib: Optional[float]

    fits: bool = True  # weights, activations and a non-empty KV cache fit the GPU budget (when known)
    # CPU (no GPU): each engine worker holds its weights and its KV cache (VLLM_CPU_KVCACHE_SPACE) in
    # the node's memory, shared by the workers of all ranks on that node (fits: need <= node memory)
    node_workers: Optional[int] = None  # engine workers on the fullest node
    node_need_gib: Optional[float] = None  # node_workers x (weights_gib + kv_gib)
    node_gib: Optional[float] = None  # the node's memory (None: unknown, not checked)
    node_source: Optional[str] = None  # where node_gib comes from, e.g. "this machine's memory (MemTotal)"


@dataclass(frozen=True)
class ExpertLayout:
    """How a MoE model's experts spread over the GPUs with ep=true (vLLM's FusedMoE): the EP group
    is the dp x tp GPUs of one pipeline stage; each holds the experts of its share of every MoE
    layer, `num_experts + redundant` physical experts dealt out as evenly as possible."""

    ep_size: int  # GPUs in the expert-parallel group: dp x tp
    num_experts: Optional[int]  # routed experts per MoE layer (None: unknown)
    redundant: int  # extra copies kept by EPLB
    per_gpu_min: Optional[int]
    per_gpu_max: Optional[int]
    eplb: bool = False
    placement: str = "linear"
    all2all_backend: str = "allgather_reducescatter"


@dataclass
class RankPlan:
    rank: int
    devices: List[str]  # GPU ids or CPU cores (on Slurm: as numbered on its node)
    shards: List[int]
    rows: int
    job: Optional[int] = None  # Slurm: the rank's group (job or array element)
    node: Optional[int] = None  # Slurm: the rank's node within its job


PROMPT, MESSAGES, OPENAI_BATCH = "prompt", "messages", "openai_batch"  # RequestSpec kinds


@dataclass(frozen=True)
class RequestSpec(Record):
    """How a row becomes its request (plan.json's `request`; rank/requests.py builds them):

    - kind `prompt`: the text of `template` filled from the row's columns (`{column}` fields),
      or without a template the `prompt_column`; with `chat` it is the user message (after the
      `system` message when set) rendered with the chat template, otherwise the raw prompt;
    - kind `messages`: the row's `messages_column`, a conversation, rendered with the chat template;
    - kind `openai_batch`: the row is an OpenAI Batch line (columns custom_id, method, url, body);
      its body is the request (chat messages or a completion prompt, and its sampling).

    `chat_template`: the text of model.chat_template (None: the model's own);
    `chat_template_kwargs`: chat.template_kwargs. Files named in the config are read when the run
    is planned, so every rank renders with the same text."""

    kind: str = PROMPT
    prompt_column: Optional[str] = "prompt"
    messages_column: Optional[str] = None
    template: Optional[str] = None
    chat: bool = False
    system: Optional[str] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    sampling_column: Optional[str] = None  # data.sampling_column: each row's own sampling
    json_schema: Optional[str] = None  # sampling.structured.json_schema's text (a file is read when planned)
    # derived seeds: row i's is sampling.seed + i x seed_stride (the run's largest n: its samples
    # take seed .. seed + n - 1, so no two samples of the run share one)
    seed_stride: int = 1
    lora_column: Optional[str] = None  # data.lora_column: each row's adapter (a name of lora_adapters)
    lora_adapters: Dict[str, str] = field(default_factory=dict)  # lora.adapters, absolute paths

    @property
    def renders_chat(self) -> bool:
        """Whether requests may go through the chat template."""
        return self.kind in (MESSAGES, OPENAI_BATCH) or self.chat

    def template_columns(self) -> List[str]:
        """The columns `template` names, in order of first use (none without a template).
        ValueError for a field that names no column (`{}`, `{0}`) or a malformed template."""
        return template_columns(self.template) if self.template is not None else []


def template_columns(template: str) -> List[str]:
    """The `{column}` fields of a str.format template, in order of first use. Pure."""
    import string

    out: List[str] = []
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(
                f"a positional field {{{name}}}: name a column, e.g. {{text}} (write {{{{ }}}} for braces)"
            )
        if spec and "{" in spec:
            raise ValueError(f"a nested field in {{{name}:{spec}}}")
        if name not in out:
            out.append(name)
    return out


@dataclass
class Plan(Record):
    tp: int
    pp: int
    dp: int
    ep: bool
    ranks: int  # ranks that get work (min(dp, rows))
    device_kind: str  # "cuda" | "cpu"
    gpus_per_rank: int
    nodes: int
    rows: int
    files: int
    shards: int
    memory: Memory
    engine_args: Dict[str, Any]
    model: Dict[str, Any]
    rank_plans: List[RankPlan] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    jobs: Optional[JobLayout] = None  # Slurm: how the ranks are grouped into jobs and nodes
    schedule: str = "static"  # "dynamic": ranks claim shards at run time (rank_plans are expectations)
    tokens: int = 0  # estimated prompt + output tokens of all rows
    nodes_per_rank: int = 1  # > 1: each rank spans this many nodes (processes): a leader + headless ones
    experts: Optional[ExpertLayout] = None  # ep=true: how the experts spread over the GPUs
    submitted_at: Optional[float] = None  # when submit wrote it (the summary's wall_seconds start here)
    request: RequestSpec = field(default_factory=RequestSpec)  # how rows become requests
    input_format: str = "parquet"  # the input's format (other than parquet: converted into inputs/)
    prefix: Optional[Dict[str, Any]] = None  # schedule.prefix: what the plan found (planning/prefix.py Sharing)
    output: OutputSpec = field(default_factory=OutputSpec)  # the generated columns and their shapes

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> Plan:
        plan = from_dict(cls, d)
        plan.request = from_dict(RequestSpec, d.get("request") or {})
        plan.output = from_dict(OutputSpec, d.get("output") or {})
        plan.memory = from_dict(Memory, d["memory"])
        plan.rank_plans = [from_dict(RankPlan, rp) for rp in d.get("rank_plans", [])]
        plan.jobs = from_dict(JobLayout, d["jobs"]) if d.get("jobs") else None
        plan.experts = from_dict(ExpertLayout, d["experts"]) if d.get("experts") else None
        return plan


@dataclass
class RankRecord(Record):
    """`ranks/<r>.json`: the latest attempt of a rank, rewritten as it goes (not fsynced: progress).

    `buffered`: finished rows not yet durable (lost if the rank dies now). `rows_generated`: rows
    this rank's engine finished over all its attempts (the summary's `rows_recomputed` is their
    sum over the ranks less the run's rows). `attempts`: starts of this rank."""

    rank: int
    token: Optional[str] = None  # the attempt: "<host>:<pid>:<start time>"
    host: Optional[str] = None
    pid: Optional[int] = None
    device_kind: Optional[str] = None
    devices: List[str] = field(default_factory=list)
    state: str = STARTING  # starting | running | done | failed | stopped
    rows_total: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens this attempt's engine took from its prefix cache (not prefilled)
    shards_total: int = 0
    shards_done: int = 0
    buffered: int = 0
    attempts: int = 0
    rows_generated: int = 0
    started_at: Optional[float] = None
    engine_seconds: float = 0.0
    # the engine's start-up split (rank/staging.py): stage_seconds and staged_here (model.stage=node),
    # what vLLM logged: weights_seconds, compile_seconds, graph_capture_seconds, init_engine_seconds;
    # and import_seconds, the rank's `import vllm` (~0 in a rank forked from a preloaded process)
    startup: Dict[str, float] = field(default_factory=dict)
    generation_seconds: float = 0.0
    generation_started_at: Optional[float] = None
    generation_ended_at: Optional[float] = None  # its last shard done (output and marker durable)
    last_output_at: Optional[float] = None  # the last finished request received from its engine
    finished_at: Optional[float] = None
    updated_at: Optional[float] = None
    error: Optional[str] = None

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL


@dataclass
class DoneRecord(Record):
    """`done/<id>.json`: a shard whose output is durable; written only after it."""

    shard: int
    rank: int  # the rank that generated it (dynamic schedule: whoever claimed it)
    host: str
    rows: int
    rows_failed: int
    prompt_tokens: int
    output_tokens: int
    generation_seconds: float
    rows_resumed: int = 0  # rows taken from an earlier attempt's parts
    finished_at: Optional[float] = None


@dataclass
class FinalizeOutcome(Record):
    """`finalize.json`: how the last finalize ended (Slurm's finalize job writes it)."""

    job_id: Optional[str]
    exit_code: int
    message: str
    finished_at: Optional[float] = None


@dataclass
class Repair(Record):
    """`repairs/<name>.json`: a run-directory file that was not provably complete (torn, missing,
    unreadable, inconsistent) and what was done about it. Nothing is discarded without one;
    `status` shows them and `summary.json` lists them under `repaired`."""

    what: str  # "shard output", "done marker", "part", "rank record", "claim"
    path: str  # the file, relative to the run directory
    why: str  # what was wrong with it
    action: str  # what was done: where it was moved to, and what happens to its rows
    by: str  # who found it: "submit", "finalize", "rank 1 (host:pid:start)"
    at: Optional[float] = None


@dataclass
class Submission(Record):
    """One Slurm submission in `jobs.json`: its worker jobs (or arrays), the finalize job, and the
    ranks of each job (group)."""

    submitted_at: float
    workers: List[str]
    finalize: str
    rank_groups: List[List[int]]
