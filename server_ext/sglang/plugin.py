"""SGLang plugin entry point: registers the ``leyline`` radix-cache backend and HTTP routes.

Entry point (pyproject): ``[project.entry-points."sglang.srt.plugins"] leyline =
"leyline.server.sglang.plugin:register"``. SGLang calls `register` with no arguments in the
main process and in every scheduler process, and swallows its exceptions, so failures are
logged here as errors that name the cause before being re-raised. Everywhere it registers the
prefill-adder hooks that end a chunk at a recompute window (`windows.install_window_hooks`);
in the main process (the one that serves HTTP) also the OpenAI-layer hooks that validate
payloads and carry the accounting (`response.install_http_hooks`) and the ``/v1/leyline``
routes. The backend factory compiles the splice kernel when the cache is built
(`LeylineRadixCache.warm_up`).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from typing import Any

import torch

from leyline.server.core.rope import UnsupportedRope
from leyline.server.sglang import compat
from leyline.server.sglang.pool import PoolBinding
from leyline.server.sglang.rotary import rope_specs_from_model
from leyline.server.sglang.windows import install_window_hooks

__all__ = [
    "BACKEND_NAME",
    "UnsupportedConfig",
    "check_supported",
    "leyline_cache_factory",
    "register",
]

logger = logging.getLogger("leyline.sglang")

BACKEND_NAME = "leyline"
_SPLICE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class UnsupportedConfig(ValueError):
    """The server configuration cannot be served exactly by the Leyline cache."""


def check_supported(ctx: Any) -> None:
    """Raise `UnsupportedConfig` listing every reason ``ctx`` (a TreeCacheBuildContext) is refused."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    why: list[str] = []
    if ctx.is_hybrid_swa:
        why.append("hybrid sliding-window models (SWA pools) are not supported")
    if ctx.is_hybrid_ssm:
        why.append("hybrid SSM/Mamba models are not supported")
    if ctx.enable_hierarchical_cache:
        why.append("--enable-hierarchical-cache (HiCache) is not supported")
    if getattr(ctx, "is_dsa", False):
        why.append("DSA/NSA sparse-attention models are not supported")
    if ctx.params.page_size != 1:
        why.append(f"--page-size {ctx.params.page_size}: only page size 1 is supported")
    if ctx.params.is_eagle:
        why.append("EAGLE speculative decoding (bigram radix keys) is not supported")
    args = ctx.server_args
    for flag in ("enable_lmcache", "enable_flexkv"):
        if getattr(args, flag, False):
            why.append(f"--{flag.replace('_', '-')} replaces the radix cache")
    alloc = ctx.params.token_to_kv_pool_allocator
    pool = alloc.get_kvcache() if alloc is not None else None
    if pool is None:
        why.append("no KV pool is attached to the allocator")
    elif type(pool) not in (MHATokenToKVPool, MLATokenToKVPool):
        why.append(f"KV pool {type(pool).__name__}: only MHATokenToKVPool/MLATokenToKVPool")
    else:
        if pool.dtype not in _SPLICE_DTYPES:
            why.append(f"KV cache dtype {pool.dtype}: fp8/quantized KV is not supported")
        layout = getattr(pool, "kv_cache_layout", None)
        if layout not in (None, "NHD", "nhd"):
            why.append(f"KV layout {layout!r}: only NHD is supported")
        if getattr(pool, "use_dsa", False):
            why.append("DSA MLA pools are not supported")
    if why:
        raise UnsupportedConfig(
            "--radix-cache-backend leyline refused: "
            + "; ".join(why)
            + ". Drop the flag to use SGLang's default cache."
        )


def leyline_cache_factory(ctx: Any) -> Any:
    """The ``leyline`` backend factory (`TreeCacheBuildContext` -> `LeylineRadixCache`)."""
    from leyline.server.sglang.cache import LeylineCacheConfig, LeylineRadixCache

    if ctx.disable_radix_cache:
        from sglang.srt.mem_cache.registry import default_radix_cache_factory

        logger.warning("leyline: --disable-radix-cache is set; using SGLang's default cache")
        return default_radix_cache_factory(ctx)
    check_supported(ctx)
    model = ctx.tp_worker.model_runner.model
    try:
        specs = rope_specs_from_model(model)
    except UnsupportedRope as exc:
        raise UnsupportedConfig(f"--radix-cache-backend leyline refused: {exc}") from exc
    if any(s != specs[0] for s in specs[1:]):
        raise UnsupportedConfig(
            "--radix-cache-backend leyline refused: layers use different RoPE specs"
        )
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    binding = PoolBinding.from_pool(pool, specs[0])
    logger.info("leyline: radix cache on %s, %s", type(pool).__name__, binding.layout)
    from leyline._config import Environment

    env = Environment.read()
    config = LeylineCacheConfig(
        verify_splices=env.sglang_verify_splices,
        index_all_requests=env.sglang_index_all_requests,
        repair_window=env.sglang_repair_window,
    )
    cache = LeylineRadixCache(ctx.params, binding, config)
    cache.warm_up()  # compile the splice kernel at start-up, not in the first request
    return cache


def _install_routes_before_launch(*_args: Any, **_kwargs: Any) -> None:
    """BEFORE hook of ``http_server.launch_server``: add the routes to SGLang's app."""
    from sglang.srt.entrypoints import http_server

    from leyline.server.sglang.routes import install_routes

    install_routes(http_server.app)


def _register_http() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from leyline.server.sglang.response import install_http_hooks

    install_http_hooks()
    if "sglang.srt.entrypoints.http_server" in sys.modules:
        _install_routes_before_launch()
        return
    # NOTE: the CLI runs load_plugins before it imports http_server, so the routes go in when
    # the server launches (resolving this target imports http_server, as launching does).
    target = "sglang.srt.entrypoints.http_server.launch_server"
    if not any(
        h is _install_routes_before_launch for _t, h, _s in HookRegistry._hooks.get(target, ())
    ):
        HookRegistry.register(target, _install_routes_before_launch, HookType.BEFORE)


def _refuse_version(error: compat.UnsupportedSGLangVersion) -> None:
    """Register a factory that raises ``error``: SGLang swallows the entry point's exceptions,
    so without it ``--radix-cache-backend leyline`` would fail as merely "not registered"."""
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    def refuse(_ctx: Any) -> Any:
        raise error

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, refuse)


def register() -> None:
    """Entry point run by SGLang's ``load_plugins``; idempotent; loud on failure."""
    try:
        from sglang.srt.mem_cache.registry import (
            get_radix_cache_factory,
            register_radix_cache_backend,
        )

        try:
            compat.require()
        except compat.UnsupportedSGLangVersion as exc:
            _refuse_version(exc)
            raise
        if get_radix_cache_factory(BACKEND_NAME) is None:
            register_radix_cache_backend(BACKEND_NAME, leyline_cache_factory)
        if get_radix_cache_factory(BACKEND_NAME) is not leyline_cache_factory:
            raise RuntimeError(f"another factory is registered under {BACKEND_NAME!r}")
        # The prefill adder runs in the scheduler processes; the hooks only act on requests
        # the leyline cache gave a window end (windows.py), so they are harmless elsewhere.
        install_window_hooks()
        # Scheduler processes are children; only the main process serves HTTP.
        if multiprocessing.parent_process() is None:
            _register_http()
    except Exception as exc:
        logger.error("leyline: SGLang plugin registration FAILED (%s: %s)", type(exc).__name__, exc)
        raise
