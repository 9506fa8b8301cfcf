"""Typed, documented configuration: the schema behind the Hydra tree in `conf/`.

Every field is documented where it is declared. `validate()` is the single place for rules that
involve more than one field; its messages quote the offending values. Derived sizes (GPUs per
rank, total GPUs) are properties, never stored.

The YAML files under `conf/` only choose values; the types and defaults live here, registered in
Hydra's ConfigStore so that `python -m hpcinfer.submit tp=2 dp=8 ep=true` is type-checked.
"""

import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf

from hpcinfer import secrets
from hpcinfer.errors import ConfigError

# Engine arguments that hpcinfer sets from the layout; setting them under `engine` is an error.
LAYOUT_ENGINE_ARGS = {
    "model": "model.path",
    "tensor_parallel_size": "tp",
    "pipeline_parallel_size": "pp",
    "data_parallel_size": "dp",
    "enable_expert_parallel": "ep",
    "enable_eplb": "expert.eplb",
    "eplb_config": "expert.eplb_window_size, expert.eplb_step_interval, expert.redundant_experts",
    "expert_placement_strategy": "expert.placement",
    "all2all_backend": "expert.all2all_backend",
    "enable_lora": "lora.adapters",
    "max_loras": "lora.adapters (lora.max_loras)",
    "max_lora_rank": "lora.adapters (their ranks)",
    # a replica spanning nodes (tp x pp > cluster.gpus_per_node): set per process (see replica.py)
    "nnodes": "tp x pp and cluster.gpus_per_node",
    "node_rank": "tp x pp and cluster.gpus_per_node",
    "master_addr": "tp x pp and cluster.gpus_per_node",
    "master_port": "tp x pp and cluster.gpus_per_node",
}

# Expert-parallel values vLLM accepts (vllm/config/parallel.py of 0.32; 0.26 has all but "moonep").
# "passthrough" is bound by vLLM itself, not selectable.
EXPERT_PLACEMENTS = ("linear", "round_robin")
ALL2ALL_BACKENDS = (
    "allgather_reducescatter",
    "deepep_high_throughput",
    "deepep_low_latency",
    "deepep_v2",
    "mori_high_throughput",
    "mori_low_latency",
    "moonep",
    "nixl_ep",
    "flashinfer_all2allv",
    "flashinfer_nvlink_two_sided",
    "flashinfer_nvlink_one_sided",
)
REMOVED_ALL2ALL_BACKENDS = ("naive", "pplx")  # vLLM warns and uses allgather_reducescatter instead
MAX_REDUNDANT_EXPERTS = 1023  # vLLM's MAX_EXPERT_REDUNDANCY (distributed/eplb/eplb_state.py)

BUILTIN_MODELS = ("tiny-llama", "tiny-mixtral")
INPUT_FORMATS = ("auto", "parquet", "jsonl", "csv", "openai_batch")


@dataclass
class ModelConfig:
    """The model to serve, and what is known of its shape (for the plan and validation).

    Shape fields left null are read from the model's `config.json` when the path is a local
    directory; they matter only for planning (memory per GPU) and for checking `tp`.

    A model is either built in (`builtin`, the groups tiny and tiny_moe) or at `path`, never both:
    `model.path=...` on a built-in group is refused (exit 2), since that group's shape fields and
    engine defaults describe the built-in model; use a group of your model (`model=llama
    model.path=...`) instead. A group's shape fields and name describe the group's own model: with
    `model.path` set on the command line they are dropped (see `own_model_shape`), so the shape is
    read from that path's config.json, unless they are set on the command line too.
    """

    name: str = MISSING  # short name used in reports
    # local directory or hub id (what vllm.LLM(model=...) gets); must be null with `builtin`
    path: Optional[str] = None
    # "tiny-llama" | "tiny-mixtral": generated offline on first use; then `path` must be null
    builtin: Optional[str] = None
    moe: bool = False  # a mixture-of-experts model (only these may use ep=true)
    num_params_b: Optional[float] = None  # parameters in billions (else computed from the shape)
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    vocab_size: Optional[int] = None
    num_experts: Optional[int] = None  # MoE: experts per layer
    experts_per_token: Optional[int] = None  # MoE: top-k
    engine: Dict[str, Any] = field(default_factory=dict)  # engine-arg defaults for this model
    # a Jinja chat template file replacing the model's (vLLM's --chat-template); read at submit,
    # its text is what the ranks use (plan.json). null: the model's own (tokenizer_config.json)
    chat_template: Optional[str] = None
    # "none": every rank loads from the model's path; "node": the first rank of each node copies the
    # model directory to node-local scratch (cluster.local_scratch) under a lock, and the node's
    # ranks load from there (a local directory only: a hub id is loaded as it is)
    stage: str = "none"
    # vLLM's cache (torch.compile artifacts, VLLM_CACHE_ROOT) unless the environment sets it: "node"
    # = node-local scratch, private to the run; "shared" = <cache_dir>/vllm, where the first rank
    # compiles under a lock and the others reuse what it wrote
    compile_cache: str = "node"


@dataclass
class StructuredConfig:
    """Structured output (vLLM's structured outputs, `StructuredOutputsParams`): at most one of
    these constrains what every row (or, in `data.sampling_column`, one row) generates."""

    json_schema: Optional[str] = None  # a JSON schema: inline JSON text ('{...}') or a file holding it
    regex: Optional[str] = None  # a regular expression the output matches
    choice: Optional[List[str]] = None  # the output is exactly one of these strings
    grammar: Optional[str] = None  # an EBNF (GBNF) grammar, as vLLM's structured outputs take it


STRUCTURED_KINDS = ("json_schema", "regex", "choice", "grammar")


@dataclass
class SamplingConfig:
    """vLLM SamplingParams for every row. With `seed` set, row i uses seed + i, so sampled
    outputs do not depend on the layout (dp, shard sizes) that produced them; in a run where
    some row may have n > 1 (`n`, or a row's own), row i's seed is seed + i x N (N: the run's
    largest n) and its sample j uses that + j (vLLM's own per-sample seeds), so no two samples
    of a run share a seed. `data.sampling_column` overrides any of these per row."""

    max_tokens: int = 64  # output tokens per row, at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # in [0, 1]
    repetition_penalty: float = 1.0  # > 0
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    stop: List[str] = field(default_factory=list)  # stop strings
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    seed: Optional[int] = 0  # base of the per-row seeds; null = unseeded
    n: int = 1  # samples per row: > 1 makes generated_text, finish_reason, output_tokens lists
    logprobs: Optional[int] = None  # k: each generated token's logprob and its top-k alternatives
    prompt_logprobs: Optional[int] = None  # k: each prompt token's logprob (scoring) and its top k
    structured: StructuredConfig = field(default_factory=StructuredConfig)  # constrained output


