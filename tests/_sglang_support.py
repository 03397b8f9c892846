"""Shared helpers for tests/server/sglang: real SGLang objects on CPU (0.5.16 and 0.5.23).

`require_sglang()` skips a test module cleanly when SGLang is not importable (the main venv);
run these tests with ``.venv-sglang/bin/python -m pytest tests/server/sglang`` (0.5.16) or
``.venv-sglang-0.5.23/bin/python ...`` after ``scripts/setup_sglang_venv.sh`` (docs/sglang.md).

The scheduler steps the tests perform by hand (match, lock, allocate a row, cache a chunk,
release) are written once below, over `leyline.server.sglang.compat`: 0.5.16 and 0.5.23 keep
a request's prefix and row in different fields and end its life through different calls. The
0.5.23 steps call SGLang's own ``match_kv_cache`` / ``checkpoint_kv_cache`` /
``release_kv_cache``.

Test-time stand-ins (documented in docs/sglang.md): the fake ``torchvision`` package installed
by the setup script, and `install_vllm_ops_stub`, because SGLang's ``RotaryEmbedding.__init__``
imports ``vllm._custom_ops.rotary_embedding`` (a CUDA kernel it never calls here) on a platform
that is neither CUDA nor its CPU engine. The oracle is SGLang's own ``forward_native``.
"""

from __future__ import annotations

import json
import sys
import types
from array import array
from dataclasses import dataclass
from typing import Any

import pytest


def require_sglang() -> None:
    """Skip the calling test module unless SGLang 0.5.16 imports (never in the main venv)."""
    try:
        import sglang
        from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: F401
    except Exception as exc:  # ImportError, or a broken optional dependency
        pytest.skip(
            f"sglang is not importable here ({type(exc).__name__}: {exc}); run "
            "scripts/setup_sglang_venv.sh and .venv-sglang/bin/python -m pytest tests/server/sglang",
            allow_module_level=True,
        )
    from leyline.server.sglang.compat import SUPPORTED_VERSIONS

    if sglang.__version__ not in SUPPORTED_VERSIONS:
        pytest.skip(
            f"these tests cover sglang {', '.join(SUPPORTED_VERSIONS)}, found {sglang.__version__}",
            allow_module_level=True,
        )


def install_vllm_ops_stub() -> None:
    """Stand-in for ``vllm._custom_ops`` (its CUDA rotary kernel is imported, never called)."""
    if "vllm._custom_ops" in sys.modules:
        return

    def rotary_embedding(*_a: object, **_k: object) -> None:
        raise RuntimeError("test stand-in: vllm's CUDA rotary kernel is not available")

    pkg = types.ModuleType("vllm")
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = rotary_embedding  # type: ignore[attr-defined]
    pkg._custom_ops = ops  # type: ignore[attr-defined]
    sys.modules["vllm"] = pkg
    sys.modules["vllm._custom_ops"] = ops


def set_server_args(model_path: str = "dummy", **fields: Any) -> Any:
    """Publish SGLang's ServerArgs for this process, as a scheduler does (rotary modules read
    it at construction; 0.5.23 reads its config namespaces everywhere)."""
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    args = ServerArgs(model_path=model_path, **fields)
    set_global_server_args_for_scheduler(args)
    return args


@dataclass
class Stack:
    """A real SGLang KV pool, allocator, req-to-token pool and CacheInitParams."""

    pool: Any
    alloc: Any
    req_to_token: Any
    params: Any
    size: int

    def invariant(self, cache: Any) -> int:
        """available + evictable + protected (must equal ``size`` when no request holds KV)."""
        return int(self.alloc.available_size() + cache.evictable_size() + cache.protected_size())


def mha_stack(size: int = 200, layers: int = 3, heads: int = 3, head_dim: int = 40, v_dim: int = 24,
              dtype: Any = None, device: str = "cpu") -> Stack:  # fmt: skip
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(
        size=size, page_size=1, dtype=dtype or torch.bfloat16, head_num=heads, head_dim=head_dim,
        layer_num=layers, device=device, enable_memory_saver=False, v_head_dim=v_dim,
    )  # fmt: skip
    return _stack(pool, size, device)


def mla_stack(size: int = 200, layers: int = 2, rank: int = 40, rope: int = 16,
              dtype: Any = None, device: str = "cpu") -> Stack:  # fmt: skip
    import torch
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    pool = MLATokenToKVPool(
        size=size, page_size=1, dtype=dtype or torch.bfloat16, kv_lora_rank=rank,
        qk_rope_head_dim=rope, layer_num=layers, device=device, enable_memory_saver=False,
    )  # fmt: skip
    return _stack(pool, size, device)


