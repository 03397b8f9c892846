"""Route and fetch across two gloo processes equal local full attention (fp32, CPU).

The requester's sequence holds local tokens and two chunks that the holder computed at other
positions; the oracle is softmax attention over the whole sequence with every key rotated at
its new position by an independent complex-number RoPE, written out here. One two-rank job
runs every check (GQA with partial neox rotary, MLA with interleaved k_pe; two layers) and the
tests read its report.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from leyline.server.core.rope import RopeSpec
from leyline.server.core.xattn import AttnSpec, merge_partials, partial_attention
from leyline.server.core.xattn.launch import run_pair
from leyline.server.core.xattn.transport import Chunk, ChunkNotHeld, Holder, Requester

LAYERS, SEQ, T = 2, 90, 6
# chunk id -> (new start, length, old start): A moves back, B forward, C lies after the queries
CHUNKS = {11: (20, 23, 100), 12: (50, 17, 5), 13: (95, 4, 0)}
KINDS = {
    "gqa": AttnSpec.gqa(6, 2, 40, v_head_dim=24, rope_dim=32),  # partial rotary, neox
    "mla": AttnSpec.mla(5, 48, 16, 24),  # [c_kv 48 | k_pe 16], interleaved
}


def _rope(spec: AttnSpec) -> RopeSpec:
    rd = spec.rope_dim
    inv = (10000.0 ** -(torch.arange(0, rd, 2, dtype=torch.float64) / rd)).tolist()
    return RopeSpec(rd, tuple(inv), interleaved=spec.kind == "mla")


def _rope_at(x, pos, spec: AttnSpec):
    """Independent RoPE of the rotary dims of rows x (..., n, heads, dim) at positions pos (n,)."""
    rope = _rope(spec)
    inv = torch.tensor(rope.inv_freq, dtype=torch.float64)
    lo, hi = spec.rope_offset, spec.rope_offset + spec.rope_dim
    xd = x.double()
    part = xd[..., lo:hi]
    if rope.interleaved:
        pairs = torch.view_as_complex(part.reshape(*part.shape[:-1], -1, 2).contiguous())
    else:
        half = spec.rope_dim // 2
        pairs = torch.complex(part[..., :half], part[..., half:])
    angle = pos.double()[:, None, None] * inv
    y = pairs * torch.polar(torch.ones_like(angle), angle)
    y = torch.view_as_real(y).flatten(-2) if rope.interleaved else torch.cat((y.real, y.imag), -1)
    out = xd.clone()
    out[..., lo:hi] = y
    return out


def _data(spec: AttnSpec):
    """Raw (pre-RoPE) K/V for the sequence and its chunks, and queries; same on both ranks."""
    gen = torch.Generator().manual_seed(1234)
    n_total = SEQ + 4  # C's rows exist only on the holder
    raw_k = torch.randn(
        LAYERS, n_total, spec.kv_heads, spec.qk_dim, generator=gen, dtype=torch.float64
    )
    raw_v = torch.randn(
        LAYERS, n_total, spec.kv_heads, spec.v_dim, generator=gen, dtype=torch.float64
    )
    raw_q = torch.randn(LAYERS, T, spec.q_heads, spec.qk_dim, generator=gen, dtype=torch.float64)
    return raw_k, raw_v, raw_q


def _rows(cid: int) -> torch.Tensor:
    new, n, _ = CHUNKS[cid]
    return torch.arange(new, new + n) if new < SEQ else torch.arange(SEQ, SEQ + n)


def _holder(spec: AttnSpec) -> Holder:
    raw_k, raw_v, _ = _data(spec)
    chunks = {}
    for cid, (_, n, old) in CHUNKS.items():
        old_pos = torch.arange(old, old + n)
        k = _rope_at(raw_k[:, _rows(cid)], old_pos, spec).float()
        v = raw_v[:, _rows(cid)].float() if spec.kind == "gqa" else None
        chunks[cid] = Chunk(k, v, old_pos)
    return Holder(spec, _rope(spec), chunks, device="cpu")


def _oracle(spec: AttnSpec, raw_k, raw_v, q, q_pos, layer):
    """Causal softmax attention over the whole sequence, keys at their true positions."""
    pos = torch.arange(SEQ)
    k = _rope_at(raw_k[layer, :SEQ], pos, spec)[:, :, None]  # (N, Hkv, 1, D)
    k = k.expand(-1, -1, spec.group, -1).reshape(SEQ, spec.q_heads, spec.qk_dim)
    if spec.kind == "mla":
        v = k[..., : spec.v_dim]
    else:
        v = raw_v[layer, :SEQ].repeat_interleave(spec.group, dim=1)
    s = torch.einsum("thd,nhd->htn", q.double(), k) * spec.scale
    s = s.masked_fill(~(pos[None, :] <= q_pos[:, None])[None], float("-inf"))
    return torch.einsum("htn,nhv->thv", torch.softmax(s, -1), v), torch.logsumexp(s, -1).T


def _requester_checks(spec: AttnSpec) -> dict[str, float | bool]:
    raw_k, raw_v, raw_q = _data(spec)
    req = Requester(spec, _rope(spec), device="cpu", num_layers=LAYERS)
    q_pos = torch.arange(SEQ - T, SEQ)
    remote = torch.zeros(SEQ, dtype=torch.bool)
    for cid in (11, 12):
        remote[_rows(cid)] = True
    local = torch.nonzero(~remote).flatten()
    ids = list(CHUNKS)
    deltas = [new - old for new, _, old in CHUNKS.values()]
    out: dict[str, float | bool] = {"route_o": 0.0, "route_lse": 0.0, "fetch_o": 0.0,
                                    "fetch_k": 0.0, "fetch_pos": True}  # fmt: skip
    fetched = req.fetch(1, [11, 12], deltas[:2])
    want_pos = torch.cat([_rows(11), _rows(12)])
    out["fetch_pos"] = bool(torch.equal(fetched.positions, want_pos))
    true_k = _rope_at(raw_k[:, want_pos], want_pos, spec)
    out["fetch_k"] = float((fetched.k.double() - true_k).abs().max())
    route = req.open_route(1, q_pos, ids, deltas)
    for layer in range(LAYERS):
        q = _rope_at(raw_q[layer], q_pos, spec).float()
        want_o, want_lse = _oracle(spec, raw_k, raw_v, q, q_pos, layer)
        k_loc = _rope_at(raw_k[layer, local], local, spec).float()
        v_loc = raw_v[layer, local].float() if spec.kind == "gqa" else None
        mine = partial_attention(q, k_loc, v_loc, spec, q_pos=q_pos, k_pos=local)
        routed = route.layer(q)
        got = merge_partials([mine, routed])
        out["route_o"] = max(out["route_o"], float((got.o.double() - want_o).abs().max()))
        out["route_lse"] = max(out["route_lse"], float((got.lse.double() - want_lse).abs().max()))
        # fetch: attend locally over local rows + the fetched (rotated) chunk rows
        v_f = fetched.v[layer] if fetched.v is not None else None
        theirs = partial_attention(q, fetched.k[layer], v_f, spec, q_pos=q_pos,
                                   k_pos=fetched.positions)  # fmt: skip
        got = merge_partials([mine, theirs])
        out["fetch_o"] = max(out["fetch_o"], float((got.o.double() - want_o).abs().max()))
    for name, call in (("route", lambda: req.open_route(1, q_pos, [11, 99], [0, 0]).layer(q)),
                       ("fetch", lambda: req.fetch(1, [99], [0]))):  # fmt: skip
        try:
            call()
            out[f"{name}_unknown_raises"] = False
        except ChunkNotHeld:
            out[f"{name}_unknown_raises"] = True
    # the holder still serves after refusing: a route right after must be exact again
    route = req.open_route(1, q_pos, ids, deltas)
    for layer in range(LAYERS - 1):
        route.layer(_rope_at(raw_q[layer], q_pos, spec).float())
    again = merge_partials([mine, route.layer(q)])
    out["after_refusal_o"] = float((again.o.double() - want_o).abs().max())
    req.stop(1)
    return out


def _worker(rank: int, path: str) -> None:
    report = {}
    for kind, spec in KINDS.items():
        if rank == 1:
            report[kind] = {"served": _holder(spec).serve(peer=0)}
        else:
            report[kind] = _requester_checks(spec)
    if rank == 0:
        with open(path, "wb") as f:
            pickle.dump(report, f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("xattn") / "report.pkl"
    # the spawned ranks import this module by its name (the checkout is on their sys.path)
    run_pair(_worker, (str(path),), backend="gloo", timeout_s=60)
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("kind", list(KINDS))
def test_route_equals_local_full_attention(report, kind):
    r = report[kind]
    assert r["route_o"] < 2e-5 and r["route_lse"] < 2e-5, r


@pytest.mark.parametrize("kind", list(KINDS))
def test_fetch_rotates_to_new_positions_and_equals_full_attention(report, kind):
    r = report[kind]
    assert r["fetch_pos"], r
    assert r["fetch_k"] < 1e-5, r  # fp32 rotation of the holder's keys vs keys made at p_new
    assert r["fetch_o"] < 2e-5, r


@pytest.mark.parametrize("kind", list(KINDS))
def test_unknown_chunk_is_refused_and_the_holder_keeps_serving(report, kind):
    r = report[kind]
    assert r["route_unknown_raises"] and r["fetch_unknown_raises"], r
    assert r["after_refusal_o"] < 2e-5, r


def test_query_bytes_are_what_route_moves():
    """The MLA query row of the brief: (512 + 64) x 2 B per head."""
    spec = AttnSpec.mla(16, 512, 64, 128)
    assert spec.query_bytes(2) / spec.q_heads == (512 + 64) * 2
    assert math.isclose(spec.scale, 192**-0.5)
