"""Exact RoPE delta rotation of cached keys: ``K_rope[p + δ] = Rot(δ) · K_rope[p]``.

RoPE rotates each pair of rotary dims ``(x1, x2)`` by the angle ``position * inv_freq[i]``, so a
key computed at position ``p`` becomes the key at ``p + δ`` by one more rotation of ``δ *
inv_freq[i]``. Only the frequencies matter: YaRN's ``attention_factor`` / DeepSeek's ``mscale``
multiplies cos/sin in Hugging Face (and is baked into SGLang's ``cos_sin_cache``), so a key
stored after RoPE already carries it and the delta rotation must not apply it again. That is why
`RopeSpec` holds inverse frequencies and never a cos/sin table.

Variants: ``default``, ``linear``, ``llama3``, ``yarn`` (DeepSeek's YaRN is ``yarn`` with
``mscale``/``mscale_all_dim``; the legacy name ``deepseek_yarn`` is accepted) on neox
(half-split) or interleaved (GPT-J pairs) layouts, with partial rotary. Refused with
`UnsupportedRope`: ``dynamic`` (frequencies depend on the sequence length), ``longrope`` (short or
long factors chosen by length), multimodal M-RoPE sections, dual-chunk attention, per-layer-type
RoPE, NoPE layers, and model types whose pair layout has not been checked.

Pair layout, model semantics versus what sits in Hugging Face's cache (checked against the
installed transformers 5.x code; the tests assert both):

- ``glm``/``glm4``: interleaved pairs, rotated in place; the cache holds interleaved keys.
- ``deepseek_v2``: ``apply_rotary_emb`` views ``k_pe`` as complex pairs ``(2i, 2i+1)`` and rotates
  them in place, so the cached ``k_pe`` is interleaved: ``interleaved=True`` for both.
- ``deepseek_v3`` with ``rope_interleave=True`` (the default): the projection's ``k_pe`` is in pair
  layout, but ``apply_rotary_pos_emb_interleave`` returns ``cat(evens, odds)`` after rotating, so
  the cached ``k_pe`` is half-split: `from_hf_config` says ``interleaved=True`` (the model's
  semantics), `hf_cache_spec` says ``interleaved=False`` (the stored keys). With
  ``rope_interleave=False`` both are neox.
- SGLang keeps DeepSeek ``k_pe`` in pair layout (``is_neox_style = not rope_interleave``), so an
  SGLang pool matches `RopeSpec.from_hf_config`, and the embedded engine uses `hf_cache_spec`.

Both HF DeepSeek caches store the latent row ``[c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]``;
rotate it with ``offset=kv_lora_rank``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from leyline.errors import LeylineError

__all__ = ["RopeSpec", "UnsupportedRope", "hf_cache_spec", "rotate"]

# Model types whose rotary code was read and checked: neox ``rotate_half`` (first half / second
# half), or GLM-style interleaved pairs. Unknown types are refused rather than guessed.
_NEOX_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next",
        "gemma", "gemma2", "phi", "phi3", "stablelm", "persimmon", "olmo", "olmo2", "granite",
        "starcoder2", "smollm3",
    }
)  # fmt: skip
_INTERLEAVED_MODEL_TYPES = frozenset({"glm", "glm4"})
_MLA_MODEL_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})
# Types whose attention rotates only the first int(head_dim * partial_rotary_factor) dims.
_PARTIAL_MODEL_TYPES = frozenset(
    {"glm", "glm4", "phi", "phi3", "qwen3_next", "stablelm", "persimmon"}
)
_SUPPORTED_TYPES = ("default", "linear", "llama3", "yarn", "deepseek_yarn")
_REFUSED_TYPES = {
    "dynamic": "dynamic NTK recomputes the frequencies from the current sequence length, so the "
    "same position has different angles in different requests",
    "longrope": "LongRoPE switches between short and long factors with the sequence length",
    "mrope": "multimodal M-RoPE rotates frequency sections by several position axes",
    "proportional": "proportional RoPE leaves non-contiguous dims unrotated",
}


class UnsupportedRope(LeylineError, ValueError):
    """A model's RoPE cannot be moved by an exact delta rotation; the message says why."""


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """What a delta rotation needs: which dims rotate, their frequencies and the pair layout.

    Example: ``RopeSpec.from_hf_config(LlamaConfig(head_dim=64)).rotary_dim == 64``.
    """

    rotary_dim: int
    inv_freq: tuple[float, ...]  # after scaling, without any attention factor / mscale
    interleaved: bool  # True: pairs (2i, 2i+1); False: pairs (i, i + rotary_dim // 2)
    scaling: str = "default"

    def __post_init__(self) -> None:
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and >= 2, got {self.rotary_dim}")
        if len(self.inv_freq) != self.rotary_dim // 2:
            raise ValueError(
                f"need rotary_dim // 2 = {self.rotary_dim // 2} inverse frequencies, "
                f"got {len(self.inv_freq)}"
            )
        if not all(math.isfinite(f) and f > 0 for f in self.inv_freq):
            raise ValueError("inverse frequencies must be finite and positive")

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeSpec:
        """The RoPE of a transformers config, in the model's semantic pair layout."""
        model_type = getattr(config, "model_type", "") or ""
        params = _rope_params(config, model_type)
        _refuse_structural(config, model_type)
        rope_type = params.get("rope_type", params.get("type")) or "default"
        if rope_type in _REFUSED_TYPES or "dynamic" in rope_type:
            why = _REFUSED_TYPES.get(rope_type, _REFUSED_TYPES["dynamic"])
            raise UnsupportedRope(f"{model_type}: rope_type {rope_type!r} is refused: {why}")
        if rope_type not in _SUPPORTED_TYPES:
            raise UnsupportedRope(
                f"{model_type}: unknown rope_type {rope_type!r}; supported: {_SUPPORTED_TYPES}"
            )
        if model_type not in _NEOX_MODEL_TYPES | _INTERLEAVED_MODEL_TYPES | _MLA_MODEL_TYPES:
            known = sorted(_NEOX_MODEL_TYPES | _INTERLEAVED_MODEL_TYPES | _MLA_MODEL_TYPES)
            raise UnsupportedRope(
                f"model type {model_type!r}: its rotary pair layout has not been verified "
                f"against its modeling code; verified types: {known}"
            )
        if params["rope_theta"] is None:
            raise UnsupportedRope(f"{model_type}: config has no rope_theta / rope_parameters")
        if model_type in _MLA_MODEL_TYPES:
            dim = int(config.qk_rope_head_dim)
            interleaved = model_type == "deepseek_v2" or bool(config.rope_interleave)
        else:
            head_dim = getattr(config, "head_dim", None) or (
                config.hidden_size // config.num_attention_heads
            )
            partial = params.get("partial_rotary_factor") or 1.0
            if partial != 1.0 and model_type not in _PARTIAL_MODEL_TYPES:
                raise UnsupportedRope(
                    f"{model_type}: partial_rotary_factor={partial} but this model's attention "
                    "rotates the whole head (its default RoPE ignores the factor)"
                )
            dim = int(head_dim * partial)
            interleaved = model_type in _INTERLEAVED_MODEL_TYPES
        inv = _inv_freq(rope_type, params, dim, config)
        if rope_type in ("yarn", "deepseek_yarn") and model_type in _MLA_MODEL_TYPES:
            rope_type = "deepseek_yarn"
        return cls(rotary_dim=dim, inv_freq=inv, interleaved=interleaved, scaling=rope_type)

    def inv_freq_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Inverse frequencies as an fp32 tensor of shape ``(rotary_dim // 2,)``."""
        return torch.tensor(self.inv_freq, dtype=torch.float32, device=device)

    def with_interleaved(self, interleaved: bool) -> RopeSpec:
        """The same frequencies with the other pair layout."""
        return replace(self, interleaved=interleaved)


def hf_cache_spec(config: Any) -> RopeSpec:
    """The spec matching the keys a Hugging Face model writes into its KV cache.

    Equal to `RopeSpec.from_hf_config` except for DeepSeek-V3, whose interleaved-RoPE path
    stores ``k_pe`` half-split (see the module docstring).
    """
    spec = RopeSpec.from_hf_config(config)
    if getattr(config, "model_type", "") == "deepseek_v3":
        return spec.with_interleaved(False)
    return spec


def rotate(
    keys: torch.Tensor, delta: int | torch.Tensor, spec: RopeSpec, *, offset: int = 0
) -> torch.Tensor:
    """Return keys with dims ``[offset, offset + spec.rotary_dim)`` rotated by ``delta`` positions.

    ``keys``: ``(..., D)``; ``delta``: an int or an integer tensor broadcastable to
    ``keys.shape[:-1]`` (per-token deltas). The rotation runs in fp32 and is rounded to
    ``keys.dtype`` once; every other dim is copied bit-exactly; ``keys`` is never mutated.
    Always rotate from the originally cached key: chained bf16 rotations drift.
    """
    if not keys.is_floating_point():
        raise ValueError(f"keys must be a floating tensor, got {keys.dtype}")
    rd = spec.rotary_dim
    if offset < 0 or offset + rd > keys.shape[-1]:
        raise ValueError(
            f"rotary dims [{offset}, {offset + rd}) do not fit in key rows of width "
            f"{keys.shape[-1]}"
        )
    batch_shape = keys.shape[:-1]
    if isinstance(delta, torch.Tensor):
        if delta.is_floating_point() or delta.is_complex() or delta.dtype == torch.bool:
            raise ValueError(f"delta must be an integer tensor, got {delta.dtype}")
        # numpy broadcasting of delta onto the token axes, checked without materializing it
        ok = delta.dim() <= len(batch_shape) and all(
            n in (1, m) for n, m in zip(reversed(delta.shape), reversed(batch_shape), strict=False)
        )
        if not ok:
            raise ValueError(
                f"delta of shape {tuple(delta.shape)} does not broadcast to keys.shape[:-1] = "
                f"{tuple(batch_shape)}"
            )
        steps = delta.to(device=keys.device, dtype=torch.float64)
    else:
        steps = torch.tensor(float(int(delta)), dtype=torch.float64, device=keys.device)
    # NOTE: the angle is formed in float64 (|δ| < 2^53 is exact, inv_freq is float64), so at
    # δ = 16K it carries no fp32 product rounding (~1e-3 rad); cos/sin are then rounded to fp32.
    inv = torch.tensor(spec.inv_freq, dtype=torch.float64, device=keys.device)
    angle = steps.unsqueeze(-1) * inv
    cos, sin = angle.cos().float(), angle.sin().float()
    x = keys[..., offset : offset + rd].float()
    if spec.interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 :]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if spec.interleaved else torch.cat((y1, y2), -1)
    out = keys.clone()
    out[..., offset : offset + rd] = y.to(keys.dtype)
    return out


