"""Exact partial attention: attention of query rows over a subset of the KV, as ``(o, lse)``.

Softmax attention over a key set ``S`` split into disjoint parts ``S_1 .. S_P`` is recovered
exactly from each part's normalized output ``o_i`` and log-sum-exp ``lse_i`` of the scaled
scores: ``lse = log Σ exp(lse_i)`` and ``o = Σ exp(lse_i - lse) · o_i`` (:mod:`.merge`). So a
holder of part of the KV can answer a routed query with ``(o_i, lse_i)`` instead of shipping
its KV.

Two attention kinds, both in the layout the KV pools store (:mod:`leyline.server.core.layout`):

- GQA/MHA: ``q: (T, q_heads, qk_dim)``, ``k: (N, kv_heads, qk_dim)``, ``v: (N, kv_heads,
  v_dim)``; query head ``h`` reads KV head ``h // (q_heads // kv_heads)`` (Hugging Face's
  ``repeat_kv``).
- MLA in the absorbed (latent) form of DeepSeek-V2: a cached row is ``[c_kv (kv_lora_rank) |
  k_pe (rope_dim)]`` (one shared "KV head"); the query row of head ``h`` is ``[q_nope_h ·
  W_UK_h (kv_lora_rank) | q_pe_h (rope_dim)]``, so the score is ``q_lat · c_kv + q_pe · k_pe``
  and the values are the latent rows ``c_kv`` themselves: ``o`` is ``(T, q_heads,
  kv_lora_rank)``, projected by ``W_UV`` after the merge. The scale is that of the unabsorbed
  head, ``(qk_nope_head_dim + rope_dim) ** -0.5`` (times DeepSeek-YaRN's ``mscale ** 2``).

Positions: keys are stored after RoPE. A key computed at position ``p`` and placed at ``p + δ``
needs ``Rot(δ)`` on its rotary dims (the splice); since ``<Rot(a) x, Rot(b) y> = <Rot(a - b) x,
y>``, rotating the *query* by ``-δ`` instead gives the same scores against the unmoved key
(:func:`shift_query`): this is what lets a holder answer for a chunk that sits at another
position in the requester's sequence.

Example::

    spec = AttnSpec.gqa(q_heads=8, kv_heads=2, head_dim=64)
    o, lse = partial_attention(q, k, v, spec, q_pos=q_pos, k_pos=k_pos)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from leyline.server.core.layout import KVLayout
from leyline.server.core.rope import RopeSpec, rotate

__all__ = ["AttnSpec", "Partial", "empty_partial", "partial_attention", "shift_query"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Partial(NamedTuple):
    """Attention over a part of the KV: ``o`` fp32 ``(T, q_heads, v_dim)`` normalized over the
    part, ``lse`` fp32 ``(T, q_heads)`` natural-log sum of exp of the scaled scores (``-inf``
    and ``o = 0`` where the part holds no visible key)."""

    o: Tensor
    lse: Tensor


@dataclass(frozen=True, slots=True)
class AttnSpec:
    """Shape of one attention layer as partial attention reads it.

    ``qk_dim``: width of a query/key row; ``v_dim``: width of an output row (MLA: the latent
    ``kv_lora_rank``, values being the first ``v_dim`` dims of the key row); ``[rope_offset,
    rope_offset + rope_dim)``: the rotary dims of a query/key row; ``scale``: softmax scale.

    Example: ``AttnSpec.mla(q_heads=16, kv_lora_rank=512, rope_dim=64, qk_nope_head_dim=128)``
    is DeepSeek-V2-Lite's layer (one 576-wide latent row per token, 512-wide outputs).
    """

    kind: Literal["gqa", "mla"]
    q_heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    rope_offset: int
    rope_dim: int
    scale: float

    def __post_init__(self) -> None:
        if self.kind not in ("gqa", "mla"):
            raise ValueError(f"kind must be 'gqa' or 'mla', got {self.kind!r}")
        if min(self.q_heads, self.kv_heads, self.qk_dim, self.v_dim) < 1:
            raise ValueError("q_heads, kv_heads, qk_dim and v_dim must be positive")
        if self.q_heads % self.kv_heads:
            raise ValueError(
                f"q_heads {self.q_heads} is not a multiple of kv_heads {self.kv_heads}"
            )
        if self.kind == "mla" and (self.kv_heads != 1 or self.v_dim > self.qk_dim - self.rope_dim):
            raise ValueError("MLA has one latent KV head whose values are the non-rotary c_kv dims")
        if self.rope_dim % 2 or self.rope_dim < 0:
            raise ValueError(f"rope_dim must be even and >= 0, got {self.rope_dim}")
        if self.rope_offset < 0 or self.rope_offset + self.rope_dim > self.qk_dim:
            raise ValueError("rotary dims must lie inside the query/key row")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    @classmethod
    def gqa(
        cls,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        v_head_dim: int | None = None,
        rope_dim: int | None = None,
        rope_offset: int = 0,
        scale: float | None = None,
    ) -> AttnSpec:
        """A GQA/MHA layer; defaults: ``v_head_dim = rope_dim = head_dim``, ``head_dim ** -0.5``."""
        return cls(
            "gqa", q_heads, kv_heads, head_dim, v_head_dim or head_dim, rope_offset,
            head_dim if rope_dim is None else rope_dim, scale or head_dim**-0.5,
        )  # fmt: skip

    @classmethod
    def mla(
        cls,
        q_heads: int,
        kv_lora_rank: int,
        rope_dim: int,
        qk_nope_head_dim: int,
        *,
        mscale: float = 1.0,
    ) -> AttnSpec:
        """A DeepSeek MLA layer in absorbed form; ``mscale``: DeepSeek-YaRN's attention mscale."""
        scale = (qk_nope_head_dim + rope_dim) ** -0.5 * mscale * mscale
        return cls("mla", q_heads, 1, kv_lora_rank + rope_dim, kv_lora_rank, kv_lora_rank,
                   rope_dim, scale)  # fmt: skip

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.q_heads // self.kv_heads

    def kv_layout(self, num_layers: int) -> KVLayout:
        """The pool layout that stores this layer's KV (for :mod:`..kernels.splice`)."""
        if self.kind == "mla":
            return KVLayout("mla", num_layers, 1, self.qk_dim, 0, self.rope_offset, self.rope_dim)
        return KVLayout("mha", num_layers, self.kv_heads, self.qk_dim, self.v_dim,
                        self.rope_offset, self.rope_dim)  # fmt: skip

    def query_bytes(self, itemsize: int) -> int:
        """Bytes of one query row (all heads) sent when a query is routed."""
        return self.q_heads * self.qk_dim * itemsize

    def result_bytes(self, itemsize: int) -> int:
        """Bytes of one returned row: ``o`` at ``itemsize`` plus the fp32 ``lse``, all heads."""
        return self.q_heads * (self.v_dim * itemsize + 4)

    def kv_bytes(self, itemsize: int) -> int:
        """Bytes of one token's KV in one layer (what a fetch moves per token and layer)."""
        values = self.v_dim if self.kind == "gqa" else 0
        return self.kv_heads * (self.qk_dim + values) * itemsize


