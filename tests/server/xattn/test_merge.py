"""Merge kernel: Triton (interpreter on CPU, native on CUDA) vs the torch reference vs the
attention over the union written out in the test, on random awkward shapes with empty parts."""

from __future__ import annotations

import pytest
import torch

from leyline.server.core.xattn import merge as merge_mod
from leyline.server.core.xattn import merge_ref, merge_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(merge_mod.triton is None, reason="triton is not installed")


def _parts(p: int, r: int, d: int, n: int, gen: torch.Generator):
    """Partials of r rows over p disjoint random key sets (one empty), plus the union's truth."""
    s = torch.randn(r, n, generator=gen, dtype=torch.float64) * 3
    vals = torch.randn(n, d, generator=gen, dtype=torch.float64)
    owner = torch.randint(0, p - 1, (n,), generator=gen)  # part p-1 stays empty
    os, lses = [], []
    for i in range(p):
        si = s.masked_fill((owner != i)[None, :], float("-inf"))
        lse = torch.logsumexp(si, -1)
        w = torch.exp(si - torch.where(torch.isfinite(lse), lse, 0)[:, None])
        o = w @ vals
        if i == p - 1:
            o = torch.randn(r, d, generator=gen, dtype=torch.float64)  # junk under lse = -inf
        os.append(o)
        lses.append(lse)
    want_o = torch.softmax(s, -1) @ vals
    return (
        torch.stack(os).float(),
        torch.stack(lses).float(),
        want_o.float(),
        torch.logsumexp(s, -1).float(),
    )


@needs_triton
def test_triton_runs_interpreted_on_cpu_and_compiled_on_cuda():
    assert merge_mod._interpreted() == (DEVICE == "cpu")


@needs_triton
@pytest.mark.parametrize(("p", "r", "d"), [(3, 37, 40), (2, 5, 72), (5, 19, 24)])
def test_triton_merge_matches_reference_and_union(p, r, d):
    gen = torch.Generator().manual_seed(p * r + d)
    o, lse, want_o, want_lse = _parts(p, r, d, 29, gen)
    ref_o, ref_lse = merge_ref(o, lse)
    torch.testing.assert_close(ref_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_lse, want_lse, atol=1e-5, rtol=1e-5)
    got_o, got_lse = merge_triton(o.to(DEVICE), lse.to(DEVICE), block_r=8)
    torch.testing.assert_close(got_o.cpu(), ref_o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_lse.cpu(), ref_lse, atol=1e-6, rtol=1e-6)


@needs_triton
def test_triton_merge_bf16_parts_and_all_empty_rows():
    gen = torch.Generator().manual_seed(11)
    o, lse, _, _ = _parts(3, 13, 40, 17, gen)
    lse[:, 4] = float("-inf")  # a row no part can see: o = 0, lse = -inf, no nan
    o_bf = o.to(torch.bfloat16)
    ref_o, ref_lse = merge_ref(o_bf, lse)
    got_o, got_lse = merge_triton(o_bf.to(DEVICE), lse.to(DEVICE), block_r=4)
    assert got_o.dtype == torch.float32 and not torch.isnan(got_o).any()
    assert got_o[4].abs().max() == 0 and torch.isneginf(got_lse[4])
    torch.testing.assert_close(got_o.cpu(), ref_o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_lse.cpu(), ref_lse, atol=1e-6, rtol=1e-6)


def test_merge_checks():
    with pytest.raises(ValueError, match="lse must be fp32"):
        merge_ref(torch.randn(2, 3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        merge_ref(torch.randn(0, 3, 4), torch.randn(0, 3))
