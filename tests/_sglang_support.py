"""Shared helpers for tests/server/sglang: real SGLang 0.5.16 objects on CPU.

`require_sglang()` skips a test module cleanly when SGLang is not importable (the main venv);
run these tests with ``.venv-sglang/bin/python -m pytest tests/server/sglang`` after
``scripts/setup_sglang_venv.sh``.

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
    if sglang.__version__ != "0.5.16":
        pytest.skip(
            f"these tests pin sglang 0.5.16, found {sglang.__version__}", allow_module_level=True
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


def set_server_args() -> Any:
    """SGLang's global ServerArgs (rotary modules read it at construction)."""
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    args = ServerArgs(model_path="dummy")
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

    alloc = TokenToKVPoolAllocator(size, torch.bfloat16, device, pool, need_sort=False)
    r2t = ReqToTokenPool(size=8, max_context_len=size + 8, device=device, enable_memory_saver=False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc, page_size=1
    )
    return Stack(pool, alloc, r2t, params, size)


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
             extra_key: str | None = None) -> Any:  # fmt: skip
    """A real scheduler-side `Req`; ``payload`` travels as SGLang's flat custom_params."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    custom = None if payload is None else {"leyline": json.dumps(payload)}
    sp = SamplingParams(max_new_tokens=4, custom_params=custom)
    return Req(rid, "", array("q", tokens), sp, extra_key=extra_key)


def match(cache: Any, req: Any) -> Any:
    """What the scheduler does: match ``req``'s tokens (limit: input_len - 1) with ``req``."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    ids = req.origin_input_ids + req.output_ids
    key = RadixKey(ids, req.extra_key, limit=len(req.origin_input_ids) - 1)
    res = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    req.prefix_indices, req.last_node = res.device_indices, res.last_device_node
    return res


def serve(cache: Any, stack: Stack, req: Any, write_kv: Any = None) -> Any:
    """Run ``req`` through the cache like the scheduler: match, lock, allocate the rest, write
    its KV (``write_kv(slots, positions)``), then ``cache_finished_req``."""
    import torch

    res = match(cache, req)
    cache.inc_lock_ref(res.last_device_node)
    n = len(req.origin_input_ids)
    prefix = res.device_indices
    rest = n - len(prefix)
    new = stack.alloc.alloc(rest)
    assert new is not None, "tests size their pools so a request always fits"
    if write_kv is not None and rest:
        write_kv(new, torch.arange(len(prefix), n))
    (idx,) = stack.req_to_token.alloc([req])
    req.req_pool_idx = idx
    stack.req_to_token.write((idx, slice(0, n)), torch.cat([prefix, new]).to(torch.int32))
    req.cache_protected_len = len(prefix)
    cache.cache_finished_req(req, kv_len_to_handle=n)
    stack.req_to_token.free(req)
    return res