def empty_partial(t: int, spec: AttnSpec, device: torch.device | str = "cpu") -> Partial:
    """The partial of an empty key set: ``o = 0``, ``lse = -inf`` (the merge's identity)."""
    o = torch.zeros(t, spec.q_heads, spec.v_dim, dtype=torch.float32, device=device)
    lse = torch.full((t, spec.q_heads), float("-inf"), dtype=torch.float32, device=device)
    return Partial(o, lse)


def partial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    spec: AttnSpec,
    *,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
) -> Partial:
    """Softmax attention of ``q`` over the keys ``k`` only, in fp32: ``(o, lse)``.

    Shapes in the module docstring; ``v`` is None for MLA (the values are ``k[..., :v_dim]``).
    With ``q_pos: (T,)`` and ``k_pos: (N,)`` (integer positions in the requester's sequence)
    key ``j`` is visible to query ``i`` iff ``k_pos[j] <= q_pos[i]`` (causal); without them all
    keys are visible. Rows that see no key (``N == 0`` or all masked) get ``o = 0``,
    ``lse = -inf``.
    """
    t, _ = _check(q, k, v, spec, q_pos, k_pos)
    hkv, g = spec.kv_heads, spec.group
    qf = q.float().reshape(t, hkv, g, spec.qk_dim)
    kf = k.float()
    vf = kf[..., : spec.v_dim] if v is None else v.float()
    s = torch.einsum("tkgd,nkd->kgtn", qf, kf) * spec.scale
    if q_pos is not None and k_pos is not None:
        visible = k_pos.to(q_pos.device)[None, :] <= q_pos[:, None]  # (T, N)
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (kv, g, T); -inf where nothing is visible
    # NOTE: exp(s - lse) with lse = -inf would be nan; such rows have every s = -inf, so a
    # finite stand-in makes their weights exactly 0 and o exactly 0.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe.unsqueeze(-1))
    o = torch.einsum("kgtn,nkv->tkgv", p, vf).reshape(t, spec.q_heads, spec.v_dim)
    return Partial(o.contiguous(), lse.permute(2, 0, 1).reshape(t, spec.q_heads).contiguous())


