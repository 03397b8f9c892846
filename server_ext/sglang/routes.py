"""``/v1/leyline/...`` routes added to SGLang's module-level FastAPI app (main process only)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, FastAPI

__all__ = ["PREFIX", "install_routes", "make_router"]

PREFIX = "/v1/leyline"


def make_router() -> APIRouter:
    """Routes: health, session open and close.

    Session state (base token sequences) lives in the scheduler processes, keyed by the
    client's session id and bounded by LRU; opening only hands out an id and closing is
    advisory (the state ages out).
    """
    router = APIRouter(prefix=PREFIX)

    @router.get("/health")
    def health() -> dict[str, Any]:
        from sglang.srt.mem_cache.registry import get_radix_cache_factory

        return {"backend": "leyline", "registered": get_radix_cache_factory("leyline") is not None}

    @router.post("/sessions")
    def open_session() -> dict[str, Any]:
        return {"session": uuid.uuid4().hex, "version": 0}

    @router.delete("/sessions/{session_id}")
    def close_session(session_id: str) -> dict[str, Any]:
        return {"session": session_id, "closed": True}

    return router


def install_routes(app: FastAPI) -> bool:
    """Include the router once; False when ``app`` already has it."""
    # NOTE: recent FastAPI wraps included routers, so app.routes does not list our paths.
    if getattr(app.state, "leyline_routes", False):
        return False
    app.include_router(make_router())
    app.state.leyline_routes = True
    return True
