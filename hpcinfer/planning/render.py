"""The plan as `hpcinfer plan` prints it: model, layout, devices, experts, Slurm jobs, work per
rank, replicas spanning nodes, memory per GPU, notes. Pure.
"""

from __future__ import annotations

from typing import List

from hpcinfer.planning.devices import node_slices
from hpcinfer.rundir.records import MESSAGES, OPENAI_BATCH, Plan


def format_plan(plan: Plan) -> str:
    """The plan as the text `python -m hpcinfer.plan` prints."""
    m = plan.model
    params = f"{m['num_params_b']:.3g}B params" if m.get("num_params_b") else "size unknown"
    kind = "MoE" if m.get("moe") else "dense"
    gpus = plan.dp * plan.gpus_per_rank
    lines = [
        f"model      {m['name']} ({kind}, {params}, {plan.engine_args.get('dtype', 'auto')}) at {m['path']}",
        f"layout     dp={plan.dp} x tp={plan.tp} x pp={plan.pp} = {gpus} "
        f"{'GPU(s)' if plan.device_kind == 'cuda' else 'engine worker(s) on CPU'}, ep={'on' if plan.ep else 'off'}",
    ]
    if plan.device_kind == "cuda":
        lines.append(f"devices    {plan.gpus_per_rank} GPU(s) per rank, {plan.nodes} node(s)")
    else:
        lines.append(f"devices    no GPU: ranks run vLLM on CPU cores, {plan.nodes} node(s)")
    lines += _expert_lines(plan)
    j = plan.jobs
    if j is not None:
        array = f"a job array of {j.groups}" if j.groups > 1 else "1 job"
        lines.append(
            f"slurm      {array} x {j.nodes_per_job} node(s) x {j.tasks_per_node} task(s) per node "
            f"({j.ranks_per_group} rank(s) per job), then a finalize job"
        )
    lines.append(f"requests   {describe_requests(plan)}")
    per_rank = ", ".join(str(rp.rows) for rp in plan.rank_plans)
    dynamic = plan.schedule == "dynamic"
    lines.append(
        f"work       {plan.rows} rows in {plan.files} file(s) (~{plan.tokens:,} tokens) -> {plan.shards} "
        f"shard(s); {plan.ranks} rank(s) with rows {per_rank}"
        + (" expected: ranks claim shards as they have room, longest requests first" if dynamic else "")
    )
    lines += _prefix_lines(plan)
    for rp in plan.rank_plans:
        span = f"shards {rp.shards[0]}-{rp.shards[-1]}" if rp.shards else "no shards"
        if dynamic:
            span = "claims at run time"
        dev = ("gpu " if plan.device_kind == "cuda" else "cpu ") + (",".join(rp.devices) or "(its task's)")
        if rp.job is not None:
            dev = f"job {rp.job} node {rp.node} {dev}"
        lines.append(
            f"  rank {rp.rank:<4} {dev:<14} {span} ({len(rp.shards)} shard(s), {rp.rows} rows{' expected' if dynamic else ''})"
        )
    lines += _replica_lines(plan)
    lines += _memory_lines(plan)
    lines += [f"note       {n}" for n in plan.notes]
    return "\n".join(lines)


def describe_requests(plan: Plan) -> str:
    """What a row's request is, in a few words (the RequestSpec and the input format)."""
    r = plan.request
    template = "the model's chat template" if r.chat_template is None else "the chat template of model.chat_template"
    if r.kind == OPENAI_BATCH:
        what = f"OpenAI Batch lines (each body its request; chat lines with {template}); results.jsonl too"
    elif r.kind == MESSAGES:
        what = f"chat conversations in column {r.messages_column!r}, rendered with {template}"
    else:
        text = (
            f"prompt.template over {r.template_columns()}" if r.template is not None else f"column {r.prompt_column!r}"
        )
        what = f"{text} as the user message, rendered with {template}" if r.chat else f"raw prompts from {text}"
    kwargs = f"; chat template kwargs {r.chat_template_kwargs}" if r.chat_template_kwargs else ""
    source = f" ({plan.input_format} input, converted to Parquet in inputs/)" if plan.input_format != "parquet" else ""
    return what + kwargs + source + describe_output(plan)


def describe_output(plan: Plan) -> str:
    """The rows' own sampling and the generated columns' shapes, in a few words ('' when plain)."""
    r, o, parts = plan.request, plan.output, []
    if r.sampling_column is not None:
        parts.append(f"each row's own sampling from column {r.sampling_column!r}")
    if r.lora_column is not None:
        parts.append(f"LoRA adapters {sorted(r.lora_adapters)} by column {r.lora_column!r}")
    if o.samples:
        parts.append(
            f"up to {r.seed_stride} samples a row, "
            + ("one output row each (sample_index)" if o.explode else "as list columns")
        )
    parts += [name for name, on in (("logprobs", o.logprobs), ("prompt_logprobs", o.prompt_logprobs)) if on]
    return "; " + ", ".join(parts) if parts else ""


