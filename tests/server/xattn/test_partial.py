"""Partial attention + merge against full attention written out in the test (fp32, CPU), on
random awkward shapes: GQA (causal and not), absorbed MLA against the unabsorbed heads, empty
parts, and the query shift against keys rotated by an independent complex-number RoPE."""

from __future__ import annotations

import math

import pytest
import torch

from leyline.server.core.rope import RopeSpec
from leyline.server.core.xattn import (
    AttnSpec,
    Partial,
    empty_partial,
    merge_partials,
    partial_attention,
    shift_query,
)


def _full_attention(q, k, v, scale, mask=None):
    """Plain softmax attention per query head; q (T, H, D), k/v (N, H, *) already per head."""
    s = torch.einsum("thd,nhd->htn", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("htn,nhv->thv", torch.softmax(s, dim=-1), v.double())
    return o, lse.transpose(0, 1)


def _split(n: int, parts: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random disjoint, non-contiguous index sets covering range(n); the last one is empty."""
    owner = torch.randint(0, parts - 1, (n,), generator=gen)
    return [torch.nonzero(owner == i).flatten() for i in range(parts)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("hq", "hkv", "d", "dv"), [(6, 2, 40, 24), (5, 5, 33, 33), (9, 3, 72, 56)])
def test_gqa_partials_merge_to_full_attention(causal, hq, hkv, d, dv):
    gen = torch.Generator().manual_seed(hq * 100 + d + causal)
    t, n = 7, 53
    spec = AttnSpec.gqa(hq, hkv, d, v_head_dim=dv, rope_dim=d - d % 2)
    q = torch.randn(t, hq, d, generator=gen)
    k = torch.randn(n, hkv, d, generator=gen)
    v = torch.randn(n, hkv, dv, generator=gen)
    k_pos = torch.randperm(n, generator=gen)  # key positions in any order
    q_pos = torch.tensor([3, 10, 17, 30, 41, 50, 52])  # the first rows see few keys
    g = hq // hkv
    kh, vh = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = (k_pos[None, :] <= q_pos[:, None])[None] if causal else None
    want_o, want_lse = _full_attention(q, kh, vh, d**-0.5, mask)
    pos = {"q_pos": q_pos, "k_pos": k_pos} if causal else {}
    whole = partial_attention(q, k, v, spec, **pos)
    torch.testing.assert_close(whole.o, want_o.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(whole.lse, want_lse.float(), atol=2e-5, rtol=1e-5)
    parts = []
    for idx in _split(n, 4, gen):
        sub = {"q_pos": q_pos, "k_pos": k_pos[idx]} if causal else {}
        parts.append(partial_attention(q, k[idx], v[idx], spec, **sub))
    assert parts[-1].o.abs().max() == 0 and torch.isneginf(parts[-1].lse).all()
    merged = merge_partials(parts)
    torch.testing.assert_close(merged.o, want_o.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(merged.lse, want_lse.float(), atol=2e-5, rtol=1e-5)
    # and against torch's own attention (sdpa, per head, boolean mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kh.transpose(0, 1), vh.transpose(0, 1),
        attn_mask=mask[0] if causal else None,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(merged.o, sdpa, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("rank", "rope", "nope", "heads"), [(48, 16, 24, 5), (40, 8, 12, 3)])
def test_mla_absorbed_partials_equal_unabsorbed_attention(rank, rope, nope, heads):
    """DeepSeek-V2's weight absorption: latent queries over [c_kv | k_pe] rows, merged, then
    W_UV, equal the per-head attention over k = [c_kv W_UK | k_pe], v = c_kv W_UV."""
    gen = torch.Generator().manual_seed(rank + rope)
    t, n, v_dim = 5, 61, 20
    w_uk = torch.randn(heads, rank, nope, generator=gen) / math.sqrt(rank)
    w_uv = torch.randn(heads, rank, v_dim, generator=gen) / math.sqrt(rank)
    c_kv = torch.randn(n, rank, generator=gen)
    k_pe = torch.randn(n, rope, generator=gen)
    q_nope = torch.randn(t, heads, nope, generator=gen)
    q_pe = torch.randn(t, heads, rope, generator=gen)
    q_pos = torch.tensor([0, 12, 33, 59, 60])
    k_pos = torch.arange(n)
    mscale = 1.3
    scale = (nope + rope) ** -0.5 * mscale**2
    # unabsorbed oracle
    k_full = torch.cat(
        (torch.einsum("nr,hrd->nhd", c_kv, w_uk), k_pe[:, None].expand(n, heads, rope)), -1
    )
    v_full = torch.einsum("nr,hrv->nhv", c_kv, w_uv)
    q_full = torch.cat((q_nope, q_pe), -1)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]
    want, want_lse = _full_attention(q_full, k_full, v_full, scale, mask)
    # absorbed partials over a random split of the latent rows
    spec = AttnSpec.mla(heads, rank, rope, nope, mscale=mscale)
    assert spec.scale == pytest.approx(scale)
    q_lat = torch.cat((torch.einsum("thd,hrd->thr", q_nope, w_uk), q_pe), -1)
    rows = torch.cat((c_kv, k_pe), -1)[:, None]  # (N, 1, rank + rope): the pool's MLA row
    parts = [
        partial_attention(q_lat, rows[idx], None, spec, q_pos=q_pos, k_pos=k_pos[idx])
        for idx in _split(n, 3, gen)
    ]
    merged = merge_partials(parts)
    got = torch.einsum("thr,hrv->thv", merged.o, w_uv)
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(merged.lse, want_lse.float(), atol=2e-5, rtol=1e-5)


def _rope_at(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool):
    """Independent RoPE: complex multiplication by exp(i * pos * inv_freq) on the whole row."""
    xd = x.double()
    if interleaved:
        pairs = torch.view_as_complex(xd.reshape(*x.shape[:-1], -1, 2).contiguous())
    else:
        half = x.shape[-1] // 2
        pairs = torch.complex(xd[..., :half], xd[..., half:])
    angle = pos.double()[(...,) + (None,) * (x.dim() - pos.dim())] * inv_freq.double()
    y = pairs * torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        return torch.view_as_real(y).flatten(-2)
    return torch.cat((y.real, y.imag), -1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_shift_query_matches_moving_the_keys(interleaved):
    """Scores of Rot(-δ)q against keys cached at p equal scores of q against keys at p + δ."""
    gen = torch.Generator().manual_seed(7 + interleaved)
    rd, heads, n = 24, 4, 19
    inv = 10000.0 ** -(torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    rope = RopeSpec(rd, tuple(inv.tolist()), interleaved)
    spec = AttnSpec.gqa(heads, 1, rd)
    raw_k, raw_q = torch.randn(n, 1, rd, generator=gen), torch.randn(3, heads, rd, generator=gen)
    p_old, delta = torch.arange(40, 40 + n), -37
    k_old = _rope_at(raw_k, p_old, inv, interleaved).float()
    k_new = _rope_at(raw_k, p_old + delta, inv, interleaved).float()
    q = _rope_at(raw_q, torch.tensor([90, 91, 95]), inv, interleaved).float()
    moved = partial_attention(q, k_new, k_new, spec)
    shifted = partial_attention(shift_query(q, delta, spec, rope), k_old, k_new, spec)
    torch.testing.assert_close(shifted.lse, moved.lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shifted.o, moved.o, atol=1e-5, rtol=1e-5)
    unshifted = partial_attention(q, k_old, k_new, spec)  # the shift is not a no-op
    assert (unshifted.lse - moved.lse).abs().max() > 1e-2


def test_empty_and_fully_masked_rows():
    gen = torch.Generator().manual_seed(3)
    spec = AttnSpec.gqa(4, 2, 12)
    q = torch.randn(3, 4, 12, generator=gen)
    k, v = torch.randn(0, 2, 12), torch.randn(0, 2, 12)
    empty = partial_attention(q, k, v, spec)
    ref = empty_partial(3, spec)
    assert torch.equal(empty.o, ref.o) and torch.equal(empty.lse, ref.lse)
    k, v = torch.randn(5, 2, 12, generator=gen), torch.randn(5, 2, 12, generator=gen)
    # row 0 sees no key (all keys later), rows 1-2 see some
    part = partial_attention(
        q, k, v, spec, q_pos=torch.tensor([9, 10, 14]), k_pos=torch.arange(10, 15)
    )
    assert torch.isneginf(part.lse[0]).all() and part.o[0].abs().max() == 0
    assert torch.isfinite(part.lse[1:]).all() and not torch.isnan(part.o).any()
    # merging with an empty partial (whatever its o holds) changes nothing; all-empty stays empty
    junk = Partial(torch.randn(3, 4, 12, generator=gen), ref.lse)
    merged = merge_partials([junk, part])
    torch.testing.assert_close(merged.o, part.o)
    torch.testing.assert_close(merged.lse, part.lse)
    both = merge_partials([junk, ref])
    assert both.o.abs().max() == 0 and torch.isneginf(both.lse).all()


def test_spec_and_shape_errors():
    with pytest.raises(ValueError, match="multiple"):
        AttnSpec.gqa(6, 4, 16)
    with pytest.raises(ValueError, match="rotary"):
        AttnSpec.gqa(4, 2, 16, rope_dim=12, rope_offset=8)
    spec = AttnSpec.mla(16, 512, 64, 128)
    assert (spec.qk_dim, spec.v_dim, spec.rope_offset) == (576, 512, 512)
    assert spec.query_bytes(2) == 16 * 576 * 2  # the ~1 KB per head of the brief
    assert spec.kv_layout(27).head_dim == 576
    q = torch.randn(2, 16, 576)
    with pytest.raises(ValueError, match="v must be None"):
        partial_attention(q, torch.randn(4, 1, 576), torch.randn(4, 1, 512), spec)
    with pytest.raises(ValueError, match="both q_pos and k_pos"):
        partial_attention(q, torch.randn(4, 1, 576), None, spec, q_pos=torch.arange(2))