@dataclass
class DataConfig:
    """Where the prompts come from and how the work is cut into shards."""

    input: Optional[str] = None  # Parquet file, directory or glob; null = built-in demo prompts
    prompt_column: str = "prompt"  # string column holding the prompt text
    id_column: Optional[str] = None  # optional column whose values must be unique
    shard_rows: int = 1024  # at most this many rows per shard (the unit of durable output)
    max_tokens_column: Optional[str] = (
        None  # optional integer column: this row's output cap (null: sampling.max_tokens)
    )
    demo_rows: int = 300  # rows of the built-in demo set; only with data.input=null (else refused)
    # input format: auto (by extension; a .jsonl whose lines have custom_id and body is
    # openai_batch) | parquet | jsonl | csv | openai_batch. Other formats are converted to Parquet
    # in the run directory (inputs/) when the run is planned.
    format: str = "auto"
    # a column of chat conversations (lists of {role, content}: Parquet list of structs, a JSON
    # array in JSON Lines, or JSON text): rendered with the model's chat template, as LLM.chat does
    messages_column: Optional[str] = None
    # a demo of conversations instead of prompts (data=demo_chat); only with data.input=null
    demo_chat: bool = False
    # a column of per-row sampling: a struct, or JSON object text, whose non-null fields (any
    # sampling.* field, including n, logprobs, seed, structured) override sampling.* for that
    # row; an invalid value is that row's error. Its max_tokens wins over data.max_tokens_column.
    sampling_column: Optional[str] = None
    # a string column: each row's LoRA adapter, a name of lora.adapters (null: the base model);
    # a name that is not one is refused when the run is planned (exit 2)
    lora_column: Optional[str] = None


@dataclass
class LoraConfig:
    """LoRA adapters of the model, each row with its own (`data.lora_column`: an adapter's name,
    null = the base model). The engine is built with LoRA enabled, `max_loras` adapters in one
    batch and `max_lora_rank` the largest rank of the adapters (their adapter_config.json)."""

    # adapter name -> a local directory of a PEFT LoRA adapter (adapter_config.json and weights)
    adapters: Dict[str, str] = field(default_factory=dict)
    max_loras: Optional[int] = None  # adapters one batch may mix; null: all of them, at most 8


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's allowed max_lora_rank values
PROMPT_LOGPROBS_WITH_LORA = (
    "prompt logprobs with LoRA enabled fail in vLLM 0.32 (the LoRA logits processor's token mapping does not "
    "fit the prompt's tokens: vllm-project/vllm#29955, #16668)"
)


@dataclass
class OutputConfig:
    """How the generated columns are laid out in results.parquet."""

    # n > 1: one output row per sample (with `sample_index`, in input order, then sample order)
    # instead of one row per input row with list columns
    explode_samples: bool = False
    # one of vLLM's reasoning parsers (e.g. qwen3, deepseek_r1): each completion's reasoning goes
    # to a `reasoning_text` column and generated_text holds the answer only; null: no split
    reasoning_parser: Optional[str] = None


@dataclass
class PromptConfig:
    """A prompt built from the row's columns: `template` (or the text of `template_file`) with
    `{column}` fields filled from the row, e.g. 'Summarize:\n{text}' (on the command line:
    prompt.template='"Summarize: {text}"', the inner quotes keep Hydra from reading the braces).
    With `chat`, the filled template (or the prompt column) is the user message of a chat, after
    `system` when set, rendered with the model's chat template; otherwise it is the raw prompt."""

    template: Optional[str] = None  # '{col}' fields; '{{' and '}}' are literal braces
    template_file: Optional[str] = None  # a file holding the template (instead of `template`)
    chat: bool = False  # the prompt is a user message rendered with the chat template
    system: Optional[str] = None  # with chat: the system message before it


@dataclass
class ChatConfig:
    """Options of chat rendering (data.messages_column, prompt.chat, OpenAI Batch chat lines)."""

    # keyword arguments of the chat template, e.g. {enable_thinking: false} (vLLM's chat_template_kwargs)
    template_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """How often a rank makes its finished rows durable inside a shard: a killed rank loses at
    most this much work. Not part of the results: may change when a run is resumed."""

    rows: int = 256  # write a part after this many finished rows ...
    seconds: float = 60.0  # ... or after this many seconds, whichever comes first


@dataclass
class ScheduleConfig:
    """Which rank generates which shard.

    dynamic: shards are cut by estimated tokens (prompt bytes / 4 + the row's max_tokens), and
    ranks claim them from the run directory, longest requests first, as they have room; a claim is a lease
    that another rank takes over when its holder is gone (failed, stopped, or silent for
    `lease_s`). static: each rank generates its own contiguous share of the rows (what vLLM's
    data_parallel.py does); MoE ranks in lockstep (ep=true) always use it."""

    mode: str = "dynamic"  # "dynamic" | "static"
    # dynamic only (another value with a static schedule is refused, as it would be ignored):
    shards_per_rank: int = 8  # dynamic: cut about this many shards per rank (more = a shorter tail)
    lease_s: float = 120.0  # dynamic: a claim whose holder shows no heartbeat this long is taken over
    # prefix placement (planning/prefix.py): rows whose prompts start alike run on one rank, one
    # after another, so vLLM's prefix cache serves the shared start; results stay in input order.
    # auto: on when the plan expects it to save >= 10% of the prompt tokens' prefill over input order
    prefix: str = "auto"  # "auto" | "on" | "off"


@dataclass
class ExpertConfig:
    """Expert-parallel options (ep=true, MoE models only), given to vLLM under its own engine
    argument names (in brackets); null = vLLM's default. EPLB (expert-parallel load balancing)
    moves experts between GPUs as their load shifts and can keep extra copies of busy experts;
    vLLM runs it on CUDA/ROCm GPUs only, with more than one expert-parallel GPU (dp x tp > 1)."""

    placement: Optional[str] = None  # [expert_placement_strategy] "linear" | "round_robin" (vLLM: linear)
    all2all_backend: Optional[str] = None  # [all2all_backend] e.g. "deepep_low_latency" (vLLM: allgather_reducescatter)
    eplb: bool = False  # [enable_eplb] expert-parallel load balancing
    eplb_window_size: Optional[int] = None  # [eplb_config.window_size] steps of expert load recorded (vLLM: 1000)
    eplb_step_interval: Optional[int] = None  # [eplb_config.step_interval] steps between rebalancings (vLLM: 3000)
    redundant_experts: int = 0  # [eplb_config.num_redundant_experts] extra expert copies (needs eplb)


@dataclass
class LocalClusterConfig:
    """Run every rank as a process on this machine."""

    name: str = "local"
    # GPUs offered to the run (at most the visible ones: more is refused); null = all visible (0 on a CPU box)
    gpus: Optional[int] = None
    # CPU only: VLLM_CPU_KVCACHE_SPACE (GiB) per engine worker, unless set in the environment; it
    # counts in the plan's memory check against this machine's memory (MemTotal)
    cpu_kvcache_gib: int = 1
    gpu_memory_gib: Optional[float] = None  # per GPU, for the plan; null = ask nvidia-smi (CPU: a plan note)
    # GPUs of one "node" (CPU: engine workers): a replica with tp x pp above it runs as
    # tp x pp / gpus_per_node processes (vLLM nnodes, leader + headless). null = all are one node.
    gpus_per_node: Optional[int] = None
    # node-local scratch (model.stage=node, the vLLM cache); null = $TMPDIR, else /tmp. "{node}" is
    # replaced by the node's name (SLURMD_NODENAME, else the host name)
    local_scratch: Optional[str] = None

    def node_size(self) -> Tuple[Optional[int], str]:
        """(GPUs of one "node" that a rank's tp x pp may fill, the key that sets it); None: no limit."""
        return self.gpus_per_node or None, "cluster.gpus_per_node"

    def errors(self, cfg: "RunConfig") -> List[str]:
        """This cluster's rules for `cfg` (the rest of `validate`)."""
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            return [f"cluster.gpus_per_node must be >= 1 or null (all GPUs one node), got {self.gpus_per_node!r}"]
        return _spanning_errors(cfg)


