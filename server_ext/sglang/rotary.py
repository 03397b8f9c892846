"""RoPE specs read from SGLang's own rotary modules (per layer), with the unsafe classes refused.

SGLang builds one rotary module per attention layer; its ``cos_sin_cache`` carries YaRN/DeepSeek
``mscale``, so a splice must not use it: the pure rotation comes from the module's inverse
frequencies (``_compute_inv_freq``). Only classes whose rotation depends on the position delta
alone are safe: base, linear scaling (one factor), Llama-3, YaRN and DeepSeek-YaRN scaling.
"""

from __future__ import annotations

from typing import Any

import torch

from leyline.server.core.rope import RopeSpec, UnsupportedRope

__all__ = ["rope_spec_from_module", "rope_specs_from_model"]

# NOTE: matched by exact class name, never by isinstance: DynamicNTK, MRotary and friends
# subclass RotaryEmbedding but are not delta-rotatable.
_BASE_ARG = {"RotaryEmbedding": "default", "Llama3RotaryEmbedding": "llama3"}
_FACTOR_ARG = {
    "YaRNScalingRotaryEmbedding": "yarn",
    "DeepseekScalingRotaryEmbedding": "deepseek_yarn",
}
_REFUSED = {
    "DynamicNTKScalingRotaryEmbedding": "dynamic NTK rescales every position with the length",
    "DynamicNTKAlphaRotaryEmbedding": "dynamic NTK rescales every position with the length",
    "Phi3LongRoPEScaledRotaryEmbedding": "LongRoPE switches factors with the sequence length",
    "DualChunkRotaryEmbedding": "dual-chunk attention uses chunk-relative positions",
    "MRotaryEmbedding": "M-RoPE rotates sections by several position axes",
    "YaRNScalingMRotaryEmbedding": "M-RoPE rotates sections by several position axes",
    "Ernie4_5_VLRotaryEmbedding": "M-RoPE rotates sections by several position axes",
}


def rope_spec_from_module(module: Any) -> RopeSpec:
    """The delta-rotation spec of one SGLang rotary module; raises `UnsupportedRope`."""
    name = type(module).__name__
    if name in _REFUSED:
        raise UnsupportedRope(f"{name} is refused: {_REFUSED[name]}")
    if name in _BASE_ARG:
        inv = module._compute_inv_freq(module.base)
        scaling = _BASE_ARG[name]
    elif name == "LinearScalingRotaryEmbedding":
        factors = list(module.scaling_factors)
        if len(factors) != 1:
            raise UnsupportedRope(f"{name} with several scaling factors {factors} (multi-LoRA)")
        # NOTE: linear scaling divides positions by the factor, i.e. inv_freq / factor.
        inv = module._compute_inv_freq(module.base) / float(factors[0])
        scaling = "linear"
    elif name in _FACTOR_ARG:
        inv = module._compute_inv_freq(module.scaling_factor)
        scaling = _FACTOR_ARG[name]
    else:
        raise UnsupportedRope(
            f"{name} is not on the safe list {sorted([*_BASE_ARG, *_FACTOR_ARG])} "
            "+ LinearScalingRotaryEmbedding"
        )
    inv = torch.as_tensor(inv, dtype=torch.float32).flatten().cpu()
    return RopeSpec(
        rotary_dim=int(module.rotary_dim),
        inv_freq=tuple(float(x) for x in inv.tolist()),
        interleaved=not bool(module.is_neox_style),
        scaling=scaling,
    )


def rope_specs_from_model(model: torch.nn.Module) -> list[RopeSpec]:
    """One spec per attention layer, in layer order, from every ``rotary_emb`` submodule.

    Raises `UnsupportedRope` when the model has no rotary module or any layer's is refused.
    """
    specs = [
        rope_spec_from_module(mod)
        for path, mod in model.named_modules()
        if path.endswith("rotary_emb") and mod is not None
    ]
    if not specs:
        raise UnsupportedRope(f"{type(model).__name__} has no rotary_emb module")
    return specs
