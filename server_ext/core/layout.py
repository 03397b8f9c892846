"""KV pool layouts shared by the kernels and both engine adapters.

The embedded engine and the SGLang plugin store keys *after* RoPE, one tensor per layer, in
SGLang's pool layouts (slot 0 reserved as padding in both):

- MHA/GQA: ``k[l]: (slots, kv_heads, head_dim)`` and ``v[l]: (slots, kv_heads, v_head_dim)``;
  the rotary dims of every K head are ``[rope_offset, rope_offset + rope_dim)`` (``rope_offset``
  is 0 for Hugging Face and SGLang GQA models).
- MLA: ``kv[l]: (slots, 1, kv_lora_rank + qk_rope_head_dim)``, latent ``c_kv`` first, so the
  rotary part is ``[kv_lora_rank, kv_lora_rank + qk_rope_head_dim)``; there is no V buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape of one KV pool: which dims of each stored key row rotate, and what else is stored."""

    kind: Literal["mha", "mla"]
    num_layers: int
    kv_heads: int
    head_dim: int  # stored K row width (MLA: kv_lora_rank + rope dims)
    v_head_dim: int  # 0 for MLA (no V buffer)
    rope_offset: int
    rope_dim: int

    def __post_init__(self) -> None:
        if self.kind not in ("mha", "mla"):
            raise ValueError(f"kind must be 'mha' or 'mla', got {self.kind!r}")
        if self.num_layers < 1 or self.kv_heads < 1 or self.head_dim < 1:
            raise ValueError("num_layers, kv_heads and head_dim must be positive")
        if self.kind == "mla" and (self.kv_heads != 1 or self.v_head_dim != 0):
            raise ValueError("an MLA pool has kv_heads == 1 and no V buffer (v_head_dim == 0)")
        if self.kind == "mha" and self.v_head_dim < 1:
            raise ValueError("an MHA pool needs v_head_dim >= 1")
        if self.rope_dim % 2 or self.rope_dim < 0:
            raise ValueError(f"rope_dim must be even and >= 0, got {self.rope_dim}")
        if self.rope_offset < 0 or self.rope_offset + self.rope_dim > self.head_dim:
            raise ValueError("rotary dims must lie inside the key row")

    @property
    def has_values(self) -> bool:
        return self.kind == "mha"

    def bytes_per_token(self, itemsize: int) -> int:
        """Bytes of KV one token occupies across all layers."""
        per_layer = self.kv_heads * (self.head_dim + self.v_head_dim)
        return self.num_layers * per_layer * itemsize
