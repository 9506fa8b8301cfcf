"""A random-weight Llama for GPU benchmarks, with the tokenizer of hpcinfer's built-in tiny model
(trained locally, so no hub is needed), bf16:

    python bench/make_llama.py /tmp/llama-1b        # 0.83B: hidden 2048, 16 layers, 16 heads, ffn 5632
    python bench/make_llama.py /tmp/llama-8b 8b     # Llama-3.1-8B's shape: hidden 4096, 32 layers,
                                                    # 32 heads, 8 KV heads, ffn 14336 (7.0B: small vocab)
    # then: model=llama model.path=/tmp/llama-1b ...
"""

import os
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hpcinfer.planning.models import resolve_model_path

SHAPES = {
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16
    ),
    "8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
}


def main(out: str, shape: str = "1b") -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama", None, _cache(), build=True))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        **SHAPES[shape],
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly (8b: no fp32 copy)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {out}")


def _cache() -> str:
    return os.environ.get("HPCINFER_CACHE") or os.path.expanduser("~/.cache/hpcinfer")


if __name__ == "__main__":
    main(*sys.argv[1:3])
