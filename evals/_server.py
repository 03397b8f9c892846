"""Start the embedded engine in this process for an eval (the engine's own in-thread server)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["local_server"]


@contextmanager
def local_server(
    *,
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    kv_tokens: int = 32768,
    content_reuse: bool = True,
    seed: int = 0,
    api_key: str | None = None,
    cache_block_tokens: int = 1,
) -> Iterator[Any]:
    """A fresh engine (empty cache) behind HTTP on a free localhost port, stopped on exit;
    with ``api_key``, it requires that key (send it as the eval's own API key).

    Prefix reuse is per token by default (``cache_block_tokens=1``): an eval is one trusted
    client, and the baselines it stands for (SGLang's radix cache, page size 1) match per
    token; ``leyline serve``'s 16-token blocks (docs/security.md) would charge every arm up to
    15 tokens a request that those servers do not.

    Yields :class:`leyline.server.engine.server.InProcessServer` (``base_url``, ``engine``,
    ``model``).
    """
    try:
        from leyline.server.engine.config import EngineConfig
        from leyline.server.engine.server import free_port, serve_in_thread
    except ModuleNotFoundError as exc:
        from leyline.errors import MissingExtraError

        raise MissingExtraError("starting a local engine for an eval", "server", exc) from exc
    cfg = EngineConfig(
        model=model,
        device=device,
        dtype=dtype,
        port=free_port(),
        kv_tokens=kv_tokens,
        content_reuse=content_reuse,
        seed=seed,
        api_keys=(api_key,) if api_key else (),
        cache_block_tokens=cache_block_tokens,
    )
    with serve_in_thread(cfg) as srv:
        yield srv
