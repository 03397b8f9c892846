"""Write a small Llama checkpoint with seeded, normally initialised weights (safetensors).

``--load-format dummy`` weights give near-uniform logits, so outputs say nothing about whether
the cache served the right KV. This model's logits are not uniform: greedy answers change when
the KV changes, which is what the correctness run on the real server compares. It is written on
the GPU machine (about 300 MB: too large to bring along) in a few seconds.

    python3 scripts/gpu/make_random_model.py /tmp/models/random-llama --tokenizer DIR

Shape: 4 layers, hidden 1024, 8 heads of 128 with 8 KV heads (the KV row and RoPE width of
Llama-3.1-8B, so SGLang's prebuilt JIT kernels are reused), SmolLM2's tokenizer and vocabulary.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def weights(cfg: dict, seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * std).to(torch.bfloat16).cpu()

    out = {
        "model.embed_tokens.weight": normal(cfg["vocab_size"], h, std=1.0),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": normal(cfg["vocab_size"], h, std=1.0),  # clear greedy margins
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": normal(q, h, std=0.05),
            p + "self_attn.k_proj.weight": normal(kv, h, std=0.05),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, q),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, required=True, help="dir with tokenizer.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    save_file(weights(CONFIG, args.seed, device), str(args.out / "model.safetensors"))
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (args.tokenizer / f).exists():
            shutil.copy(args.tokenizer / f, args.out / f)
    print(f"wrote {args.out} (seed {args.seed})")


if __name__ == "__main__":
    main()
