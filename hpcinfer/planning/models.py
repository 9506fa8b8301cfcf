"""Offline built-in models and demo data: no model hub, no network.

`tiny-llama` (a random-weight LlamaForCausalLM) and `tiny-mixtral` (a Mixtral-style MoE, 4
experts, top-2) share a byte-level BPE tokenizer trained here on a corpus generated from a fixed
word list. Everything is seeded, so a build is the same on every machine with the same library
versions. Builds land in the cache directory once (temp directory + rename, under a file lock);
later runs reuse them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

BUILD_VERSION = "v2"  # bump when the builder changes what it writes (v2: a chat template)


SEED = 1234


VOCAB = 3072


SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


# The built-in models' chat template (tokenizer_config.json): each message as a role line and its
# content ended by </s>, then the assistant's line when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


WORDS = """
the a an of to and in is for that with as by this on at from it be are was were not or but
if then than so such can may will would should could must all any each every some no more most
few many much other another same new old first last long short high low large small big little
good great right left early late young own next best better open close true false real main
data model token prompt output input batch shard rank node cluster job queue file row column
table value string number list map key index order result error log time step run test
language text word sentence story question answer reason summary example idea fact rule
science history music art city river mountain forest ocean planet star light water fire stone
tree flower bird fish horse dog cat child teacher student doctor farmer writer engineer king
house road bridge ship train machine computer network memory signal energy power money market
write read explain describe compare list translate summarize solve compute find give tell show
make build keep move turn start stop begin end learn teach grow change help need want know think
why how what when where who which because while after before during between under over into
one two three four five six seven eight nine ten hundred thousand
""".split()


TOPICS = [
    "rivers",
    "prime numbers",
    "bread baking",
    "volcanoes",
    "the printing press",
    "honeybees",
    "sorting algorithms",
    "lighthouses",
    "glaciers",
    "chess openings",
    "the moon",
    "paper",
    "tea",
    "trains",
    "coral reefs",
    "the telescope",
    "maps",
    "clocks",
    "whales",
    "compilers",
]


TEMPLATES = [
    "Write a short story about {t}.",
    "Explain {t} to a ten year old.",
    "List three facts about {t}.",
    "Summarize the history of {t} in two sentences.",
    "Write a poem about {t}.",
    "What is the most surprising thing about {t}?",
    "Compare {t} and {u} in one paragraph.",
    "Give a step by step guide to learning about {t}.",
]


def cache_root(cache_dir: str) -> Path:
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_builtin_model(name: str, cache_dir: str) -> str:
    """The directory of built-in model `name`, built on first use."""
    root = cache_root(cache_dir) / "models"
    root.mkdir(exist_ok=True)
    target = root / f"{name}-{BUILD_VERSION}"
    if (target / "config.json").exists():
        return str(target)
    with _locked(root):
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                build_model(name, tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def corpus(n_lines: int = 20000, seed: int = SEED) -> list[str]:
    """Deterministic training text for the tokenizer: sentences over WORDS, TOPICS, digits."""
    rng = random.Random(seed)
    vocab = WORDS + [w for t in TOPICS for w in t.split()]
    lines = []
    for i in range(n_lines):
        words = [rng.choice(vocab) for _ in range(rng.randint(4, 16))]
        lines.append(f"{i % 1000}. " + " ".join(words).capitalize() + rng.choice(".?!,;:"))
    lines += [t.format(t=a, u=b) for t in TEMPLATES for a in TOPICS for b in TOPICS[:3]]
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(name: str, out: Path) -> None:
    """Write a random-weight model `name` with its tokenizer into `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = build_tokenizer()
    shape = dict(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,
    )  # wider than 0.02: fewer near-ties in greedy argmax
    if name == "tiny-llama":
        cfg, cls = LlamaConfig(**shape), LlamaForCausalLM
    elif name == "tiny-mixtral":
        cfg, cls = MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2), MixtralForCausalLM
    else:
        raise ValueError(f"unknown built-in model {name!r}")
    torch.manual_seed(SEED)
    model = cls(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t, u = rng.sample(TOPICS, 2)
        out.append(rng.choice(TEMPLATES).format(t=t, u=u))
    return out


SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a patient teacher."]


def demo_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` conversations: a user question, some with a system message, some with an earlier turn."""
    rng = random.Random(seed)
    out = []
    for prompt in demo_prompts(n, seed):
        conv = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
        if rng.random() < 0.3:
            t = rng.choice(TOPICS)
            conv += [
                {"role": "user", "content": f"Tell me about {t}."},
                {"role": "assistant", "content": f"Here is one fact about {t}."},
            ]
        out.append(conv + [{"role": "user", "content": prompt}])
    return out


def ensure_demo_data(n_rows: int, cache_dir: str, chat: bool = False) -> str:
    """A Parquet file of `n_rows` demo prompts (columns id, prompt, topic), or with `chat` demo
    conversations (columns id, messages, topic), written on first use."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hpcinfer.rundir.files import atomic_path

    root = cache_root(cache_dir) / "data"
    root.mkdir(exist_ok=True)
    path = root / f"demo{'-chat' if chat else ''}-{n_rows}-{BUILD_VERSION}.parquet"
    if not path.exists():
        prompts = demo_prompts(n_rows)
        topics = [next(t for t in TOPICS if t in p) for p in prompts]
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        text = {"messages": pa.array(demo_conversations(n_rows), pa.list_(message))} if chat else {"prompt": prompts}
        table = pa.table({"id": pa.array(range(n_rows), pa.int64()), **text, "topic": topics})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    return str(path)


def resolve_model_path(builtin: str | None, path: str | None, cache_dir: str, build: bool = True) -> str:
    """What vllm.LLM(model=...) gets: a built-in model's directory (built when `build`), a local
    directory as an absolute path, or a hub id unchanged."""
    if builtin:
        if build:
            return ensure_builtin_model(builtin, cache_dir)
        return str(Path(cache_dir).expanduser() / "models" / f"{builtin}-{BUILD_VERSION}")  # plan only: no mkdir
    assert path
    local = os.path.expanduser(path)
    return os.path.abspath(local) if os.path.isdir(local) else path
