"""Merge: combine the partial attentions of disjoint key sets into the attention over their union.

Algorithm. For ``P`` partials ``(o_i, lse_i)`` of the same query rows (:mod:`.partial`), per
row and head::

    m   = max_i lse_i                       (0 when every lse_i is -inf)
    w_i = exp(lse_i - m)
    lse = m + log Σ w_i                     (-inf when every part is empty)
    o   = Σ w_i o_i / Σ w_i                 (0 when every part is empty)

in fp32, exact up to rounding: softmax over a union is the lse-weighted mix of the softmaxes
over its parts. An empty part (``lse = -inf``) has weight 0 whatever its ``o`` holds.

Layouts. ``o: (P, R, D)`` with ``R`` = query rows x heads flattened, ``D`` = value width (fp32,
fp16 or bf16; what a holder returned), ``lse: (P, R)`` fp32; both contiguous. Output
``o: (R, D)`` fp32 and ``lse: (R,)`` fp32.

Kernel. Grid ``(cdiv(R, BLOCK_R),)``: a program loads ``P x BLOCK_R`` lse values, forms the
weights, then walks ``D`` in ``BLOCK_D`` columns accumulating ``Σ w_i o_i`` over the parts.
Bytes moved: ``P * R * (D * itemsize + 4)`` read, ``R * (4 D + 4)`` written; it is a
bandwidth-bound reduction (FlashInfer's ``merge_states`` does the same job on GPU).

Example::

    o, lse = merge_states(o_parts, lse_parts)      # (P, R, D), (P, R) -> (R, D), (R,)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leyline.server.core.xattn.partial import Partial

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works without triton
    triton = None

__all__ = ["merge_partials", "merge_ref", "merge_states", "merge_triton"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(o: Tensor, lse: Tensor) -> tuple[int, int, int]:
    if o.dim() != 3:
        raise ValueError(f"o must be (parts, rows, dim), got {tuple(o.shape)}")
    p, r, d = o.shape
    if p < 1:
        raise ValueError("merge needs at least one partial")
    if o.dtype not in _DTYPES:
        raise ValueError(f"o must be fp16/bf16/fp32, got {o.dtype}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (p, r):
        raise ValueError(f"lse must be fp32 ({p}, {r}), got {lse.dtype} {tuple(lse.shape)}")
    if lse.device != o.device:
        raise ValueError(f"lse is on {lse.device}, o on {o.device}")
    return p, r, d


# --------------------------------------------------------------------------- torch reference
def merge_ref(o: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge in plain torch (see module doc); ``o: (P, R, D)``, ``lse: (P, R)``."""
    _check(o, lse)
    m = lse.max(dim=0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # (P, R); exactly 0 for empty parts
    total = w.sum(dim=0)
    out = (w.unsqueeze(-1) * o.float()).sum(dim=0) / torch.where(total > 0, total, 1.0)[:, None]
    return out, m + torch.log(total)


# --------------------------------------------------------------------------- triton kernel
if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _merge_kernel(  # type: ignore[no-untyped-def]
        o_ptr, lse_ptr, out_ptr, out_lse_ptr,
        R, D,
        stride_op, stride_or, stride_lp,
        P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        parts = tl.arange(0, BLOCK_P)
        r_mask = rows < R
        pr_mask = (parts < P)[:, None] & r_mask[None, :]
        lse = tl.load(lse_ptr + parts[:, None] * stride_lp + rows[None, :], mask=pr_mask,
                      other=float("-inf"))  # fmt: skip
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse - m[None, :])  # (BLOCK_P, BLOCK_R); 0 for empty or padded parts
        total = tl.sum(w, axis=0)
        seen = total > 0
        safe = tl.where(seen, total, 1.0)
        tl.store(out_lse_ptr + rows, tl.where(seen, m + tl.log(safe), float("-inf")), mask=r_mask)
        inv = 1.0 / safe
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = pr_mask[:, :, None] & (cols < D)[None, None, :]
            ptrs = (o_ptr + parts[:, None, None] * stride_op + rows[None, :, None] * stride_or
                    + cols[None, None, :])  # fmt: skip
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.sum(w[:, :, None] * x, axis=0) * inv[:, None]
            out_mask = r_mask[:, None] & (cols < D)[None, :]
            tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc, mask=out_mask)


def _interpreted() -> bool:
    """Whether triton decorated the kernel for its CPU interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and type(_merge_kernel).__name__ == "InterpretedFunction"


def merge_triton(o: Tensor, lse: Tensor, *, block_r: int = 16) -> tuple[Tensor, Tensor]:
    """Merge with one Triton launch (see module doc); CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``."""
    if triton is None:
        raise RuntimeError("merge_triton needs triton: pip install 'leyline[server]'")
    p, r, d = _check(o, lse)
    if not (o.is_contiguous() and lse.is_contiguous()):
        raise ValueError("merge_triton needs contiguous o and lse")
    if (o.device.type == "cpu") != _interpreted():
        raise RuntimeError(
            "the Triton merge runs CUDA tensors natively, or CPU tensors under "
            "TRITON_INTERPRET=1 (set before triton is imported); use merge_ref otherwise"
        )
    out = torch.empty(r, d, dtype=torch.float32, device=o.device)
    out_lse = torch.empty(r, dtype=torch.float32, device=o.device)
    if r == 0:
        return out, out_lse
    block_p = int(triton.next_power_of_2(p))
    # NOTE: keep a program's tile (parts x rows x cols) near 4K fp32 values: registers on GPU.
    block_d = max(16, min(int(triton.next_power_of_2(d)), 4096 // (block_p * block_r)))
    grid = (triton.cdiv(r, block_r),)
    _merge_kernel[grid](o, lse, out, out_lse, r, d, o.stride(0), o.stride(1), lse.stride(0),
                        P=p, BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_D=block_d)  # fmt: skip
    return out, out_lse


def merge_states(o: Tensor, lse: Tensor, *, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Merge ``P`` partials: ``o (P, R, D)``, ``lse (P, R)`` -> ``o (R, D)`` fp32, ``lse (R,)``.

    ``impl``: "torch", "triton" or "auto" (Triton on CUDA, torch on CPU: the interpreter is for
    tests, not speed).
    """
    if impl == "auto":
        impl = "triton" if triton is not None and o.is_cuda and not _interpreted() else "torch"
    if impl == "torch":
        return merge_ref(o, lse)
    if impl == "triton":
        return merge_triton(o.contiguous(), lse.contiguous())
    raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")


def merge_partials(parts: Sequence[Partial], *, impl: str = "auto") -> Partial:
    """Merge partials of the same query rows, each ``o (T, H, D)``, ``lse (T, H)``.

    Example: ``merge_partials([local, remote])`` is the attention over both key sets.
    """
    if not parts:
        raise ValueError("merge_partials needs at least one partial")
    t, h, d = parts[0].o.shape
    if any(tuple(p.o.shape) != (t, h, d) or tuple(p.lse.shape) != (t, h) for p in parts):
        raise ValueError("partials to merge must share their (T, H, D) shape")
    o = torch.stack([p.o.reshape(t * h, d) for p in parts])
    lse = torch.stack([p.lse.reshape(t * h) for p in parts])
    out, out_lse = merge_states(o, lse, impl=impl)
    return Partial(out.reshape(t, h, d), out_lse.reshape(t, h))