def _stack(pool: Any, size: int, device: str) -> Stack:
    import torch
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    set_server_args()  # 0.5.23's allocators and requests read the published config
    alloc = TokenToKVPoolAllocator(size, torch.bfloat16, device, pool, need_sort=False)
    r2t = ReqToTokenPool(size=8, max_context_len=size + 8, device=device, enable_memory_saver=False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc, page_size=1
    )
    return Stack(pool, alloc, r2t, params, size)


def apply_window_hooks() -> None:
    """What a scheduler process has once the plugin loaded: SGLang's global server args, the
    plugin's window hooks registered and applied by SGLang's own `HookRegistry`."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from leyline.server.sglang.windows import install_window_hooks

    install_vllm_ops_stub()
    set_server_args()
    install_window_hooks()
    HookRegistry.apply_hooks()


def isolate_http_hooks(monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty SGLang `HookRegistry` for one test, with every target the plugin's HTTP hooks
    patch restored afterwards; returns the registry."""
    import pkgutil
    from collections import defaultdict

    from sglang.srt.plugins.hook_registry import HookRegistry

    from leyline.server.sglang import response

    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.setattr(HookRegistry, "_patched", set())
    for target, _kind, _hook in response.HOOK_TARGETS:
        owner, name = target.rsplit(".", 1)
        cls = pkgutil.resolve_name(owner)
        monkeypatch.setattr(cls, name, cls.__dict__[name])
    return HookRegistry


def make_req(rid: str, tokens: list[int], payload: dict[str, Any] | None = None,
             extra_key: str | None = None, salt: str | None = None) -> Any:  # fmt: skip
    """A real scheduler-side `Req`; ``payload`` travels as SGLang's flat custom_params.
    ``salt``: the tenant's ``cache_salt``, where each version carries it (0.5.16's OpenAI layer
    folds it into the extra key; 0.5.23 keeps it in ``Req.cache_salt``)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    custom = None if payload is None else {"leyline": json.dumps(payload)}
    sp = SamplingParams(max_new_tokens=4, custom_params=custom)
    if salt is None:
        return Req(rid, "", array("q", tokens), sp, extra_key=extra_key)
    if _compat().CHECKPOINTS:
        return Req(rid, "", array("q", tokens), sp, extra_key=extra_key, cache_salt=salt)
    return Req(rid, "", array("q", tokens), sp, extra_key=salt + (extra_key or ""))


def _compat() -> Any:
    """`leyline.server.sglang.compat`, imported late: it needs SGLang (not in the main venv)."""
    from leyline.server.sglang import compat

    return compat


# ----- scheduler steps (the one place the tests meet 0.5.16 / 0.5.23 request fields) -----


def slots(cache: Any, res: Any) -> Any:
    """The KV slots of a `MatchResult`."""
    return _compat().match_slots(cache, res)


def match(cache: Any, req: Any) -> Any:
    """What the scheduler does: match ``req``'s tokens (limit: input_len - 1) with ``req`` and
    adopt the hit as its prefix."""
    ids = req.origin_input_ids + req.output_ids
    limit = len(req.origin_input_ids) - 1
    if _compat().CHECKPOINTS:
        from sglang.srt.mem_cache.common import match_kv_cache

        res = match_kv_cache(req, cache, ids, max_prefix_len=limit)
        req.kv.cache_protected_len = req.prefix_len  # as init_next_round_input does
        return res
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(ids, req.extra_key, limit=limit)
    res = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    req.prefix_indices, req.last_node = res.device_indices, res.last_device_node
    return res


def prefix_slots(cache: Any, req: Any) -> Any:
    """The slots of ``req``'s current prefix (what the next extend starts after)."""
    if not _compat().CHECKPOINTS:
        return req.prefix_indices
    import torch

    if req.kv.holds_kv:
        return cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, : req.prefix_len].to(
            torch.int64
        )
    if req.prefix_len == 0:
        return torch.zeros(0, dtype=torch.int64)
    return cache.prefix_device_indices(req)


def extend_bounds(req: Any) -> tuple[int, int]:
    """``[start, end)`` of the round the adder admitted ``req`` for."""
    if _compat().CHECKPOINTS:
        return req.prefix_len, req.extend_end
    return req.extend_range.start, req.extend_range.end


def set_extend(req: Any, start: int, end: int) -> None:
    """Admit ``req`` for ``[start, end)`` by hand (what the adder decides)."""
    if _compat().CHECKPOINTS:
        assert req.prefix_len == start
        req.extend_end = end
    else:
        req.set_extend_range(start, end)


