"""Directive splices inside SGLang's real MHA and MLA pools (0.5.16 and 0.5.23), checked
against SGLang's own rotary embedding at the new positions; memory invariant, idempotency,
isolation, failures."""

from __future__ import annotations

import json

import pytest
from _sglang_support import (
    install_vllm_ops_stub,
    make_req,
    match,
    mha_stack,
    mla_stack,
    require_sglang,
    serve,
    set_server_args,
    slots,
)

require_sglang()

import torch  # noqa: E402
from sglang.srt.layers.rotary_embedding import get_rope  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402

from leyline.directives import Directive, Mode  # noqa: E402
from leyline.protocol import Payload  # noqa: E402
from leyline.server.sglang.cache import LeylineRadixCache, tenant_of  # noqa: E402
from leyline.server.sglang.pool import PoolBinding  # noqa: E402
from leyline.server.sglang.rotary import rope_spec_from_module  # noqa: E402

N1, CUT_A, CUT_B, TURN = 97, 29, 46, 11  # base length, deleted span [A, B), new turn


@pytest.fixture(scope="module", autouse=True)
def _sglang_globals() -> None:
    install_vllm_ops_stub()
    set_server_args()


class Model:
    """Raw (pre-RoPE) keys/values per layer and token instance, written the way SGLang writes
    them: key after its own rotary module at the token's position."""

    def __init__(self, stack, rope, kind: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.stack, self.rope, self.kind = stack, rope, kind
        pool = stack.pool
        if kind == "mha":
            self.layers = len(pool.k_buffer)
            shape_k = (pool.head_num, pool.head_dim)
            shape_v = (pool.head_num, pool.v_head_dim)
        else:
            self.layers = len(pool.kv_buffer)
            shape_k = (1, pool.kv_lora_rank + pool.qk_rope_head_dim)
            shape_v = None
        self.raw_k = [torch.randn((N1 + 64, *shape_k), generator=g) for _ in range(self.layers)]
        self.raw_v = (
            [torch.randn((N1 + 64, *shape_v), generator=g) for _ in range(self.layers)]
            if shape_v else None
        )  # fmt: skip

    def key_at(self, layer: int, inst: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raw = self.raw_k[layer][inst]
        if self.kind == "mha":
            q = torch.zeros_like(raw)
            _, k = self.rope.forward_native(pos, q.flatten(1), raw.flatten(1).clone())
            return k.view_as(raw)
        rank = self.stack.pool.kv_lora_rank
        k_pe = raw[:, :, rank:]
        _, k = self.rope.forward_native(pos, torch.zeros_like(k_pe), k_pe.clone())
        return torch.cat([raw[:, :, :rank], k.reshape(k_pe.shape)], dim=-1)

    def writer(self, inst_of_pos):
        def write(slots: torch.Tensor, pos: torch.Tensor) -> None:
            inst = inst_of_pos(pos)
            for layer in range(self.layers):
                k = self.key_at(layer, inst, pos)
                if self.kind == "mha":
                    self.stack.pool.k_buffer[layer][slots] = k.to(self.stack.pool.dtype)
                    self.stack.pool.v_buffer[layer][slots] = self.raw_v[layer][inst].to(
                        self.stack.pool.dtype
                    )
                else:
                    self.stack.pool.kv_buffer[layer][slots] = k.to(self.stack.pool.dtype)

        return write


def _setup(kind: str, dtype: torch.dtype, scaling=None, neox=True):
    if kind == "mha":
        stack = mha_stack(size=260, layers=3, heads=3, head_dim=40, v_dim=24, dtype=dtype)
        rope = get_rope(40, 24, 4096, 10000, neox, scaling, torch.float32)
    elif scaling and scaling.get("rope_type") == "deepseek_yarn":
        # get_rope asks the accelerator for a device; build SGLang's class directly on CPU.
        from sglang.srt.layers.rotary_embedding.rope_variant import DeepseekScalingRotaryEmbedding

        stack = mla_stack(size=260, layers=2, rank=40, rope=16, dtype=dtype)
        rope = DeepseekScalingRotaryEmbedding(
            16, 16, 1024, 10000, neox, scaling["factor"], torch.float32, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707, device="cpu",
        )  # fmt: skip
    else:
        stack = mla_stack(size=260, layers=2, rank=40, rope=16, dtype=dtype)
        rope = get_rope(16, 16, 4096, 10000, neox, scaling, torch.float32)
    binding = PoolBinding.from_pool(stack.pool, rope_spec_from_module(rope))
    cache = LeylineRadixCache(stack.params, binding)
    return stack, rope, cache, Model(stack, rope, kind, seed=7)


def _payload(version: int, base: int | None, modes=(), approximate=True) -> dict:
    """A valid wire payload deleting base segment 2 once per mode."""
    ds = tuple(Directive(2 + i, 3 + i, (2, 2), Mode(m)) for i, m in enumerate(modes))
    segs = (("0123456789abcdef", 10),) * 3
    return Payload("s1", version, base, segs, ds, approximate=approximate).to_wire()


def _tokens():
    g = torch.Generator().manual_seed(3)
    base = torch.randint(5, 30000, (N1,), generator=g).tolist()
    turn = torch.randint(5, 30000, (TURN,), generator=g).tolist()
    return base, base[:CUT_A] + base[CUT_B:] + turn


CASES = [
    ("mha", torch.float32, None, True, 2e-5),
    ("mha", torch.bfloat16, None, True, 4e-2),
    ("mha", torch.float32, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, True, 2e-5),
    ("mha", torch.float32, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, True, 2e-5),
    ("mha", torch.float32, {"rope_type": "linear", "factor": 2.0}, False, 2e-5),
    ("mla", torch.float32, None, False, 2e-5),
    ("mla", torch.bfloat16, {"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}, False, 4e-2),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "dtype", "scaling", "neox", "tol"), CASES)
def test_amortize_splice_equals_sglang_rotary_at_new_positions(
    kind, dtype, scaling, neox, tol
) -> None:
    stack, _rope, cache, model = _setup(kind, dtype, scaling, neox)
    base, new = _tokens()
    r1 = make_req("r1", base, _payload(1, None))
    serve(cache, stack, r1, model.writer(lambda pos: pos))
    assert stack.invariant(cache) == stack.size

    r2 = make_req("r2", new, _payload(2, 1, ["amortize"]))
    free_before = stack.alloc.available_size()
    res = match(cache, r2)
    kept = N1 - (CUT_B - CUT_A)
    assert len(slots(cache, res)) == kept  # prefix + spliced suffix; the new turn is prefilled
    # The base is exact, in the plain namespace: its prefix is seeded into the approximate one
    # (a delta-0 copy, bit-exact) and the suffix spliced after it.
    assert stack.alloc.available_size() == free_before - kept
    exact = slots(cache, match(cache, make_req("p", base, None)))[:CUT_A]
    buffers = stack.pool.k_buffer if kind == "mha" else stack.pool.kv_buffer
    assert all(torch.equal(b[slots(cache, res)[:CUT_A]], b[exact]) for b in buffers)
    spliced = slots(cache, res)[CUT_A:kept]
    pos = torch.arange(CUT_A, kept)
    inst = pos + (CUT_B - CUT_A)  # the base token instance each new position holds
    for layer in range(model.layers):
        want = model.key_at(layer, inst, pos)
        if kind == "mha":
            got = stack.pool.k_buffer[layer][spliced].float()
            torch.testing.assert_close(got, want.to(dtype).float(), rtol=tol, atol=tol)
            v = stack.pool.v_buffer[layer][spliced]
            assert torch.equal(v, model.raw_v[layer][inst].to(dtype))  # V bit-exact
        else:
            got = stack.pool.kv_buffer[layer][spliced]
            rank = stack.pool.kv_lora_rank
            assert torch.equal(got[..., :rank], model.raw_k[layer][inst][..., :rank].to(dtype))
            torch.testing.assert_close(
                got[..., rank:].float(), want[..., rank:].to(dtype).float(), rtol=tol, atol=tol
            )

    # Idempotent: SGLang calls match_prefix several times per request.
    again = match(cache, r2)
    assert torch.equal(slots(cache, again), slots(cache, res))
    assert stack.alloc.available_size() == free_before - kept
    info = json.loads(r2.customized_info["leyline"][0])
    assert info["tokens"] == {"exact": CUT_A, "inherited": 0, "spliced": kept - CUT_A,
                              "chunk_reused": 0, "recomputed": len(new) - kept,
                              "approximate": kept - CUT_A}  # fmt: skip
    assert info["exact_kv"] is False
    assert info["directives"][0]["status"] == "applied"

    # A request that did not opt in never sees the spliced (approximate) KV: only the exact
    # prefix, which the base left in the plain namespace.
    plain = make_req("r3", new, None)
    assert len(slots(cache, match(cache, plain))) == CUT_A
    plain2 = make_req("r4", new, _payload(3, 2, approximate=False))
    assert len(slots(cache, match(cache, plain2))) == CUT_A
    assert plain2.customized_info is None  # served by SGLang's own path, no accounting


def test_forget_matches_only_the_kept_prefix_and_invariant_holds() -> None:
    stack, _rope, cache, model = _setup("mha", torch.bfloat16)
    base, new = _tokens()
    serve(cache, stack, make_req("r1", base, _payload(1, None)), model.writer(lambda p: p))
    r2 = make_req("r2", new, _payload(2, 1, ["forget"]))
    res = match(cache, r2)
    assert len(slots(cache, res)) == CUT_A
    info = json.loads(r2.customized_info["leyline"][0])
    assert info["tokens"]["spliced"] == 0 and info["tokens"]["exact"] == CUT_A
    assert stack.invariant(cache) == stack.size


def test_splice_then_evict_keeps_invariant_and_drops_index() -> None:
    stack, _rope, cache, model = _setup("mha", torch.bfloat16)
    base, new = _tokens()
    serve(cache, stack, make_req("r1", base, _payload(1, None)), model.writer(lambda p: p))
    assert len(cache.index) > 0  # finished sequences are indexed for content reuse
    r2 = make_req("r2", new, _payload(2, 1, ["amortize"]))
    serve(cache, stack, r2, model.writer(lambda p: p + 60))
    assert stack.invariant(cache) == stack.size
    assert cache.evictable_size() > N1
    cache.evict(EvictParams(num_tokens=10**6))
    assert cache.evictable_size() == 0 and cache.protected_size() == 0
    assert stack.alloc.available_size() == stack.size
    assert len(cache._index()) == 0  # entries die with their slots, before the next lookup
    cache.reset()
    assert len(cache.sessions) == 0


def test_allocation_failure_serves_the_exact_match() -> None:
    stack, _rope, cache, model = _setup("mha", torch.bfloat16)
    base, new = _tokens()
    r1 = make_req("r1", base, _payload(1, None))
    serve(cache, stack, r1, model.writer(lambda p: p))
    # Lock the whole base and take every free slot: nothing can be evicted or allocated.
    held = match(cache, make_req("hold", [*base, 1], _payload(9, None)))
    cache.inc_lock_ref(held.last_device_node)
    grabbed = stack.alloc.alloc(stack.alloc.available_size())
    r2 = make_req("r2", new, _payload(2, 1, ["amortize"]))
    res = match(cache, r2)
    assert len(slots(cache, res)) == CUT_A
    assert stack.alloc.available_size() == 0
    stack.alloc.free(grabbed)
    cache.dec_lock_ref(held.last_device_node)
    assert stack.invariant(cache) == stack.size


def test_allocation_evicts_unlocked_nodes_but_not_the_donor() -> None:
    stack, _rope, cache, model = _setup("mha", torch.bfloat16)
    base, new = _tokens()
    serve(cache, stack, make_req("r1", base, _payload(1, None)), model.writer(lambda p: p))
    # Unrelated cached sequence (evictable), then take all other free slots.
    other = torch.randint(40000, 50000, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    serve(cache, stack, make_req("o", other, None), model.writer(lambda p: p))
    # Room for the seed of the exact prefix (CUT_A tokens) and 5 more: the splice must evict.
    grabbed = stack.alloc.alloc(stack.alloc.available_size() - 5 - CUT_A)
    r2 = make_req("r2", new, _payload(2, 1, ["amortize"]))
    res = match(cache, r2)
    kept = N1 - (CUT_B - CUT_A)
    assert len(slots(cache, res)) == kept
    assert len(slots(cache, match(cache, make_req("o2", other, None)))) < len(other) - 1
    stack.alloc.free(grabbed)
    assert stack.invariant(cache) == stack.size


def test_base_slots_stay_on_the_host_across_unrelated_evictions() -> None:
    # The host copy of the base's slot list is reused while the base still ends at the same
    # radix node (a copy to the host would wait for the forward in flight on a GPU).
    from leyline.server.sglang.cache import _STATE_ATTR

    stack, _rope, cache, model = _setup("mha", torch.bfloat16)
    base, new = _tokens()
    serve(cache, stack, make_req("r1", base, _payload(1, None)), model.writer(lambda p: p))
    other = torch.randint(40000, 50000, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    serve(cache, stack, make_req("o", other, None), model.writer(lambda p: p))
    r2 = make_req("r2", new, _payload(2, 1, ["amortize"]))
    match(cache, r2)
    state = getattr(r2, _STATE_ATTR)
    seq, node, _ = cache._base(state, r2.extra_key)
    assert seq is not None and len(seq) > N1 - 5
    cache.inc_lock_ref(node)
    cache.evict(EvictParams(num_tokens=10**6))  # the unrelated sequence and r2's copies go
    assert len(slots(cache, match(cache, make_req("o2", other, None)))) == 0
    again, node2, slots2 = cache._base(state, r2.extra_key)
    assert again is seq and node2 is node and slots2.tolist() == seq.slots.tolist()
    cache.dec_lock_ref(node)
    cache.evict(EvictParams(num_tokens=10**6))  # now the base goes too: a fresh (empty) copy
    gone, _, _ = cache._base(state, r2.extra_key)
    assert gone is not seq and len(gone) == 0
    assert len(cache._index()) == 0 and stack.invariant(cache) == stack.size


def test_server_diff_payload_versions_and_splices_without_segments() -> None:
    # The minimal payload {session, mode}: the plugin diffs the session's latest version
    # against the request's tokens itself and numbers the versions.
    stack, _rope, cache, model = _setup("mha", torch.bfloat16)
    base, new = _tokens()
    diff = {"session": "sd", "mode": "amortize"}
    r1 = make_req("r1", base, diff)
    serve(cache, stack, r1, model.writer(lambda p: p))
    assert json.loads(r1.customized_info["leyline"][0])["version"] == 1
    r2 = make_req("r2", new, diff)
    serve(cache, stack, r2, model.writer(lambda p: p + 60))
    info = json.loads(r2.customized_info["leyline"][0])
    assert info["version"] == 2 and info["tokens"]["spliced"] > 0, info
    assert [d["status"] for d in info["directives"]] == ["applied"]
    assert cache.sessions.latest(tenant_of(r2), "sd") == 2
    assert stack.invariant(cache) == stack.size
