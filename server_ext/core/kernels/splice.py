"""Splice: copy the KV of ``n`` tokens to new slots for every layer, re-rotating the keys.

Algorithm. For each token ``t`` and layer ``l``::

    K[l][dst[t]] = K[l][src[t]] with its rotary dims rotated by delta[t]
    V[l][dst[t]] = V[l][src[t]]                       (bit-exact; MLA has no V)

The rotary dims are ``[rope_offset, rope_offset + rope_dim)`` of every K head. They form
``rope_dim / 2`` pairs ``(x1, x2)``: neox style pairs ``(i, i + rope_dim/2)``, interleaved
(GPT-J / DeepSeek) style pairs ``(2i, 2i + 1)``. Pair ``j`` turns by ``a = delta * inv_freq[j]``
(computed in fp32)::

    x1' = x1 cos a - x2 sin a,   x2' = x2 cos a + x1 sin a

in fp32, rounded once to the storage dtype. Every other K dim, V and the MLA latent are copied
bit-exactly. Because ``Rot(a) Rot(b) = Rot(a + b)``, callers always rotate from the original
cached key by the total shift (never chain splices: bf16 re-rounding would accumulate).

Layouts (SGLang pools, see :mod:`leyline.server.core.layout`): one tensor per layer,
``k[l]: (slots, kv_heads, head_dim)``, ``v[l]: (slots, kv_heads, v_head_dim)``; MLA
``kv[l]: (slots, 1, kv_lora_rank + rope_dim)`` with ``v=None``. Last dim contiguous.

Kernel. One launch covers all layers: grid ``(cdiv(n, BLOCK_T), layers, 2 if V else 1)``; a
program moves ``BLOCK_T`` tokens x all heads of one layer's K (axis 2 = 0) or V (= 1). The
layers are separate allocations, so the kernel reads each layer's offset from ``k[0]`` in a
small int64 device table (:class:`KVPointers`, built once per pool by :func:`kv_pointers`).
Angles and sin/cos are computed per program for ``BLOCK_T x rope_dim/2`` and broadcast over
heads. Rounding to the storage dtype is round-to-nearest-even, as torch (the Triton
interpreter truncates instead, so interpreted results may sit one bf16 ulp off).

Bytes moved: ``n * layout.bytes_per_token(itemsize)`` read plus the same written (plus 24 B of
indices per token, packed by the launcher into one ``(3, n)`` int64 buffer so that every call
runs the same compiled variant), i.e. exactly a gather/scatter copy; the rotation is free when
the kernel is bandwidth bound. Preconditions the launcher cannot check without a device sync: slot
indices in range, ``dst`` disjoint from ``src`` and free of duplicates.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leyline.server.core.layout import KVLayout

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the torch path still works without triton
    triton = None

__all__ = ["KVPointers", "kv_pointers", "splice_kv", "splice_kv_ref", "splice_kv_triton"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ELEMS_PER_PROGRAM = 4096  # K elements one program moves; ~8 KB of bf16


def _interpreted() -> bool:
    """Whether the kernel was built for the Triton interpreter (decided when triton decorated it,
    i.e. by TRITON_INTERPRET=1 at import time): it then runs on CPU tensors only."""
    return triton is not None and type(_splice_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------- checks
def _check_args(
    k: Sequence[Tensor],
    v: Sequence[Tensor] | None,
    src: Tensor,
    dst: Tensor,
    delta: Tensor,
    layout: KVLayout,
    inv_freq: Tensor,
) -> int:
    """O(1) checks of the call against the layout (k[0]/v[0] stand for all layers, see
    :func:`_check_layers`); return the number of tokens."""
    if len(k) != layout.num_layers:
        raise ValueError(f"expected {layout.num_layers} K layers, got {len(k)}")
    if layout.has_values != (v is not None):
        raise ValueError(f"{layout.kind} pool: v must be {'given' if layout.has_values else None}")
    if v is not None and len(v) != layout.num_layers:
        raise ValueError(f"expected {layout.num_layers} V layers, got {len(v)}")
    k0 = k[0]
    if k0.dtype not in _DTYPES:
        fp8 = "float8" in str(k0.dtype)
        hint = " (fp8 pools carry per-tensor scales; rotating them is not supported)" if fp8 else ""
        raise ValueError(f"splice supports fp16/bf16/fp32 KV pools, got {k0.dtype}{hint}")
    firsts = [("k", k0, layout.head_dim)] + ([("v", v[0], layout.v_head_dim)] if v else [])
    for name, first, width in firsts:
        want = (layout.kv_heads, width)
        if first.dim() != 3 or tuple(first.shape[1:]) != want:
            raise ValueError(f"{name}[0] must be (slots, {want[0]}, {want[1]}), got {first.shape}")
    n = src.numel()
    for name, idx in (("src", src), ("dst", dst), ("delta", delta)):
        if idx.dim() != 1 or idx.numel() != n:
            raise ValueError(f"{name} must be 1-D with {n} entries (like src), got {idx.shape}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {idx.dtype}")
        if idx.device != k0.device:
            raise ValueError(f"{name} is on {idx.device}, the pool on {k0.device}")
    if inv_freq.dtype != torch.float32 or tuple(inv_freq.shape) != (layout.rope_dim // 2,):
        raise ValueError(f"inv_freq must be fp32 ({layout.rope_dim // 2},), got {inv_freq.shape}")
    if inv_freq.device != k0.device:
        raise ValueError(f"inv_freq is on {inv_freq.device}, the pool on {k0.device}")
    return n


def _check_layers(k: Sequence[Tensor], v: Sequence[Tensor] | None) -> None:
    """Every layer like the first (dtype, device, shape, strides), last dim contiguous."""
    for name, tensors in (("k", k), ("v", v or ())):
        if not tensors:
            continue
        first = tensors[0]
        if first.stride(-1) != 1:
            raise ValueError(f"{name} layers need a contiguous last dim")
        for i, t in enumerate(tensors):
            if t.dtype != k[0].dtype or t.device != k[0].device:
                raise ValueError(f"{name}[{i}] is {t.dtype} on {t.device}; k[0] is {k[0].dtype}")
            if t.shape != first.shape or t.stride() != first.stride():
                raise ValueError(f"{name}[{i}] shape/strides differ from {name}[0]")


# --------------------------------------------------------------------------- torch reference
def _rotate_ref(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate the pairs of ``x`` (..., rope_dim) in fp32; ``cos``/``sin`` broadcast to pairs."""
    x = x.float()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if interleaved:
        return torch.stack((y1, y2), dim=-1).flatten(-2)
    return torch.cat((y1, y2), dim=-1)