def _prefix_lines(plan: Plan) -> List[str]:
    """schedule.prefix: the shared fraction of prompt tokens, the prefill expected in input order
    and with placement, and whether placement is on."""
    p = plan.prefix
    if not p:
        return []
    prompt, shared = p["prompt_tokens"], p["shared_tokens"]
    before, after = p["prefill_input_order"], p["prefill_placed"]
    saved = before - after
    why = {"on": "schedule.prefix=on", "off": "schedule.prefix=off"}.get(
        p["mode"], f"auto: {'>=' if p['placed'] else '<'} 10% of the prompt tokens saved"
    )
    ratio = f", {before / after:.2f}x less" if after and saved > 0 else ""
    return [
        f"prefix     {shared / max(1, prompt):.0%} of ~{prompt:,} prompt tokens start like another row's; "
        f"expected prefill ~{before:,} tokens in input order, ~{after:,} placed by prefix "
        f"(saves ~{saved:,}{ratio}); placement {'on' if p['placed'] else 'off'} ({why})"
    ]


def _memory_lines(plan: Plan) -> List[str]:
    """Per GPU: weights + KV cache of the usable GPU memory. On CPU: per engine worker, then what
    the workers of the fullest node need of its memory."""
    mem = plan.memory
    if mem.weights_gib is None:
        return ["memory     model size unknown: not estimated (set model.num_params_b, or a local model.path)"]
    kv = f"KV cache {mem.kv_gib:.2f} GiB" if mem.kv_gib is not None else "KV cache: as vLLM sizes it"
    if mem.kv_tokens:
        kv += f" (~{mem.kv_tokens:,} tokens)"
    if plan.device_kind == "cuda":
        cap = (
            f" of {mem.budget_gib:.1f} GiB usable ({mem.gpu_memory_gib:.0f} GiB GPU)"
            if mem.budget_gib is not None
            else ""
        )
        return [f"memory     per GPU: weights {mem.weights_gib:.2f} GiB + {kv}{cap}"]
    node = ""
    if mem.node_need_gib is not None:
        of = f" of {mem.node_gib:.1f} GiB, {mem.node_source}" if mem.node_gib is not None else " (node memory unknown)"
        node = f"; per node {mem.node_workers} worker(s) = {mem.node_need_gib:.1f} GiB{of}"
    return [f"memory     per engine worker: weights {mem.weights_gib:.2f} GiB + {kv}{node}"]


def _expert_lines(plan: Plan) -> List[str]:
    """ep=true: the EP group and the experts each GPU holds."""
    x = plan.experts
    if x is None:
        return []
    unit = "GPU" if plan.device_kind == "cuda" else "worker"
    if x.num_experts is None:
        held = f"experts per {unit} unknown"
    else:
        count = str(x.per_gpu_min) if x.per_gpu_min == x.per_gpu_max else f"{x.per_gpu_min}-{x.per_gpu_max}"
        extra = f" + {x.redundant} redundant" if x.redundant else ""
        held = f"{x.num_experts} experts{extra} per MoE layer -> {count} per {unit}"
    eplb = "EPLB on" if x.eplb else "EPLB off"
    return [
        f"experts    EP size {x.ep_size} (dp={plan.ranks} x tp={plan.tp}): {held}; placement {x.placement}, "
        f"all2all {x.all2all_backend}, {eplb}"
    ]


def _replica_lines(plan: Plan) -> List[str]:
    """Ranks spanning nodes: which node holds which part of each rank (leader and headless)."""
    k = plan.nodes_per_rank
    if k < 2:
        return []
    lines = [
        f"replicas   each rank spans {k} nodes of {plan.gpus_per_rank // k} "
        f"{'GPU(s)' if plan.device_kind == 'cuda' else 'worker(s)'}: the leader (node 0 of the rank) runs the "
        f"engine and writes the outputs, the others run vLLM's workers headless"
    ]
    for rp in plan.rank_plans:
        if rp.job is not None:  # Slurm: the same local GPUs on each of the rank's nodes
            nodes = [f"{rp.node + i} ({'leader' if i == 0 else 'headless'})" for i in range(k)]
            gpus = ",".join(rp.devices) or "its task's"
            unit = "gpu" if plan.device_kind == "cuda" else "cpu"
            lines.append(f"  rank {rp.rank:<4} job {rp.job} nodes {', '.join(nodes)}, {unit} {gpus} on each")
        else:  # local: one process per node, each on its share of the rank's devices
            parts = [",".join(part) for part in node_slices(rp.devices, k)]
            lines.append(
                f"  rank {rp.rank:<4} "
                + "; ".join(
                    f"node {i} {'leader' if i == 0 else 'headless'} {'gpu' if plan.device_kind == 'cuda' else 'cpu'} "
                    f"{part}"
                    for i, part in enumerate(parts)
                )
            )
    return lines