@dataclass
class SlurmClusterConfig:
    """Submit the ranks as Slurm jobs (through submitit) from a login node, and finalize as a
    dependent job. Ranks of one job are its tasks: rank = group x ranks_per_group + SLURM_PROCID."""

    name: str = "slurm"
    partition: Optional[str] = None  # null = the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"  # time limit of each worker job: minutes, HH:MM:SS or D-HH:MM:SS
    nodes: Optional[int] = None  # nodes per job; null = derived from the layout
    gpus_per_node: int = 8  # GPUs of one node; 0 = CPU-only nodes (vLLM's CPU build)
    # CPU nodes only: engine workers one node runs; tp x pp above it spans nodes (null: never)
    workers_per_node: Optional[int] = None
    ranks_per_node: Optional[int] = None  # null = gpus_per_node // (tp x pp); CPU nodes: 1
    cpus_per_task: Optional[int] = None  # CPU cores per rank; null = the cluster's default
    # memory per node, e.g. "200G" (checked against the partition's RealMemory, and on CPU nodes
    # against the ranks' weights + KV cache); null = the cluster's default
    mem: Optional[str] = None
    constraint: Optional[str] = None  # e.g. "h100"
    exclusive: bool = False  # whole nodes only
    sbatch: Dict[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {mail-type: END}
    setup: List[str] = field(default_factory=list)  # shell lines run before the ranks (module load ...)
    array: int = 1  # independent replica groups; >1 submits a job array with one element per group
    max_nodes_per_job: Optional[int] = None  # a layout needing more nodes becomes an array of groups
    array_parallelism: Optional[int] = None  # the '%' throttle: array elements running at once
    max_array_size: int = 1001  # the cluster's MaxArraySize (scontrol show config)
    job_name: str = "hpcinfer"
    python: Optional[str] = None  # interpreter on the compute nodes; null = the submitting one
    signal_delay_s: int = 120  # USR2 this long before the time limit (checkpoint, requeue)
    finalize_time: str = "01:00:00"  # time limit of the finalize job
    finalize_cpus: int = 1
    finalize_mem: Optional[str] = None
    cpu_kvcache_gib: int = 1  # CPU nodes only (else refused): VLLM_CPU_KVCACHE_SPACE (GiB) per engine worker
    gpu_memory_gib: Optional[float] = None  # GPU nodes only (else refused): per GPU, for the plan; null = unknown
    poll_s: float = 5.0  # wait=true: seconds between looks at the run
    # node-local scratch (model.stage=node, the vLLM cache); null = $TMPDIR, else /tmp. "{node}" is
    # replaced by the node's name (SLURMD_NODENAME): nodes sharing one /tmp stage once each
    local_scratch: Optional[str] = None

    def node_size(self) -> Tuple[Optional[int], str]:
        """(what one node holds of a rank's tp x pp, the key that sets it): GPUs, or on CPU nodes
        engine workers; None = no limit (ranks never span nodes)."""
        if not self.gpus_per_node:
            return self.workers_per_node, "cluster.workers_per_node"
        return self.gpus_per_node, "cluster.gpus_per_node"

    def errors(self, cfg: "RunConfig") -> List[str]:
        """This cluster's rules for `cfg` (the rest of `validate`)."""
        return _slurm_errors(cfg, self)


CLUSTERS = {"local": LocalClusterConfig, "slurm": SlurmClusterConfig}


@dataclass
class RunConfig:
    """One batch-inference run: model, sampling, data, layout and cluster."""

    model: ModelConfig = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)  # prompt templates, prompts as chat
    chat: ChatConfig = field(default_factory=ChatConfig)  # chat template options
    output: OutputConfig = field(default_factory=OutputConfig)  # the layout of the generated columns
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters, chosen per row by data.lora_column
    cluster: Any = MISSING  # LocalClusterConfig | SlurmClusterConfig, chosen by `cluster=<name>`
    tp: int = 1  # tensor parallel: GPUs that split each layer
    pp: int = 1  # pipeline parallel: GPUs that split the layers
    dp: int = 1  # data parallel: independent ranks (engines), each on tp*pp GPUs
    ep: bool = False  # expert parallel (MoE models only)
    expert: ExpertConfig = field(default_factory=ExpertConfig)  # ep=true options (EPLB, placement, all2all)
    engine: Dict[str, Any] = field(default_factory=dict)  # passed through to vllm.LLM (nulls dropped)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    rank_retries: int = 1  # times a failed rank process is restarted (in place) before it counts as failed
    run_dir: Optional[str] = None  # null = outputs/<date>/<time>
    cache_dir: Optional[str] = None  # built-in models and demo data; null = $HPCINFER_CACHE or ~/.cache/hpcinfer
    wait: bool = False  # Slurm: block until finalize ends and exit with its status

    @property
    def gpus_per_rank(self) -> int:
        return self.tp * self.pp

    @property
    def world_gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def nodes_per_rank(self) -> int:
        """Nodes one rank spans: tp x pp / the node size when it exceeds a node, else 1 (a replica
        spanning nodes, see launch/env.py). ValueError when tp x pp is neither within a node nor
        a whole number of nodes."""
        size, key = self.cluster.node_size()
        return nodes_per_rank(self.gpus_per_rank, size, key)

    @property
    def lockstep(self) -> bool:
        """MoE with expert parallelism: the DP ranks form one vLLM data-parallel group that steps
        together (VLLM_DP_* variables, static work per rank)."""
        return self.ep and self.model.moe

    @property
    def dynamic(self) -> bool:
        """Ranks claim shards from the run directory (see ScheduleConfig)."""
        return self.schedule.mode == "dynamic" and not self.lockstep

    @property
    def cache_path(self) -> str:
        return (
            self.cache_dir
            or os.environ.get("HPCINFER_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "hpcinfer")
        )


def register_configs() -> None:
    """Register the schemas so `conf/` YAML files are validated against them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="sampling", name="sampling_schema", node=SamplingConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="cluster", name="local_schema", node=LocalClusterConfig)
    cs.store(group="cluster", name="slurm_schema", node=SlurmClusterConfig)


# The fields of a model group that describe its own model (not how to run it).
SHAPE_FIELDS = (
    "num_params_b",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "num_experts",
    "experts_per_token",
)


def own_model_shape(cfg: DictConfig, overrides: List[str]) -> DictConfig:
    """`model=llama model.path=/models/other`: the group's shape fields (and name) describe the
    group's model, not the one at the path, so they are cleared (planning then reads the shape
    from the path's config.json, or leaves it unknown) — except those set on the command line
    as well. Without `model.path` among the overrides: `cfg` unchanged. Pure."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    model = cfg.get("model")
    if "model.path" not in keys or model is None or model.get("builtin") is not None:
        return cfg
    cfg = cfg.copy()
    for f in SHAPE_FIELDS:
        if f"model.{f}" not in keys and f in cfg.model:
            cfg.model[f] = None
    if "model.name" not in keys and cfg.model.get("path"):
        cfg.model.name = os.path.basename(str(cfg.model.path).rstrip("/")) or str(cfg.model.path)
    return cfg


def to_run_config(cfg: DictConfig) -> RunConfig:
    """A composed (or saved) DictConfig as typed dataclasses, `hydra` keys dropped."""
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), _without_hydra(cfg))
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig)
    if isinstance(obj.cluster, (dict, DictConfig)):
        obj.cluster = _cluster(dict(obj.cluster))
    return obj