def splice_kv_ref(
    k: Sequence[Tensor],
    v: Sequence[Tensor] | None,
    src: Tensor,
    dst: Tensor,
    delta: Tensor,
    *,
    layout: KVLayout,
    inv_freq: Tensor,
    interleaved: bool,
) -> None:
    """Plain torch splice, one layer at a time: gather, fp32 rotate, scatter (see module doc)."""
    n = _check_args(k, v, src, dst, delta, layout, inv_freq)
    _check_layers(k, v)
    if n == 0:
        return
    src, dst = src.long(), dst.long()
    angle = delta.to(torch.float32)[:, None] * inv_freq[None, :]  # (n, rope_dim/2), fp32
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    lo, hi = layout.rope_offset, layout.rope_offset + layout.rope_dim
    for layer in range(layout.num_layers):
        rows = k[layer].index_select(0, src)
        if layout.rope_dim:
            rot = _rotate_ref(rows[..., lo:hi], cos, sin, interleaved)
            rows[..., lo:hi] = rot.to(rows.dtype)
        k[layer].index_copy_(0, dst, rows)
        if v is not None:
            v[layer].index_copy_(0, dst, v[layer].index_select(0, src))


# --------------------------------------------------------------------------- triton kernel
if triton is not None:

    @triton.jit
    def _copy_cols(src_row, dst_row, row_mask, COL0: tl.constexpr, NCOLS: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
        """Copy columns [COL0, COL0 + NCOLS) of (BLOCK_T, BLOCK_H) rows, bits unchanged."""
        cols = COL0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, :, None] & (cols < COL0 + NCOLS)[None, None, :]
        x = tl.load(src_row[:, :, None] + cols[None, None, :], mask=mask)
        tl.store(dst_row[:, :, None] + cols[None, None, :], x, mask=mask)

    # NOTE: ``n`` is not specialized (Triton would otherwise build variants for n == 1 and
    # n % 16 == 0), and the indices arrive packed in one launcher-owned buffer, so no argument's
    # alignment or value varies between calls: one compiled variant per pool (a recompile inside
    # SGLang's scheduler stalled it 0.6-0.9 s).
    @triton.jit(do_not_specialize=["n"])
    def _splice_kernel(
        k_table_ptr, v_table_ptr, base_ptr,  # per-layer offsets (in UNITs) from base_ptr = k[0]
        idx_ptr,  # (3, n) int64: src slots, dst slots, delta
        inv_freq_ptr,
        n,
        stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
        KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
        ROPE_OFFSET: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
        BLOCK_PRE: tl.constexpr,  # pass-through cols [0, ROPE_OFFSET)
        POST_START: tl.constexpr, POST: tl.constexpr, BLOCK_POST: tl.constexpr,
        V_DIM: tl.constexpr, BLOCK_V: tl.constexpr,
        INTERLEAVED: tl.constexpr, HAS_V: tl.constexpr, UNIT: tl.constexpr,
        BLOCK_T: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    ):  # fmt: skip
        layer = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < n
        src = tl.load(idx_ptr + t, mask=t_mask, other=0)
        dst = tl.load(idx_ptr + n + t, mask=t_mask, other=0)
        h = tl.arange(0, BLOCK_H)
        row_mask = t_mask[:, None] & (h < KV_HEADS)[None, :]
        if tl.program_id(2) == 0:
            # NOTE: offsets are stored in UNITs of 16 B so the compiler sees 16 B-aligned rows and
            # vectorizes; an int-to-pointer cast would lose that alignment information.
            base = base_ptr + tl.load(k_table_ptr + layer) * UNIT
            src_row = base + src[:, None] * stride_k_slot + h[None, :] * stride_k_head
            dst_row = base + dst[:, None] * stride_k_slot + h[None, :] * stride_k_head
            if ROPE_OFFSET > 0:
                _copy_cols(src_row, dst_row, row_mask, 0, ROPE_OFFSET, BLOCK_PRE)
            if POST > 0:
                _copy_cols(src_row, dst_row, row_mask, POST_START, POST, BLOCK_POST)
            if HALF > 0:
                j = tl.arange(0, BLOCK_HALF)
                d = tl.load(idx_ptr + 2 * n + t, mask=t_mask, other=0).to(tl.float32)
                freq = tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
                angle = d[:, None] * freq[None, :]  # fp32, as the reference
                if USE_LIBDEVICE:  # NOTE: full-range accurate sin/cos (angles reach 1e4 rad)
                    cos, sin = libdevice.cos(angle), libdevice.sin(angle)
                else:
                    cos, sin = tl.cos(angle), tl.sin(angle)
                cos, sin = cos[:, None, :], sin[:, None, :]
                if INTERLEAVED:
                    col1 = ROPE_OFFSET + 2 * j
                    col2 = col1 + 1
                else:
                    col1 = ROPE_OFFSET + j
                    col2 = col1 + HALF
                mask = row_mask[:, :, None] & (j < HALF)[None, None, :]
                p1, p2 = col1[None, None, :], col2[None, None, :]
                x1 = tl.load(src_row[:, :, None] + p1, mask=mask).to(tl.float32)
                x2 = tl.load(src_row[:, :, None] + p2, mask=mask).to(tl.float32)
                out_ty = base_ptr.dtype.element_ty
                tl.store(dst_row[:, :, None] + p1, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
                tl.store(dst_row[:, :, None] + p2, (x2 * cos + x1 * sin).to(out_ty), mask=mask)
        elif HAS_V:
            base = base_ptr + tl.load(v_table_ptr + layer) * UNIT
            src_row = base + src[:, None] * stride_v_slot + h[None, :] * stride_v_head
            dst_row = base + dst[:, None] * stride_v_slot + h[None, :] * stride_v_head
            _copy_cols(src_row, dst_row, row_mask, 0, V_DIM, BLOCK_V)


@dataclass(frozen=True, slots=True)
class KVPointers:
    """Offsets of every layer of one pool from ``k[0]``, in ``unit`` elements (16 B if aligned).

    Build once per pool with :func:`kv_pointers` and pass to every splice: per-call host work
    drops to O(1) checks plus an identity test of the layers, with no host-to-device copy, so
    the splice can be captured in a CUDA graph. Holding the layers keeps the tables from ever
    pointing to freed memory; swapping a layer's storage in place (``set_``) invalidates them.
    """

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...] | None
    k_table: Tensor
    v_table: Tensor | None
    unit: int

    def matches(self, k: Sequence[Tensor], v: Sequence[Tensor] | None) -> bool:
        """Whether ``k``/``v`` are the very tensors the tables were built for."""

        def same(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
            return len(a) == len(b) and all(map(operator.is_, a, b))

        if v is None or self.v is None:
            return v is None and self.v is None and same(k, self.k)
        return same(k, self.k) and same(v, self.v)


def kv_pointers(k: Sequence[Tensor], v: Sequence[Tensor] | None) -> KVPointers:
    """Check a pool's layers and build its offset tables (one small host-to-device copy)."""
    _check_layers(k, v)
    return _build_pointers(k, v)


def _build_pointers(k: Sequence[Tensor], v: Sequence[Tensor] | None) -> KVPointers:
    addresses = [t.data_ptr() for t in (*k, *(v or ()))]
    size = k[0].element_size()
    unit = 16 if all(a % 16 == 0 for a in addresses) else size
    if any(a % size for a in addresses):
        raise ValueError("every layer's address must be a multiple of its element size")

    def table(ts: Sequence[Tensor]) -> Tensor:
        offs = [(t.data_ptr() - addresses[0]) // unit for t in ts]
        return torch.tensor(offs, dtype=torch.int64).to(ts[0].device)

    vs = (tuple(v), table(v)) if v is not None else (None, None)
    return KVPointers(tuple(k), vs[0], table(k), vs[1], unit // size)


def _pow2(x: int) -> int:
    return int(triton.next_power_of_2(max(x, 1)))


def splice_kv_triton(
    k: Sequence[Tensor],
    v: Sequence[Tensor] | None,
    src: Tensor,
    dst: Tensor,
    delta: Tensor,
    *,
    layout: KVLayout,
    inv_freq: Tensor,
    interleaved: bool,
    pointers: KVPointers | None = None,
    block_t: int | None = None,
    num_warps: int = 2,
) -> None:
    """Fused splice, one Triton launch for all layers (see module doc).

    ``pointers`` (from :func:`kv_pointers`) avoids rebuilding the address tables per call and
    is required for CUDA-graph capture. ``block_t``/``num_warps`` are tuning knobs.
    """
    if triton is None:
        raise RuntimeError("splice_kv_triton needs triton: pip install 'leyline[server]'")
    n = _check_args(k, v, src, dst, delta, layout, inv_freq)
    if pointers is None:
        _check_layers(k, v)
    elif not pointers.matches(k, v):
        raise ValueError("KVPointers was built for other tensors; rebuild it with kv_pointers()")
    if n == 0:
        return
    on_cpu = k[0].device.type == "cpu"
    if on_cpu != _interpreted():
        raise RuntimeError(
            "the Triton splice runs CUDA tensors natively, or CPU tensors under "
            "TRITON_INTERPRET=1 (set before triton is imported); use impl='torch' otherwise"
        )
    if pointers is None:
        pointers = _build_pointers(k, v)
    grid, args, meta = _kernel_args(k, v, src, dst, delta, layout, inv_freq, interleaved,
                                    pointers, block_t, on_cpu)  # fmt: skip
    _splice_kernel[grid](*args, **meta, num_warps=num_warps)


def _kernel_args(
    k: Sequence[Tensor],
    v: Sequence[Tensor] | None,
    src: Tensor,
    dst: Tensor,
    delta: Tensor,
    layout: KVLayout,
    inv_freq: Tensor,
    interleaved: bool,
    pointers: KVPointers,
    block_t: int | None,
    on_cpu: bool,
) -> tuple[tuple[int, int, int], tuple[object, ...], dict[str, object]]:
    """Grid, runtime arguments and constexprs of one launch (also read by the specialization
    test: the runtime arguments must look the same to Triton for any ``n`` and any slicing)."""
    half = layout.rope_dim // 2
    post_start = layout.rope_offset + layout.rope_dim
    width = layout.rope_offset + 2 * _pow2(half) + (layout.head_dim - post_start)
    block_h = _pow2(layout.kv_heads)
    if block_t is None:
        block_t = min(64, max(1, _pow2(_ELEMS_PER_PROGRAM // (block_h * width) + 1) // 2))
    n = src.numel()
    kv = v[0] if v is not None else k[0]
    grid = (triton.cdiv(n, block_t), layout.num_layers, 2 if v is not None else 1)
    # One fresh (hence aligned) int64 buffer: slices of SGLang's free list arrive at any offset.
    idx = torch.stack((src.to(torch.int64), dst.to(torch.int64), delta.to(torch.int64)))
    args = (
        pointers.k_table, pointers.v_table if v is not None else pointers.k_table, k[0],
        idx, inv_freq, n,
        k[0].stride(0), k[0].stride(1), kv.stride(0), kv.stride(1),
    )  # fmt: skip
    meta: dict[str, object] = dict(
        KV_HEADS=layout.kv_heads, BLOCK_H=block_h,
        ROPE_OFFSET=layout.rope_offset, HALF=half, BLOCK_HALF=_pow2(half),
        BLOCK_PRE=_pow2(layout.rope_offset),
        POST_START=post_start, POST=layout.head_dim - post_start,
        BLOCK_POST=_pow2(layout.head_dim - post_start),
        V_DIM=layout.v_head_dim, BLOCK_V=_pow2(layout.v_head_dim),
        INTERLEAVED=interleaved, HAS_V=v is not None, UNIT=pointers.unit,
        BLOCK_T=block_t, USE_LIBDEVICE=not on_cpu,
    )  # fmt: skip
    return grid, args, meta


def splice_kv(
    k: Sequence[Tensor],
    v: Sequence[Tensor] | None,
    src: Tensor,
    dst: Tensor,
    delta: Tensor,
    *,
    layout: KVLayout,
    inv_freq: Tensor,
    interleaved: bool,
    impl: str = "auto",
    pointers: KVPointers | None = None,
) -> None:
    """Copy the KV of ``n`` tokens from slots ``src`` to ``dst`` for all layers, rotating keys.

    ``src``/``dst``: int (n,) slots, disjoint; ``delta``: int32/int64 (n,) position shift per
    token; ``inv_freq``: fp32 (rope_dim // 2,); layouts and rotation as in the module doc.
    ``impl``: "torch", "triton" or "auto" (triton on CUDA, and on CPU under TRITON_INTERPRET=1;
    torch otherwise). ``pointers``: see :class:`KVPointers` (triton only).

    Example::

        splice_kv(k_pool, v_pool, src, dst, dst - src, layout=layout, inv_freq=inv_freq,
                  interleaved=False)
    """
    if impl == "auto":
        on_cpu = k[0].device.type == "cpu"
        usable = on_cpu == _interpreted() and (on_cpu or k[0].is_cuda)
        impl = "triton" if triton is not None and usable else "torch"
    if impl == "torch":
        splice_kv_ref(k, v, src, dst, delta, layout=layout, inv_freq=inv_freq,
                      interleaved=interleaved)  # fmt: skip
    elif impl == "triton":
        splice_kv_triton(k, v, src, dst, delta, layout=layout, inv_freq=inv_freq,
                         interleaved=interleaved, pointers=pointers)  # fmt: skip
    else:
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