def row(stack: Stack, req: Any) -> int:
    """The request's req-to-token row, allocated on first use."""
    kv = req.kv if _compat().CHECKPOINTS else req
    if kv.req_pool_idx is None:
        stack.req_to_token.alloc([req])
    return int(kv.req_pool_idx)


def protected_len(req: Any) -> int:
    return int(req.kv.cache_protected_len if _compat().CHECKPOINTS else req.cache_protected_len)


def commit(req: Any, end: int) -> None:
    """The forward computed KV for ``[0, end)`` of the request's row."""
    if _compat().CHECKPOINTS:
        req.kv.kv_committed_len = req.kv.kv_allocated_len = end
    else:
        req.kv_committed_len = end


def committed(req: Any) -> int:
    return int(req.kv.kv_committed_len if _compat().CHECKPOINTS else req.kv_committed_len)


def lock(cache: Any, req: Any) -> None:
    """Lock ``req``'s matched prefix, as admission does."""
    if _compat().CHECKPOINTS:
        req.lock = cache.lock(req.last_node)
    else:
        cache.inc_lock_ref(req.last_node)


def stash(cache: Any, req: Any) -> None:
    """Cache the chunk just prefilled (SGLang's stash of its chunked request)."""
    if _compat().CHECKPOINTS:
        from sglang.srt.mem_cache.common import checkpoint_kv_cache

        checkpoint_kv_cache(req, cache)
    else:
        cache.cache_unfinished_req(req, chunked=True)


def release(cache: Any, stack: Stack, req: Any, insert: bool = True) -> None:
    """End ``req``: finished (its KV inserted) or, without ``insert``, aborted."""
    if _compat().CHECKPOINTS:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH
        from sglang.srt.mem_cache.base_prefix_cache import CacheRequestOutcome
        from sglang.srt.mem_cache.common import release_kv_cache

        if insert:
            req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
        else:  # the scheduler's abort: finish the attempt, then release without inserting
            req.finished_reason = FINISH_ABORT()
            cache.finish(req.cache_request_handle, CacheRequestOutcome.ABORT)
        release_kv_cache(req, cache, checkpoint=insert)
        return
    cache.cache_finished_req(req, is_insert=insert, kv_len_to_handle=committed(req))
    stack.req_to_token.free(req)


def serve(cache: Any, stack: Stack, req: Any, write_kv: Any = None) -> Any:
    """Run ``req`` through the cache like the scheduler: match, lock, allocate the rest, write
    its KV (``write_kv(slots, positions)``), then release it finished."""
    import torch

    res = match(cache, req)
    lock(cache, req)
    n = len(req.origin_input_ids)
    prefix = prefix_slots(cache, req)
    rest = n - len(prefix)
    new = stack.alloc.alloc(rest)
    assert new is not None, "tests size their pools so a request always fits"
    if write_kv is not None and rest:
        write_kv(new, torch.arange(len(prefix), n))
    idx = row(stack, req)
    stack.req_to_token.write((idx, slice(0, n)), torch.cat([prefix, new]).to(torch.int32))
    if not _compat().CHECKPOINTS:
        req.cache_protected_len = len(prefix)
    commit(req, n)
    release(cache, stack, req)
    return res


# ----- a scheduler around the Leyline cache (test_sgl_windows, test_sgl_repair) -----

WORLD_VOCAB = 3000