def _cluster(d: Dict[str, Any]):
    """The typed cluster section (a saved config.yaml holds it untyped)."""
    kind = CLUSTERS.get(d.get("name", "local"))
    if kind is None:
        raise ConfigError(f"cluster.name={d.get('name')!r} is not one of {sorted(CLUSTERS)}")
    merged = OmegaConf.merge(OmegaConf.structured(kind), d)
    return OmegaConf.to_object(merged)


def _without_hydra(cfg: DictConfig) -> DictConfig:
    d = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    d.pop("hydra", None)
    return OmegaConf.create(d)


def to_yaml(cfg: RunConfig, env: Optional[Mapping[str, str]] = None) -> str:
    """The config as saved in a run directory (config.yaml), secrets kept out: a secret value held
    by an environment variable is saved as `${oc.env:NAME,***}` (resolved again by
    `load_run_config` wherever the run reads it), any other secret-named value as `***` with a
    warning (validate() refuses those, so a submitted run never has one). See hpcinfer/secrets.py."""
    env = os.environ if env is None else env
    saved, lost = secrets.env_references(OmegaConf.to_container(OmegaConf.structured(cfg)), env)
    for key in lost:
        print(
            f"hpcinfer: warning: {key} looks like a secret and no environment variable holds it: "
            f"saved as {secrets.MASK!r}, so it cannot be reproduced from config.yaml",
            file=sys.stderr,
        )
    return secrets.redact(OmegaConf.to_yaml(OmegaConf.create(saved)), env)


def engine_args(
    cfg: RunConfig, model_path: str, device_kind: Optional[str] = None, input_format: Optional[str] = None
) -> Dict[str, Any]:
    """Exactly the keyword arguments given to `vllm.LLM`: the model's engine defaults, then the
    non-null `engine` overrides, then the layout. Pure but for reading the LoRA adapters'
    adapter_config.json (`lora_engine_args`: their ranks), when lora.adapters is set.

    `device_kind` and `input_format` are the plan's (unknown: None). On CPU, a run whose rows may
    be sampled with a seed gets `enable_chunked_prefill=False` unless `engine` sets it: vLLM 0.32
    rewinds a seeded request's generator after a chunk of its prefill (`set_offset`), which CPU
    generators cannot do (`RuntimeError: CPU Generator does not use offset`, the whole rank
    fails); unchunked, a row's sample does not depend on how its prompt was split into steps
    either, so it stays independent of the layout, as the per-row seed promises."""
    args: Dict[str, Any] = {"model": model_path}
    if device_kind == "cpu" and seeded_sampling(cfg, input_format):
        args["enable_chunked_prefill"] = False
    if cfg.schedule.prefix != "off":  # placement is for the prefix cache: keep it on (vLLM's default too)
        args["enable_prefix_caching"] = True
    for source in (cfg.model.engine, cfg.engine):  # null means "not set": keeps the model default
        args.update({k: v for k, v in source.items() if v is not None})
    args.update(lora_engine_args(cfg.lora, device_kind))
    args["tensor_parallel_size"] = cfg.tp
    args["pipeline_parallel_size"] = cfg.pp
    if cfg.ep:
        args["enable_expert_parallel"] = True
        args.update(expert_engine_args(cfg.expert))
    return args


def adapter_rank(path: str) -> int:
    """A PEFT LoRA adapter's largest rank (`r` and its `rank_pattern`, adapter_config.json);
    ValueError (one line) when it cannot be read."""
    import json

    p = os.path.join(os.path.expanduser(path), "adapter_config.json")
    try:
        with open(p, encoding="utf-8") as f:
            conf = json.load(f)
        ranks = [conf["r"], *(conf.get("rank_pattern") or {}).values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
            raise ValueError(f"its ranks {ranks} are not integers >= 1")
        return max(ranks)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p} is not a LoRA adapter's config: {getattr(e, 'strerror', None) or e}") from None


def lora_engine_args(lora: LoraConfig, device_kind: Optional[str] = None) -> Dict[str, Any]:
    """vLLM's LoRA engine arguments for `lora.adapters` (none without adapters): enable_lora,
    max_loras (lora.max_loras, else every adapter up to 8) and max_lora_rank (the adapters'
    largest rank, rounded up to a value vLLM accepts). Reads each adapter_config.json.

    On CPU (`device_kind` "cpu") max_loras is every adapter plus one slot that stays empty:
    vLLM 0.32's CPU LoRA ops (lora/ops/torch_ops, bgmv_*) index the stacked adapter weights with
    a token's slot, and a token without an adapter has slot -1, which Python indexing reads as
    the last slot: with an adapter there, every row of the batch without one would get it (the
    GPU kernels skip -1). With one slot more than there are adapters, the last is never filled."""
    if not lora.adapters:
        return {}
    ranks = []
    for path in lora.adapters.values():
        try:
            ranks.append(adapter_rank(path))
        except ValueError:
            ranks.append(LORA_RANKS[1])  # validate() refuses it; the plan still shows arguments
    rank = max(ranks)
    loras = lora.max_loras or min(len(lora.adapters), 8)
    if device_kind == "cpu":
        loras = max(loras, len(lora.adapters)) + 1
    return {
        "enable_lora": True,
        "max_loras": loras,
        "max_lora_rank": next((r for r in LORA_RANKS if r >= rank), rank),
    }


