"""Splice kernel: Triton (interpreter on CPU, native on CUDA) vs torch reference vs an analytic
complex-number reference, on random non-zero pools of awkward shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from leyline.server.core.kernels import kv_pointers, splice_kv, splice_kv_ref, splice_kv_triton
from leyline.server.core.kernels import splice as splice_mod
from leyline.server.core.layout import KVLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(splice_mod.triton is None, reason="triton is not installed")


@needs_triton
def test_triton_runs_interpreted_on_cpu_and_compiled_on_cuda():
    """tests/conftest.py sets TRITON_INTERPRET=1 on CPU before anything imports a kernel; if that
    ever breaks, the kernel tests below must fail here rather than be skipped."""
    assert splice_mod._interpreted() == (DEVICE == "cpu")


LAYOUTS = {
    # partial rotary (rope 32 of 80), 3 layers, 3 kv heads, V narrower than K, padded head stride
    "gqa_partial": (KVLayout("mha", 3, 3, 80, 48, 0, 32), 8),
    # rotary block in the middle of the head: both pass-through spans are used
    "gqa_middle": (KVLayout("mha", 2, 2, 56, 56, 16, 24), 0),
    # MLA row: 96 latent dims, then 32 rotary dims
    "mla": (KVLayout("mla", 3, 1, 128, 0, 96, 32), 0),
    # whole head rotates
    "gqa_full": (KVLayout("mha", 2, 5, 64, 64, 0, 64), 0),
}
SLOTS = 61


def _inv_freq(rope_dim: int) -> torch.Tensor:
    exps = torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim
    return (10000.0**-exps).to(torch.float32).to(DEVICE)


def _pool(layout: KVLayout, dtype: torch.dtype, pad: int, gen: torch.Generator):
    def layer(width: int) -> torch.Tensor:
        x = torch.randn(SLOTS, layout.kv_heads, width + pad, generator=gen) * 3
        x[x.abs() < 1e-3] = 0.5  # non-zero data ...
        x[::7, :, ::5] = -0.0  # ... except signed zeros, which a bit-exact copy must keep
        return x.to(dtype).to(DEVICE)[..., :width]

    k = [layer(layout.head_dim) for _ in range(layout.num_layers)]
    v = [layer(layout.v_head_dim) for _ in range(layout.num_layers)] if layout.has_values else None
    return k, v


def _indices(n: int, scattered: bool, gen: torch.Generator):
    if scattered:
        perm = torch.randperm(SLOTS - 1, generator=gen) + 1
        src, dst = perm[:n], perm[n : 2 * n]
    else:
        src, dst = torch.arange(1, 1 + n), torch.arange(SLOTS - n, SLOTS)
    delta = torch.randint(-60, 61, (n,), generator=gen)
    delta[0], delta[-1] = 3001, -2477  # large shifts: angles of thousands of radians
    return src.to(DEVICE), dst.to(DEVICE), delta.to(DEVICE)


def _analytic(rows: torch.Tensor, delta, inv_freq, layout: KVLayout, interleaved: bool):
    """Independent reference: each pair as a complex number times exp(i a), in float64."""
    lo, half = layout.rope_offset, layout.rope_dim // 2
    rope = rows[..., lo : lo + layout.rope_dim].double()
    pairs = rope.unflatten(-1, (half, 2)) if interleaved else rope.unflatten(-1, (2, half)).mT
    z = torch.view_as_complex(pairs.contiguous())
    angle = (delta.to(torch.float32)[:, None] * inv_freq[None, :]).double()  # fp32 angle (spec)
    z = z * torch.exp(1j * angle)[:, None, :]
    turned = torch.view_as_real(z)
    turned = turned.flatten(-2) if interleaved else turned.mT.flatten(-2)
    out = rows.clone()
    out[..., lo : lo + layout.rope_dim] = turned.to(rows.dtype)
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def _tols(dtype: torch.dtype) -> dict[str, float]:
    # bf16: one rounding apart (fp32 vs fp64 before the single rounding); fp32: sin/cos ulps
    return (
        {"rtol": 2**-7, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 3e-6}
    )


def _run_case(name, dtype, interleaved, scattered, impls, seed=0, n=13):
    layout, pad = LAYOUTS[name]
    gen = torch.Generator().manual_seed(seed)
    k0, v0 = _pool(layout, dtype, pad, gen)
    src, dst, delta = _indices(n, scattered, gen)
    inv_freq = _inv_freq(layout.rope_dim)
    want = [_analytic(t[src], delta, inv_freq, layout, interleaved) for t in k0]
    outs = {}
    for impl in impls:
        k = [t.clone() for t in k0]
        v = [t.clone() for t in v0] if v0 is not None else None
        for t in (*k, *(v or ())):
            t[dst] = float("nan")  # poison: every destination element must be written
        splice_kv(k, v, src, dst, delta, layout=layout, inv_freq=inv_freq,
                  interleaved=interleaved, impl=impl)  # fmt: skip
        outs[impl] = k
        others = torch.ones(SLOTS, dtype=torch.bool, device=DEVICE)
        others[dst] = False
        lo, hi = layout.rope_offset, layout.rope_offset + layout.rope_dim
        for layer in range(layout.num_layers):
            got, orig = k[layer], k0[layer]
            assert torch.equal(_bits(got[others]), _bits(orig[others])), "non-dst slots changed"
            assert not got[dst].isnan().any(), f"{impl}: unwritten K elements"
            moved = orig[src]
            for a, b in ((0, lo), (hi, layout.head_dim)):  # pass-through dims: bit-exact
                assert torch.equal(_bits(got[dst][..., a:b]), _bits(moved[..., a:b]))
            torch.testing.assert_close(got[dst], want[layer], **_tols(dtype))
            if v is not None:
                assert torch.equal(_bits(v[layer][dst]), _bits(v0[layer][src])), "V not copied"
                assert torch.equal(_bits(v[layer][others]), _bits(v0[layer][others]))
    return outs, dst


@pytest.mark.parametrize("scattered", [False, True], ids=["contig", "scattered"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_torch_reference_matches_analytic(name, dtype, interleaved, scattered):
    _run_case(name, dtype, interleaved, scattered, impls=["torch"])


@needs_triton
@pytest.mark.parametrize("scattered", [False, True], ids=["contig", "scattered"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_triton_matches_references(name, dtype, interleaved, scattered):
    outs, dst = _run_case(name, dtype, interleaved, scattered, impls=["triton", "torch"], seed=1)
    for got, ref in zip(outs["triton"], outs["torch"], strict=True):
        torch.testing.assert_close(got[dst], ref[dst], **_tols(dtype))


@needs_triton
def test_triton_many_tokens_int32_delta_and_cached_pointers():
    """More tokens than one program holds, int32 deltas, a reused pointer table."""
    layout, _ = LAYOUTS["gqa_full"]
    gen = torch.Generator().manual_seed(2)
    k, v = _pool(layout, torch.bfloat16, 0, gen)
    ptrs = kv_pointers(k, v)
    src = torch.arange(1, 31, device=DEVICE)
    dst = torch.arange(31, 61, device=DEVICE)
    delta = torch.randint(-500, 500, (30,), generator=gen, dtype=torch.int32).to(DEVICE)
    inv_freq = _inv_freq(layout.rope_dim)
    kr, vr = [t.clone() for t in k], [t.clone() for t in v]
    kw = {"layout": layout, "inv_freq": inv_freq, "interleaved": False}
    splice_kv_triton(k, v, src, dst, delta, pointers=ptrs, block_t=4, **kw)
    splice_kv_ref(kr, vr, src, dst, delta, **kw)
    for a, b in zip(k, kr, strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-5)
    for a, b in zip(v, vr, strict=True):
        assert torch.equal(a, b)
    moved = [t.clone() for t in k]  # a reallocated pool: the old table must be refused
    with pytest.raises(ValueError, match="built for other tensors"):
        splice_kv_triton(moved, v, src, dst, delta, pointers=ptrs, **kw)


def test_rotations_compose():
    """Splicing by a then by b equals splicing by a + b (Rot(a)Rot(b) = Rot(a+b)), fp32."""
    layout = dataclasses.replace(LAYOUTS["gqa_partial"][0], num_layers=1)
    gen = torch.Generator().manual_seed(3)
    (k,), (v,) = _pool(layout, torch.float32, 0, gen)
    a, b = torch.tensor([5, -40, 70], device=DEVICE), torch.tensor([-9, 33, 1], device=DEVICE)
    kw = {"layout": layout, "inv_freq": _inv_freq(layout.rope_dim), "interleaved": True}
    s, mid, end, direct = (torch.arange(i, i + 3, device=DEVICE) for i in (1, 10, 20, 30))
    splice_kv([k], [v], s, mid, a, **kw)
    splice_kv([k], [v], mid, end, b, **kw)
    splice_kv([k], [v], s, direct, a + b, **kw)
    torch.testing.assert_close(k[end], k[direct], rtol=0, atol=2e-4)  # fp32 angles
    assert not torch.allclose(k[end], k[s])  # it did rotate


def test_empty_is_noop_and_bad_inputs_are_refused():
    layout, _ = LAYOUTS["gqa_partial"]
    gen = torch.Generator().manual_seed(4)
    k, v = _pool(layout, torch.bfloat16, 0, gen)
    inv = _inv_freq(layout.rope_dim)
    kw = {"layout": layout, "inv_freq": inv, "interleaved": False}
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    before = [t.clone() for t in k]
    for impl in ("torch", "auto"):
        splice_kv(k, v, empty, empty, empty, impl=impl, **kw)
    assert all(torch.equal(a, b) for a, b in zip(k, before, strict=True))
    idx = torch.tensor([1, 2], device=DEVICE)
    bad = [
        ((k, v, idx, idx[:1], idx), "dst must be 1-D with 2"),
        ((k, v, idx, idx + 2, idx.float()), "delta must be int32 or int64"),
        ((k[:2], v, idx, idx + 2, idx), "expected 3 K layers"),
        ((k, None, idx, idx + 2, idx), "v must be given"),
        (([k[0], k[1].float(), k[2]], v, idx, idx + 2, idx), "k\\[1\\] is torch.float32"),
        (([t.mT.contiguous().mT for t in k], v, idx, idx + 2, idx), "contiguous last dim"),
        (([t.to(torch.float8_e4m3fn) for t in k], v, idx, idx + 2, idx), "fp8"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            splice_kv(*args, **kw)
    with pytest.raises(ValueError, match="inv_freq must be fp32"):
        splice_kv(k, v, idx, idx + 2, idx, layout=layout, inv_freq=inv[:3], interleaved=False)
    with pytest.raises(ValueError, match="impl must be"):
        splice_kv(k, v, idx, idx + 2, idx, impl="cuda", **kw)
