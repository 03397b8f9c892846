"""``/v1/leyline/...`` routes added to SGLang's module-level FastAPI app (main process only).

Only what the main process can answer truthfully: session state (base token sequences) lives
in the scheduler processes, so ``GET /v1/leyline/sessions/{id}`` and ``/stats`` of
docs/protocol.md are not served here (docs/sglang.md, "What differs on SGLang").

Authentication is SGLang's: with ``--api-key`` its launcher adds an ASGI middleware to the
whole ``app`` (``sglang.srt.utils.auth.add_api_key_middleware``, 0.5.16 and 0.5.23), which
covers this router (tests/server/sglang/test_sgl_tenants.py fails if it stops doing so). The
session routes hold no state, so their answers are the same for every tenant
(docs/security.md, "On SGLang").
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from leyline.protocol import PROTOCOL_VERSION, SESSION_ID

__all__ = ["PREFIX", "install_routes", "make_router"]

PREFIX = "/v1/leyline"


def make_router() -> APIRouter:
    """Routes: health, info, session open and close (both advisory: a session opens with its
    first request and its state ages out of the scheduler's LRU)."""
    router = APIRouter(prefix=PREFIX)

    @router.get("/health")
    def health() -> dict[str, Any]:
        from sglang.srt.mem_cache.registry import get_radix_cache_factory

        return {"backend": "leyline", "registered": get_radix_cache_factory("leyline") is not None}

    @router.get("/info")
    def info() -> dict[str, Any]:
        return {
            "server": "sglang",
            "protocol": PROTOCOL_VERSION,
            "payload": "custom_params.leyline",
        }

    @router.post("/sessions/{session_id}", response_model=None)
    def open_session(session_id: str) -> dict[str, Any] | JSONResponse:
        if not SESSION_ID.match(session_id):
            return _bad_session_id()
        return {"id": session_id, "opened": True, "advisory": True}

    @router.delete("/sessions/{session_id}", response_model=None)
    def close_session(session_id: str) -> dict[str, Any] | JSONResponse:
        if not SESSION_ID.match(session_id):
            return _bad_session_id()
        return {"id": session_id, "closed": True, "advisory": True}

    return router


def _bad_session_id() -> JSONResponse:
    error = {
        "message": "session ids are 1-128 characters of [A-Za-z0-9._:-]",
        "type": "invalid_request_error", "param": "session", "code": "invalid_request",
    }  # fmt: skip
    return JSONResponse({"error": error}, status_code=400)


def install_routes(app: FastAPI) -> bool:
    """Include the router once; False when ``app`` already has it."""
    # NOTE: recent FastAPI wraps included routers, so app.routes does not list our paths.
    if getattr(app.state, "leyline_routes", False):
        return False
    app.include_router(make_router())
    app.state.leyline_routes = True
    return True