def _lora_errors(cfg: RunConfig) -> List[str]:
    lora, col, errs = cfg.lora, cfg.data.lora_column, []
    if col is not None and not lora.adapters:
        errs.append(f"data.lora_column={col!r} names each row's adapter, and lora.adapters is empty")
    if lora.adapters and col is None:
        errs.append("lora.adapters is set, and no data.lora_column says which rows use which adapter")
    if lora.adapters and cfg.sampling.prompt_logprobs is not None:
        errs.append(f"sampling.prompt_logprobs with lora.adapters: {PROMPT_LOGPROBS_WITH_LORA}; score without adapters")
    if lora.max_loras is not None and lora.max_loras < 1:
        errs.append(f"lora.max_loras must be >= 1 or null, got {lora.max_loras!r}")
    for name, path in lora.adapters.items():
        if not name or not isinstance(path, str) or not path:
            errs.append(f"lora.adapters: {name!r}: {path!r} is not a name and a directory")
            continue
        try:
            rank = adapter_rank(path)
        except ValueError as e:
            errs.append(f"lora.adapters.{name}: {e}")
            continue
        if rank > LORA_RANKS[-1]:
            errs.append(f"lora.adapters.{name}: rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
    return errs


def seeded_sampling(cfg: RunConfig, input_format: Optional[str] = None) -> bool:
    """Whether some row of the run may be sampled (temperature > 0) with a seed: sampling.seed is
    set and either sampling.temperature > 0 or the rows bring their own sampling (an OpenAI Batch
    line's body; a sampled line without a seed gets seed + row), or `data.sampling_column` is set
    (a row's own sampling may carry its own seed)."""
    s = cfg.sampling
    if cfg.data.sampling_column is not None and input_format != "openai_batch":
        return True
    return s.seed is not None and (s.temperature != 0 or input_format == "openai_batch")


def expert_engine_args(e: ExpertConfig) -> Dict[str, Any]:
    """vLLM's engine arguments for the expert options that are set; the EPLB ones only with eplb."""
    args: Dict[str, Any] = {}
    if e.placement is not None:
        args["expert_placement_strategy"] = e.placement
    if e.all2all_backend is not None:
        args["all2all_backend"] = e.all2all_backend
    if e.eplb:
        args["enable_eplb"] = True
        eplb = {
            "window_size": e.eplb_window_size,
            "step_interval": e.eplb_step_interval,
            "num_redundant_experts": e.redundant_experts or None,
        }
        if any(v is not None for v in eplb.values()):
            args["eplb_config"] = {k: v for k, v in eplb.items() if v is not None}
    return args


def validate(cfg: RunConfig, gpus_available: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> None:
    """Cross-field rules. Raises ConfigError naming the offending values.

    `gpus_available` is what the cluster offers (None: unknown, skip the GPU count check;
    0: a CPU-only machine, where ranks run on CPU cores). `env` (default: os.environ) is where
    secret-named values must come from (see `_secret_errors`).
    """
    errors = _layout_errors(cfg, gpus_available) + _model_errors(cfg) + _sampling_errors(cfg.sampling)
    errors += (
        _data_errors(cfg.data)
        + _request_errors(cfg)
        + _engine_errors(cfg)
        + _secret_errors(cfg, os.environ if env is None else env)
    )
    errors += _expert_errors(cfg) + _unused_value_errors(cfg) + _lora_errors(cfg)
    if cfg.checkpoint.rows < 1 or cfg.checkpoint.seconds <= 0:
        errors.append(
            f"checkpoint.rows must be >= 1 and checkpoint.seconds > 0, got rows={cfg.checkpoint.rows!r} "
            f"seconds={cfg.checkpoint.seconds!r}"
        )
    sch = cfg.schedule
    if sch.mode not in ("dynamic", "static"):
        errors.append(f"schedule.mode must be 'dynamic' or 'static', got {sch.mode!r}")
    if sch.prefix not in ("auto", "on", "off"):
        errors.append(f"schedule.prefix must be 'auto', 'on' or 'off', got {sch.prefix!r}")
    if sch.shards_per_rank < 1 or sch.lease_s <= 0:
        errors.append(
            f"schedule.shards_per_rank must be >= 1 and schedule.lease_s > 0, got "
            f"shards_per_rank={sch.shards_per_rank!r} lease_s={sch.lease_s!r}"
        )
    if cfg.rank_retries < 0:
        errors.append(f"rank_retries must be >= 0, got {cfg.rank_retries!r}")
    errors += cfg.cluster.errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def _layout_errors(cfg: RunConfig, gpus_available: Optional[int]) -> List[str]:
    errs = [
        f"{k} must be an integer >= 1, got {k}={getattr(cfg, k)!r}"
        for k in ("tp", "pp", "dp")
        if not isinstance(getattr(cfg, k), int) or getattr(cfg, k) < 1
    ]
    if errs:
        return errs
    heads = cfg.model.num_attention_heads
    if heads and heads % cfg.tp:
        errs.append(f"tp={cfg.tp} must divide the model's attention heads (model {cfg.model.name!r} has {heads})")
    layers = cfg.model.num_layers
    if layers and cfg.pp > layers:
        errs.append(f"pp={cfg.pp} exceeds the model's {layers} layers")
    if cfg.ep and not cfg.model.moe:
        errs.append(
            f"ep=true needs a mixture-of-experts model; model {cfg.model.name!r} is dense "
            f"(set model.moe=true if it is MoE)"
        )
    if gpus_available and cfg.world_gpus > gpus_available:
        errs.append(
            f"dp={cfg.dp} x tp={cfg.tp} x pp={cfg.pp} needs {cfg.world_gpus} GPUs, "
            f"but the cluster offers {gpus_available}"
        )
    return errs


def _expert_errors(cfg: RunConfig) -> List[str]:
    """The expert options as vLLM validates them (ParallelConfig, EPLBConfig), checked up front."""
    e, errs = cfg.expert, []
    if e.placement is not None and e.placement not in EXPERT_PLACEMENTS:
        errs.append(f"expert.placement={e.placement!r} is not one of {list(EXPERT_PLACEMENTS)}")
    if e.all2all_backend in REMOVED_ALL2ALL_BACKENDS:
        errs.append(
            f"expert.all2all_backend={e.all2all_backend!r} was removed from vLLM (it would run "
            f"'allgather_reducescatter'); use one of {list(ALL2ALL_BACKENDS)}"
        )
    elif e.all2all_backend is not None and e.all2all_backend not in ALL2ALL_BACKENDS:
        errs.append(f"expert.all2all_backend={e.all2all_backend!r} is not one of {list(ALL2ALL_BACKENDS)}")
    if not 0 <= e.redundant_experts <= MAX_REDUNDANT_EXPERTS:
        errs.append(f"expert.redundant_experts must be in [0, {MAX_REDUNDANT_EXPERTS}], got {e.redundant_experts!r}")
    for key in ("eplb_window_size", "eplb_step_interval"):
        if getattr(e, key) is not None and getattr(e, key) < 1:
            errs.append(f"expert.{key} must be >= 1 or null, got {getattr(e, key)!r}")
    if e.eplb and not cfg.ep:
        errs.append("expert.eplb=true needs ep=true (EPLB balances experts across the expert-parallel GPUs)")
    elif e.eplb and cfg.dp * cfg.tp < 2:
        errs.append(
            f"expert.eplb=true needs more than one expert-parallel GPU (dp x tp > 1), got dp={cfg.dp} tp={cfg.tp}"
        )
    if e.redundant_experts > 0 and not e.eplb:
        errs.append(
            f"expert.redundant_experts={e.redundant_experts} needs expert.eplb=true "
            "(vLLM keeps redundant experts only with EPLB)"
        )
    if not e.eplb:
        errs += [
            f"expert.{k}={getattr(e, k)!r} applies only with expert.eplb=true"
            for k in ("eplb_window_size", "eplb_step_interval")
            if getattr(e, k) is not None
        ]
    if not cfg.ep:
        errs += [
            f"expert.{k}={getattr(e, k)!r} applies only with ep=true"
            for k in ("placement", "all2all_backend")
            if getattr(e, k) is not None
        ]
    return errs


def nodes_per_rank(gpus_per_rank: int, node_size: Optional[int], what: str = "cluster.gpus_per_node") -> int:
    """Nodes one rank (a replica of the model over `gpus_per_rank` GPUs; CPU: engine workers) spans:
    1 when it fits a node (or the node size is unknown: None or 0), else gpus_per_rank / node_size.
    ValueError, naming the node size as `what`, when it is neither at most a node nor a whole number
    of nodes (vLLM needs nnodes to divide the replica's world size, and a replica sharing a node with
    another could not place its devices). Pure."""
    if not node_size or gpus_per_rank <= node_size:
        return 1
    if gpus_per_rank % node_size:
        raise ValueError(
            f"{gpus_per_rank} GPUs per rank is neither at most {what}={node_size} "
            f"nor a multiple of it (a replica larger than a node spans whole nodes)"
        )
    return gpus_per_rank // node_size


def _spanning_errors(cfg: RunConfig) -> List[str]:
    """A replica larger than a node (tp x pp > its GPUs) spans whole nodes: what rules out one."""
    size, key = cfg.cluster.node_size()
    try:
        nodes = cfg.nodes_per_rank
    except ValueError as e:
        return [f"tp={cfg.tp} x pp={cfg.pp}: {e}"]
    if nodes == 1:
        return []
    errs = []
    spans = f"tp={cfg.tp} x pp={cfg.pp} = {cfg.gpus_per_rank} per rank over {nodes} nodes of {key}={size}"
    if cfg.lockstep:
        errs.append(
            f"ep=true runs the ranks as one vLLM data-parallel group, which hpcinfer does not combine "
            f"with replicas spanning nodes ({spans}); keep tp x pp within a node"
        )
    ranks_per_node = getattr(cfg.cluster, "ranks_per_node", None)
    if ranks_per_node is not None and ranks_per_node != 1:  # 1 (slurm_cpu's): holds for a rank spanning nodes
        errs.append(f"cluster.ranks_per_node={ranks_per_node} cannot be set when a rank spans nodes ({spans})")
    return errs


def _model_errors(cfg: RunConfig) -> List[str]:
    m = cfg.model
    if m.stage not in ("none", "node") or m.compile_cache not in ("node", "shared"):
        return [
            f"model.stage must be 'none' or 'node' and model.compile_cache 'node' or 'shared', got "
            f"stage={m.stage!r} compile_cache={m.compile_cache!r}"
        ]
    if m.builtin is not None and m.builtin not in BUILTIN_MODELS:
        return [f"model.builtin={m.builtin!r} is not one of {list(BUILTIN_MODELS)}"]
    if m.builtin is not None and m.path:  # the built-in would run, the path be ignored
        return [
            f"model.path={m.path!r} is set, but model {m.name!r} is the built-in {m.builtin!r} (its shape and "
            f"engine settings describe that model): for your model use model=llama model.path={m.path} "
            "(or another conf/model group), or leave model.path unset for the built-in"
        ]
    if m.builtin is None and not m.path:
        return [f"model {m.name!r} has no path: set model.path=<local directory or hub id>"]
    if m.builtin is None and m.path and _looks_local(m.path) and not os.path.isdir(os.path.expanduser(m.path)):
        return [f"model.path={m.path!r} does not exist"]
    return []


def _unused_value_errors(cfg: RunConfig) -> List[str]:
    """Values this config would ignore, refused instead (only values other than their defaults: a
    default is not something the user asked for). The cluster-specific ones are in the clusters'
    `errors`; expert.* ones in `_expert_errors`."""
    errs = []
    if cfg.schedule.mode in ("dynamic", "static") and not cfg.dynamic:
        why = "ep=true: lockstep ranks always run static" if cfg.lockstep else "schedule.mode=static"
        errs += [
            f"schedule.{k}={getattr(cfg.schedule, k)!r} applies only to the dynamic schedule, and this run "
            f"is static ({why})"
            for k in ("shards_per_rank", "lease_s")
            if getattr(cfg.schedule, k) != getattr(ScheduleConfig, k)
        ]
    if cfg.output.explode_samples and cfg.sampling.n == 1 and cfg.data.sampling_column is None:
        errs.append(
            "output.explode_samples=true applies only where a row may have several samples "
            "(sampling.n > 1, or n in data.sampling_column), and sampling.n=1"
        )
    if cfg.output.reasoning_parser is not None and not cfg.output.reasoning_parser:
        errs.append("output.reasoning_parser is empty: name one of vLLM's reasoning parsers, or null")
    if cfg.data.input is not None and cfg.data.demo_rows != DataConfig.demo_rows:
        errs.append(
            f"data.demo_rows={cfg.data.demo_rows!r} applies only to the built-in demo prompts (data.input=null), "
            f"and data.input={cfg.data.input!r} is set"
        )
    return errs


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(path)


def _sampling_errors(s: SamplingConfig) -> List[str]:
    checks = [
        (s.max_tokens >= 1, f"sampling.max_tokens must be >= 1, got {s.max_tokens!r}"),
        (s.temperature >= 0, f"sampling.temperature must be >= 0, got {s.temperature!r}"),
        (0 < s.top_p <= 1, f"sampling.top_p must be in (0, 1], got {s.top_p!r}"),
        (s.top_k >= -1, f"sampling.top_k must be -1, 0 (off) or >= 1, got {s.top_k!r}"),
        (0 <= s.min_p <= 1, f"sampling.min_p must be in [0, 1], got {s.min_p!r}"),
        (s.repetition_penalty > 0, f"sampling.repetition_penalty must be > 0, got {s.repetition_penalty!r}"),
        (-2 <= s.presence_penalty <= 2, f"sampling.presence_penalty must be in [-2, 2], got {s.presence_penalty!r}"),
        (-2 <= s.frequency_penalty <= 2, f"sampling.frequency_penalty must be in [-2, 2], got {s.frequency_penalty!r}"),
        (s.seed is None or s.seed >= 0, f"sampling.seed must be >= 0 or null, got {s.seed!r}"),
        (s.n >= 1, f"sampling.n must be >= 1, got {s.n!r}"),
        (s.logprobs is None or s.logprobs >= 0, f"sampling.logprobs must be >= 0 or null, got {s.logprobs!r}"),
        (
            s.prompt_logprobs is None or s.prompt_logprobs >= 0,
            f"sampling.prompt_logprobs must be >= 0 or null, got {s.prompt_logprobs!r}",
        ),
    ]
    return [msg for ok, msg in checks if not ok] + _structured_errors(s.structured)


def _structured_errors(st: StructuredConfig, files: bool = True) -> List[str]:
    """At most one kind of structured output, each well formed; `json_schema` inline JSON text of
    an object, or (`files`) a file that exists (read when the run is planned)."""
    kinds = [k for k in STRUCTURED_KINDS if getattr(st, k) is not None]
    if len(kinds) > 1:
        return [f"sampling.structured: set one of {list(STRUCTURED_KINDS)}, got {' and '.join(kinds)}"]
    errs = []
    if st.choice is not None and (not st.choice or not all(isinstance(c, str) for c in st.choice)):
        errs.append(f"sampling.structured.choice must be a non-empty list of strings, got {st.choice!r}")
    for key in ("regex", "grammar"):
        if getattr(st, key) is not None and (not isinstance(getattr(st, key), str) or not getattr(st, key)):
            errs.append(f"sampling.structured.{key} must be a non-empty string, got {getattr(st, key)!r}")
    js = st.json_schema
    if js is not None:
        if not isinstance(js, str) or not js.strip():
            errs.append(f"sampling.structured.json_schema must be JSON text or a file, got {js!r}")
        elif js.lstrip().startswith("{") or not files:
            errs += [f"sampling.structured.json_schema: {e}" for e in _schema_errors(js)]
        elif not os.path.isfile(os.path.expanduser(js)):
            errs.append(f"sampling.structured.json_schema={js!r} is neither a JSON object nor a file")
    return errs


def _schema_errors(text: str) -> List[str]:
    import json

    try:
        obj = json.loads(text)
    except ValueError as e:
        return [f"not valid JSON ({e})"]
    return [] if isinstance(obj, dict) else [f"not a JSON object (got {type(obj).__name__})"]


# A row's sampling field -> the types its value may have (bool is no number here)
_ROW_TYPES = {
    "max_tokens": int,
    "top_k": int,
    "n": int,
    "seed": int,
    "logprobs": int,
    "prompt_logprobs": int,
    "temperature": (int, float),
    "top_p": (int, float),
    "min_p": (int, float),
    "repetition_penalty": (int, float),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "ignore_eos": bool,
    "stop": (list, str),
    "structured": dict,
}


def row_sampling(value: Any, base: SamplingConfig) -> Any:
    """A row's sampling (`data.sampling_column`): `base` with the row's non-null fields over it,
    as a SamplingConfig; or, for an invalid value, why (a string: the row's error). The value is
    a dict (a struct column) or JSON object text; null or empty: `base`. A row's `structured`
    replaces the base's (its `json_schema` inline: JSON text or an object). Pure."""
    import dataclasses
    import json

    if value is None:
        return base
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            return f"sampling_column: not valid JSON ({e})"
    if not isinstance(value, dict):
        return f"sampling_column: not an object of sampling fields (got {type(value).__name__})"
    fields = {k: v for k, v in value.items() if v is not None}
    unknown = sorted(set(fields) - set(_ROW_TYPES))
    if unknown:
        return f"sampling_column: unknown field(s) {unknown} (sampling fields: {sorted(_ROW_TYPES)})"
    for k, v in fields.items():
        kind = _ROW_TYPES[k]
        if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):
            return f"sampling_column: {k}={v!r} has the wrong type ({type(v).__name__})"
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if not all(isinstance(x, str) for x in fields.get("stop", [])):
        return f"sampling_column: stop must be a string or a list of strings, got {fields['stop']!r}"
    if "structured" in fields:
        st = {k: v for k, v in fields["structured"].items() if v is not None}
        bad = sorted(set(st) - set(STRUCTURED_KINDS))
        if bad:
            return f"sampling_column: unknown structured field(s) {bad} (one of {list(STRUCTURED_KINDS)})"
        if isinstance(st.get("json_schema"), dict):
            st["json_schema"] = json.dumps(st["json_schema"])
        fields["structured"] = StructuredConfig(**st)
        errs = _structured_errors(fields["structured"], files=False)
        if errs:
            return "sampling_column: " + "; ".join(errs)
    merged = dataclasses.replace(base, **fields)
    errs = _sampling_errors(merged)
    return "sampling_column: " + "; ".join(errs) if errs else merged


def _data_errors(d: DataConfig) -> List[str]:
    errs = []
    if d.shard_rows < 1:
        errs.append(f"data.shard_rows must be >= 1, got {d.shard_rows!r}")
    if d.input is None and d.demo_rows < 1:
        errs.append(f"data.demo_rows must be >= 1, got {d.demo_rows!r}")
    if not d.prompt_column:
        errs.append("data.prompt_column must name a column")
    if d.id_column is not None and d.id_column == d.prompt_column:
        errs.append(f"data.id_column={d.id_column!r} must differ from data.prompt_column")
    if d.max_tokens_column is not None and d.max_tokens_column in (d.prompt_column, d.id_column):
        errs.append(f"data.max_tokens_column={d.max_tokens_column!r} must differ from the prompt and id columns")
    from hpcinfer.rundir.output import OUTPUT_COLUMNS  # the output contract (rundir may import config, not back)

    if d.sampling_column is not None and d.sampling_column in (d.prompt_column, d.id_column, d.max_tokens_column):
        errs.append(
            f"data.sampling_column={d.sampling_column!r} must differ from the prompt, id and max_tokens columns"
        )
    if d.lora_column is not None and d.lora_column in (d.prompt_column, d.id_column, d.sampling_column):
        errs.append(f"data.lora_column={d.lora_column!r} must differ from the prompt, id and sampling columns")
    for col in (d.prompt_column, d.id_column, d.max_tokens_column, d.messages_column, d.sampling_column, d.lora_column):
        if col in OUTPUT_COLUMNS:
            errs.append(f"column {col!r} is one of the output columns {list(OUTPUT_COLUMNS)}")
    if d.format not in INPUT_FORMATS:
        errs.append(f"data.format={d.format!r} is not one of {list(INPUT_FORMATS)}")
    if d.demo_chat and d.input is not None:
        errs.append(f"data.demo_chat=true is the built-in demo of conversations, and data.input={d.input!r} is set")
    return errs


def _request_errors(cfg: RunConfig) -> List[str]:
    """How a row becomes a request: raw prompt, template, chat messages, or an OpenAI Batch line."""
    d, p, errs = cfg.data, cfg.prompt, []
    if p.template is not None and p.template_file is not None:
        errs.append("prompt.template and prompt.template_file are both set; give one")
    if p.template is not None and not p.template:
        errs.append("prompt.template is empty")
    if d.messages_column is not None:
        used = [k for k, v in (("prompt.template", p.template), ("prompt.template_file", p.template_file)) if v]
        used += ["prompt.chat=true"] if p.chat else []
        if used:
            errs.append(
                f"data.messages_column={d.messages_column!r} gives each row's whole conversation; "
                f"{' and '.join(used)} would be ignored (build prompts from columns without messages_column)"
            )
        if d.max_tokens_column is not None and d.max_tokens_column == d.messages_column:
            errs.append(f"data.max_tokens_column={d.max_tokens_column!r} must differ from data.messages_column")
    if p.system is not None and not p.chat:
        errs.append(f"prompt.system={p.system!r} applies only with prompt.chat=true (a system message of a chat)")
    if d.format == "openai_batch":
        errs += batch_errors(cfg)
    return errs


def batch_errors(cfg: RunConfig) -> List[str]:
    """OpenAI Batch lines carry their whole request (messages or prompt, sampling): what would be ignored."""
    d, p = cfg.data, cfg.prompt
    used = [
        k
        for k, v in (
            ("data.messages_column", d.messages_column),
            ("data.max_tokens_column", d.max_tokens_column),
            ("data.sampling_column", d.sampling_column),
            ("data.lora_column", d.lora_column),
            ("prompt.template", p.template),
            ("prompt.template_file", p.template_file),
            ("prompt.chat", p.chat or None),
            ("output.explode_samples", cfg.output.explode_samples or None),
        )
        if v
    ]
    return [f"{k} does not apply to OpenAI Batch input (each line's body is its request); leave it unset" for k in used]


def _engine_errors(cfg: RunConfig) -> List[str]:
    errs = []
    for source, where in ((cfg.model.engine, "model.engine"), (cfg.engine, "engine")):
        for key, value in source.items():
            if key in LAYOUT_ENGINE_ARGS and value is not None:
                errs.append(f"{where}.{key}={value!r}: set {LAYOUT_ENGINE_ARGS[key]} instead")
    args = engine_args(cfg, "-")
    mml = args.get("max_model_len")
    if mml is not None and (not isinstance(mml, int) or mml < 2):
        errs.append(f"engine.max_model_len must be an integer >= 2, got {mml!r}")
    gmu = args.get("gpu_memory_utilization")
    if gmu is not None and (not isinstance(gmu, (int, float)) or isinstance(gmu, bool) or not 0 < gmu <= 1):
        errs.append(f"engine.gpu_memory_utilization must be in (0, 1], got {gmu!r}")
    if mml is not None and isinstance(mml, int) and cfg.sampling.max_tokens >= mml:
        errs.append(
            f"sampling.max_tokens={cfg.sampling.max_tokens} leaves no room for a prompt "
            f"within engine.max_model_len={mml}"
        )
    return errs


def _secret_errors(cfg: RunConfig, env: Mapping[str, str]) -> List[str]:
    """A secret-named value (engine.hf_token, ...) must come from the environment: config.yaml
    then refers to the variable instead of holding the secret, and the ranks read it back."""
    lost = secrets.env_references(OmegaConf.to_container(OmegaConf.structured(cfg)), env)[1]
    return [
        f"{key} looks like a secret, and hpcinfer writes no secrets into the run directory; put it in "
        f"an environment variable and pass {key}='${{oc.env:NAME}}' (the value is not shown here)"
        for key in lost
    ]


# sbatch options hpcinfer sets itself from the layout; cluster.sbatch may not override them.
OWN_SBATCH_OPTIONS = (
    "nodes",
    "ntasks-per-node",
    "ntasks",
    "array",
    "dependency",
    "output",
    "error",
    "signal",
    "open-mode",
    "job-name",
    "time",
    "gpus-per-node",
    "cpus-per-task",
)
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-]*$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.,:@%+/~\-]+$")


