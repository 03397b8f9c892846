"""SGLang's own RadixCache behaviour, run against both `RadixCache` and `LeylineRadixCache`:
for requests without directives the Leyline backend must behave exactly like SGLang's."""

from __future__ import annotations

import dataclasses
from array import array

import pytest
from _sglang_support import (
    commit,
    extend_bounds,
    lock,
    make_req,
    match,
    mha_stack,
    prefix_slots,
    protected_len,
    release,
    require_sglang,
    row,
    serve,
    set_extend,
    slots,
    stash,
)

require_sglang()

import torch  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import (  # noqa: E402
    EvictParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402

from leyline.server.sglang.cache import LeylineRadixCache  # noqa: E402

CLASSES = [RadixCache, LeylineRadixCache]


def key(ids, extra=None):
    return RadixKey(array("q", ids), extra)


def m(cache, ids, extra=None):
    return cache.match_prefix(MatchPrefixParams(key=key(ids, extra)))


def ms(cache, ids, extra=None):
    """The slots ``ids`` match."""
    return slots(cache, m(cache, ids, extra))


@pytest.mark.parametrize("cls", CLASSES)
def test_create_simulated_returns_the_class(cls) -> None:
    assert type(cls.create_simulated()) is cls


@pytest.mark.parametrize("cls", CLASSES)
def test_insert_match_and_node_split(cls) -> None:
    c = cls.create_simulated()
    c.insert(InsertParams(key=key([1, 2, 3, 4, 5]), value=torch.tensor([11, 12, 13, 14, 15])))
    r = m(c, [1, 2, 3, 9])
    assert slots(c, r).tolist() == [11, 12, 13]
    # the match ended inside a node: it was split at the boundary
    assert len(r.last_device_node.key) == 3 and len(r.last_device_node.children) == 1
    res = c.insert(InsertParams(key=key([1, 2, 3, 7, 8]), value=torch.tensor([11, 12, 13, 17, 18])))
    assert res.prefix_len == 3
    assert ms(c, [1, 2, 3, 7, 8, 6]).tolist() == [11, 12, 13, 17, 18]
    assert c.total_size() == 7 and c.evictable_size() == 7
    assert ms(c, []).numel() == 0


@pytest.mark.parametrize("cls", CLASSES)
def test_extra_key_isolation(cls) -> None:
    c = cls.create_simulated()
    c.insert(InsertParams(key=key([4, 5, 6], "tenant-a"), value=torch.tensor([1, 2, 3])))
    assert ms(c, [4, 5, 6], "tenant-a").tolist() == [1, 2, 3]
    assert ms(c, [4, 5, 6], "tenant-b").numel() == 0
    assert ms(c, [4, 5, 6]).numel() == 0


@pytest.mark.parametrize("cls", CLASSES)
def test_page_alignment(cls) -> None:
    c = cls.create_simulated(page_size=4)
    c.insert(InsertParams(key=key(list(range(1, 11))), value=torch.arange(101, 111)))
    assert c.total_size() == 8  # 10 tokens round down to two pages
    assert ms(c, [*list(range(1, 7)), 99]).tolist() == [101, 102, 103, 104]


@pytest.mark.parametrize("cls", CLASSES)
def test_lock_unlock_evict_and_memory_invariant(cls) -> None:
    stack = mha_stack(size=64, layers=1, heads=1, head_dim=8, v_dim=8)
    c = cls(stack.params)
    a = make_req("a", list(range(100, 130)))
    b = make_req("b", list(range(100, 110)) + list(range(200, 215)))
    serve(c, stack, a)
    serve(c, stack, b)
    assert stack.invariant(c) == stack.size
    assert c.evictable_size() == 30 + 15
    r = m(c, list(range(100, 130)))
    c.inc_lock_ref(r.last_device_node)
    assert c.protected_size() == 30 and c.evictable_size() == 15
    assert stack.invariant(c) == stack.size
    c.evict(EvictParams(num_tokens=100))
    assert c.evictable_size() == 0 and c.protected_size() == 30  # locked path survives
    assert ms(c, list(range(100, 130))).numel() == 30
    c.dec_lock_ref(r.last_device_node)
    assert stack.invariant(c) == stack.size
    c.evict(EvictParams(num_tokens=100))
    assert stack.alloc.available_size() == stack.size


@pytest.mark.parametrize("cls", CLASSES)
def test_requests_without_directives_match_like_sglang(cls) -> None:
    stack = mha_stack(size=64, layers=1, heads=1, head_dim=8, v_dim=8)
    c = cls(stack.params)
    serve(c, stack, make_req("a", list(range(1, 21))))
    r = make_req("b", [*list(range(1, 16)), 99, 98])
    res = match(c, r)
    assert len(slots(c, res)) == 15 and r.extra_key is None
    res2 = match(c, r)  # a second call is a no-op
    assert torch.equal(slots(c, res), slots(c, res2))
    assert r.customized_info is None


@pytest.mark.parametrize("cls", CLASSES)
def test_cache_events(cls) -> None:
    stack = mha_stack(size=16, layers=1, heads=1, head_dim=8, v_dim=8)
    c = cls(dataclasses.replace(stack.params, enable_kv_cache_events=True))
    c.take_events()
    c.insert(InsertParams(key=key([1, 2, 3]), value=torch.tensor([5, 6, 7])))
    kinds = [type(e).__name__ for e in c.take_events()]
    assert kinds == ["BlockStored"] * 3 or kinds == ["BlockStored"]
    c.evict(EvictParams(num_tokens=3))
    assert "BlockRemoved" in {type(e).__name__ for e in c.take_events()}


@pytest.mark.parametrize("cls", CLASSES)
def test_chunked_prefill_without_payload_caches_like_sglang(cls) -> None:
    """SGLang's chunk caching between two chunks (0.5.16 ``cache_unfinished_req``, 0.5.23
    ``checkpoint``, both hooked for middle windows), then the release of the finished request:
    same prefix, locks and free slots as SGLang's own cache."""
    stack = mha_stack(size=64, layers=1, heads=1, head_dim=8, v_dim=8)
    c = cls(stack.params)
    serve(c, stack, make_req("a", list(range(1, 11))))
    r = make_req("b", list(range(1, 31)))
    r.init_next_round_input(c)
    assert len(prefix_slots(c, r)) == 10
    lock(c, r)
    for end in (20, 30):  # two chunks: [10, 20) then [20, 30)
        prefix = prefix_slots(c, r)
        start = len(prefix)
        set_extend(r, start, end)
        assert extend_bounds(r) == (start, end)
        new = stack.alloc.alloc(end - start)
        idx = row(stack, r)
        stack.req_to_token.write((idx, slice(0, end)), torch.cat([prefix, new]).to(torch.int32))
        commit(r, end)
        if end == 20:
            stash(c, r)
            assert len(prefix_slots(c, r)) == 20 and protected_len(r) == 20
            assert c.protected_size() == 20
            r.init_next_round_input()
    release(c, stack, r)
    assert c.protected_size() == 0 and c.evictable_size() == 30
    assert stack.invariant(c) == stack.size
    assert len(ms(c, list(range(1, 31)))) == 30