class World:
    """A real MHA pool + allocator + Leyline cache, SGLang's scheduling steps for one request
    at a time (`serve`: ``Req.init_next_round_input``, the real ``PrefillAdder`` with whatever
    hooks the registry applied, chunk caching, release) and a context-free fake model whose
    KV depends on (token id, position) only, written after SGLang's own rotary embedding
    (``raw_k`` / ``raw_v``: its weights, one row per token id)."""

    def __init__(self, size: int = 3000, config: Any = None) -> None:
        import torch
        from sglang.srt.layers.rotary_embedding import get_rope

        from leyline.server.sglang.cache import LeylineCacheConfig, LeylineRadixCache
        from leyline.server.sglang.pool import PoolBinding
        from leyline.server.sglang.rotary import rope_spec_from_module

        self.stack = mha_stack(size=size, layers=2, heads=3, head_dim=40, v_dim=24,
                               dtype=torch.float32)  # fmt: skip
        self.rope = get_rope(40, 24, 32768, 10000, True, None, torch.float32)
        binding = PoolBinding.from_pool(self.stack.pool, rope_spec_from_module(self.rope))
        cfg = config or LeylineCacheConfig(min_copy_run=32, min_moved_run=16)
        self.cache = LeylineRadixCache(self.stack.params, binding, cfg)
        g = torch.Generator().manual_seed(11)
        vocab = WORLD_VOCAB
        self.raw_k = [torch.randn(vocab, 3, 40, generator=g) for _ in range(2)]
        self.raw_v = [torch.randn(vocab, 3, 24, generator=g) for _ in range(2)]
        self.prefilled = 0  # tokens the forward computed

    def key_at(self, layer: int, tokens: Any, pos: Any) -> Any:
        import torch

        raw = self.raw_k[layer][tokens]
        _, k = self.rope.forward_native(pos, torch.zeros_like(raw).flatten(1), raw.flatten(1))
        return k.view_as(raw)

    def forward(self, req) -> None:
        """What prepare_for_extend + the model do for the round's extend range."""
        import torch
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        s, e = extend_bounds(req)
        prefix = prefix_slots(self.cache, req)
        assert len(prefix) == s
        idx = row(self.stack, req)
        new = self.stack.alloc.alloc(e - s)
        if new is None:  # as SGLang's alloc_for_extend: evict unlocked leaves, then allocate
            self.cache.evict(EvictParams(num_tokens=e - s - self.stack.alloc.available_size()))
            new = self.stack.alloc.alloc(e - s)
        assert new is not None, "tests size their pools so a round always fits"
        toks = torch.tensor(list(req.full_untruncated_fill_ids[s:e]))
        pos = torch.arange(s, e)
        for layer in range(2):
            self.stack.pool.k_buffer[layer][new] = self.key_at(layer, toks, pos)
            self.stack.pool.v_buffer[layer][new] = self.raw_v[layer][toks]
        self.stack.req_to_token.write((idx, slice(0, e)), torch.cat([prefix, new]).to(torch.int32))
        commit(req, e)
        self.prefilled += e - s

    def adder(self, chunk: int | None) -> Any:
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.managers.schedule_policy import PrefillAdder

        return PrefillAdder(1, self.cache, self.stack.alloc, ScheduleBatch(reqs=[]), 0.5,
                            10_000, chunk)  # fmt: skip

    def serve(self, req, chunk: int | None = 4096, abort_after: int | None = None,
              squeeze: bool = False):  # fmt: skip
        """Admission + chunked prefill rounds; returns the rounds' extend ranges. ``squeeze``:
        another request takes every free slot while the first round is cached."""
        rounds = []
        req.init_next_round_input(self.cache)
        adder = self.adder(chunk)
        adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None)
        assert adder.can_run_list == [req]
        chunked = adder.new_chunked_req is req
        while True:
            self.forward(req)
            rounds.append(extend_bounds(req))
            if not chunked:
                break
            grabbed = self.stack.alloc.alloc(self.stack.alloc.available_size()) if squeeze else None
            stash(self.cache, req)  # SGLang's stash of its chunked request
            if grabbed is not None:
                self.stack.alloc.free(grabbed)
                squeeze = False
            if abort_after is not None and len(rounds) == abort_after:
                # process_pending_chunked_abort: released without inserting
                release(self.cache, self.stack, req, insert=False)
                return rounds
            req.init_next_round_input()
            adder = self.adder(chunk)
            chunked = adder.add_chunked_req(req) is req
            assert adder.can_run_list == [req]
        release(self.cache, self.stack, req)
        return rounds

    def kv_of(self, tokens: list[int]) -> Any:
        """The request's slots after it finished: in the approximate namespace if it used
        approximate KV, else in the plain one."""
        import numpy as np
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        from leyline.server.sglang.cache import APPROX_SUFFIX, _arr

        key = _arr(np.array(tokens))
        found = [
            slots(self.cache, self.cache.match_prefix(MatchPrefixParams(key=RadixKey(key, ns))))
            for ns in (APPROX_SUFFIX, None)
        ]
        return max(found, key=len)

    def assert_fresh_prefill_kv(self, tokens: list[int], tol: float = 1e-4) -> None:
        import torch

        slots = self.kv_of(tokens)
        assert len(slots) == len(tokens)
        toks, pos = torch.tensor(tokens), torch.arange(len(tokens))
        for layer in range(2):
            torch.testing.assert_close(
                self.stack.pool.k_buffer[layer][slots], self.key_at(layer, toks, pos),
                rtol=tol, atol=tol,  # NOTE: fp32 rounding of angles (1e-4: up to ~700 rad)
            )  # fmt: skip
            assert torch.equal(self.stack.pool.v_buffer[layer][slots], self.raw_v[layer][toks])

    def assert_no_leak(self) -> None:
        c = self.cache
        assert c.protected_size() == 0
        assert self.stack.alloc.available_size() + c.evictable_size() == self.stack.size