def _refuse_structural(config: Any, model_type: str) -> None:
    """Refuse configs whose keys are not all rotated the same way."""
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope is not None and not all(no_rope):
        nope = [i for i, has_rope in enumerate(no_rope) if not has_rope]
        raise UnsupportedRope(
            f"{model_type}: layers {nope} are NoPE (no_rope_layers), so their keys must not "
            "rotate while the others must; per-layer rotation is not supported"
        )
    if getattr(config, "dual_chunk_attention_config", None):
        raise UnsupportedRope(
            f"{model_type}: dual-chunk attention uses chunk-relative positions, not one angle "
            "per position"
        )


def _rope_params(config: Any, model_type: str) -> dict[str, Any]:
    """The flat RoPE parameter dict (transformers 5 ``rope_parameters``, legacy ``rope_scaling``)."""
    raw = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(raw)
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedRope(
            f"{model_type}: RoPE differs per layer type ({sorted(params)}); not supported"
        )
    if params.get("mrope_section") is not None or params.get("mrope_interleaved"):
        raise UnsupportedRope(f"{model_type}: {_REFUSED_TYPES['mrope']}")
    params.setdefault("rope_theta", getattr(config, "rope_theta", None))
    return params


def _inv_freq(rope_type: str, p: dict[str, Any], dim: int, config: Any) -> tuple[float, ...]:
    """Scaled inverse frequencies in float64, following transformers' formulas."""
    base = float(p["rope_theta"])
    inv = [1.0 / base ** (i / dim) for i in range(0, dim, 2)]
    if rope_type == "linear":
        return tuple(f / p["factor"] for f in inv)
    if rope_type == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old_len / hi:
                out.append(f)
            elif wavelen > old_len / lo:
                out.append(f / factor)
            else:
                smooth = (old_len / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / factor + smooth * f)
        return tuple(out)
    if rope_type in ("yarn", "deepseek_yarn"):
        old_len = p["original_max_position_embeddings"]
        factor = p.get("factor") or config.max_position_embeddings / old_len
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        out = []
        for i, f in enumerate(inv):
            extrapolate = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
            out.append(f / factor * (1 - extrapolate) + f * extrapolate)
        return tuple(out)
    return tuple(inv)