def shift_query(q: Tensor, delta: int | Tensor, spec: AttnSpec, rope: RopeSpec) -> Tensor:
    """``q`` with its rotary dims turned by ``-delta`` positions, so that its scores against a key
    cached at position ``p`` equal those against the same key moved to ``p + delta``.

    ``q: (..., qk_dim)``; ``delta``: an int or an integer tensor broadcastable to
    ``q.shape[:-1]``. The rotation is :func:`leyline.server.core.rope.rotate` (fp32, one rounding).
    """
    if rope.rotary_dim != spec.rope_dim:
        raise ValueError(f"rope spec rotates {rope.rotary_dim} dims, the layer {spec.rope_dim}")
    if spec.rope_dim == 0:
        return q
    return rotate(q, -delta, rope, offset=spec.rope_offset)


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    spec: AttnSpec,
    q_pos: Tensor | None,
    k_pos: Tensor | None,
) -> tuple[int, int]:
    if q.dim() != 3 or tuple(q.shape[1:]) != (spec.q_heads, spec.qk_dim):
        raise ValueError(f"q must be (T, {spec.q_heads}, {spec.qk_dim}), got {tuple(q.shape)}")
    if k.dim() != 3 or tuple(k.shape[1:]) != (spec.kv_heads, spec.qk_dim):
        raise ValueError(f"k must be (N, {spec.kv_heads}, {spec.qk_dim}), got {tuple(k.shape)}")
    if (v is None) != (spec.kind == "mla"):
        raise ValueError(f"{spec.kind}: v must be {'None' if spec.kind == 'mla' else 'given'}")
    if v is not None and tuple(v.shape) != (k.shape[0], spec.kv_heads, spec.v_dim):
        raise ValueError(
            f"v must be ({k.shape[0]}, {spec.kv_heads}, {spec.v_dim}), got {tuple(v.shape)}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None and (x.dtype not in _DTYPES or x.device != q.device):
            raise ValueError(f"{name} must be fp16/bf16/fp32 on {q.device}, got {x.dtype}")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("give both q_pos and k_pos (causal) or neither")
    if q_pos is not None and k_pos is not None:
        for name, pos, want in (("q_pos", q_pos, q.shape[0]), ("k_pos", k_pos, k.shape[0])):
            if pos.dim() != 1 or pos.numel() != want or pos.is_floating_point():
                raise ValueError(f"{name} must be an integer tensor of shape ({want},)")
    return q.shape[0], k.shape[0]