def _slurm_errors(cfg: RunConfig, c: "SlurmClusterConfig") -> List[str]:
    errs = []
    for key in ("time", "finalize_time"):
        try:
            slurm_time_minutes(getattr(c, key))
        except ValueError as e:
            errs.append(f"cluster.{key}: {e}")
    positive = {
        "array": c.array,
        "max_array_size": c.max_array_size,
        "finalize_cpus": c.finalize_cpus,
        "nodes": c.nodes,
        "ranks_per_node": c.ranks_per_node,
        "cpus_per_task": c.cpus_per_task,
        "max_nodes_per_job": c.max_nodes_per_job,
        "array_parallelism": c.array_parallelism,
    }
    errs += [f"cluster.{k} must be >= 1, got {v!r}" for k, v in positive.items() if v is not None and v < 1]
    if c.gpus_per_node < 0:
        errs.append(f"cluster.gpus_per_node must be >= 0 (0 = CPU nodes), got {c.gpus_per_node!r}")
    elif c.workers_per_node is not None and (c.gpus_per_node or c.workers_per_node < 1):
        errs.append(
            f"cluster.workers_per_node={c.workers_per_node!r} is for CPU nodes (cluster.gpus_per_node=0) "
            "and must be >= 1"
        )
    elif cfg.gpus_per_rank > (c.node_size()[0] or cfg.gpus_per_rank):
        errs += _spanning_errors(cfg)
    elif c.gpus_per_node and c.ranks_per_node and c.ranks_per_node * cfg.gpus_per_rank > c.gpus_per_node:
        errs.append(
            f"cluster.ranks_per_node={c.ranks_per_node} x {cfg.gpus_per_rank} GPUs per rank exceeds "
            f"cluster.gpus_per_node={c.gpus_per_node}"
        )
    if cfg.ep and c.array > 1:
        errs.append(f"ep=true ranks run in lockstep as one group; cluster.array={c.array} must be 1")
    if c.gpus_per_node > 0 and c.cpu_kvcache_gib != SlurmClusterConfig.cpu_kvcache_gib:  # else ignored
        errs.append(
            f"cluster.cpu_kvcache_gib={c.cpu_kvcache_gib!r} applies only to CPU nodes (cluster.gpus_per_node=0), "
            f"and these nodes have cluster.gpus_per_node={c.gpus_per_node}"
        )
    if c.gpus_per_node == 0 and c.gpu_memory_gib is not None:
        errs.append(
            f"cluster.gpu_memory_gib={c.gpu_memory_gib!r} applies only to GPU nodes, and these are CPU nodes "
            "(cluster.gpus_per_node=0)"
        )
    for key in ("partition", "account", "qos", "mem", "constraint", "finalize_mem", "job_name"):
        value = getattr(c, key)
        if value is not None and (not value or not _SAFE_VALUE.match(str(value))):
            errs.append(f"cluster.{key}={value!r} has characters Slurm does not accept here")
    if c.python is not None and not _SAFE_PATH.match(c.python):  # it goes unquoted into the job script
        errs.append(f"cluster.python={c.python!r} must be the interpreter's path, without spaces or shell characters")
    for key, value in c.sbatch.items():
        if not re.match(r"^[a-z][a-z0-9-]*$", str(key)):
            errs.append(f"cluster.sbatch key {key!r} is not an sbatch option name (e.g. mail-type)")
        elif key.replace("_", "-") in OWN_SBATCH_OPTIONS:
            errs.append(f"cluster.sbatch.{key} is set by hpcinfer from the layout; use the cluster/layout keys")
        elif "\n" in str(value) or "\r" in str(value):
            errs.append(f"cluster.sbatch.{key}={value!r} contains a line break")
    errs += [
        f"cluster.setup line {line!r} contains a line break (give one list item per line)"
        for line in c.setup
        if "\n" in line or "\r" in line
    ]
    return errs


def load_run_config(path) -> RunConfig:
    """The typed config saved in a run directory's config.yaml."""
    return to_run_config(OmegaConf.load(path))


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def slurm_time_minutes(value: Any) -> int:
    """A Slurm time limit as whole minutes (rounded up). Accepts what sbatch --time accepts:
    M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and an int of minutes). ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a time limit: {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"time limit must be >= 1 minute, got {value!r}")
        return value
    m = _TIME.match(str(value).strip())
    if not m:
        raise ValueError(f"not a Slurm time limit: {value!r} (use minutes, HH:MM:SS or D-HH:MM:SS)")
    d, a, b, c = (int(x) if x is not None else None for x in m.group("d", "a", "b", "c"))
    if d is None:  # M | M:S | H:M:S
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:  # D-H | D-H:M | D-H:M:S
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds < 1:
        raise ValueError(f"time limit must be > 0, got {value!r}")
    return math.ceil(seconds / 60)
