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
) -> Iterator[Any]:
    """A fresh engine (empty cache) behind HTTP on a free localhost port, stopped on exit;
    with ``api_key``, it requires that key (send it as the eval's own API key).

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
    )
    with serve_in_thread(cfg) as srv:
        yield srv
