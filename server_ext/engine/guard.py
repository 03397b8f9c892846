"""The ASGI layer around the HTTP app: authentication, the body-size limit, request metrics
and the last-resort 500.

It runs before routing, so it covers every route (FastAPI's ``/docs`` and ``/openapi.json``
included) and refuses an unauthenticated or oversized request before a byte of its body is
read. ``/health`` is the one open route (a liveness probe that says nothing else). An exception
that escapes a handler is logged with its traceback and answered as a bare 500 (no class
names, no messages), here rather than in Starlette's outermost error middleware, which
re-raises and makes uvicorn drop the kept-alive connection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from leyline.server.engine.protocol import error_body

__all__ = ["HEALTH_PATH", "KEY_STATE", "Guard", "key_id", "tenant_of"]

log = logging.getLogger("leyline.serve")

HEALTH_PATH = "/health"
KEY_STATE = "leyline_key"  # scope["state"][KEY_STATE]: the id of the request's API key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def key_id(key: str) -> str:
    """A stable, non-secret name for an API key (its tenant's root; docs/security.md)."""
    return hashlib.sha256(b"leyline-api-key\0" + key.encode()).hexdigest()[:32]


class _TooLarge(Exception):
    pass


class Guard:
    """``Guard(app, api_keys=..., max_request_bytes=..., count=...)``; ``count(endpoint,
    status)`` is called once per HTTP request with the route template (``unmatched`` when no
    route matched, ``rejected`` when the guard answered before routing)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: tuple[str, ...],
        max_request_bytes: int,
        count: Callable[[str, int], None],
    ) -> None:
        self.app = app
        self.keys = [(k.encode(), key_id(k)) for k in api_keys]
        self.max_bytes = max_request_bytes
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", ())}
        if self.keys and scope["path"] != HEALTH_PATH:
            kid = self._authenticate(headers.get("authorization", b""))
            if kid is None:
                await self._answer(send, 401, "rejected", "Incorrect or missing API key: send "
                                   "'Authorization: Bearer <key>'", code="invalid_api_key")  # fmt: skip
                return
            scope.setdefault("state", {})[KEY_STATE] = kid
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._answer(send, 413, "rejected", self._too_large(), code="request_too_large")
            return

        started = False
        status = 500
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # chunked bodies carry no content-length
                    raise _TooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, int(message["status"])
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._answer(send, 413, None, self._too_large(), code="request_too_large")
                started, status = True, 413
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error %s on %s %s", ref, scope["method"], scope["path"])
            if not started:
                await send_json(send, 500, error_body(f"internal error (reference {ref})",
                                                      type="server_error", code="internal_error"))  # fmt: skip
                started, status = True, 500
        self.count(_endpoint(scope), status)

    def _authenticate(self, header: bytes) -> str | None:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        found = None
        for key, kid in self.keys:  # compare against every key: no early exit to time
            if hmac.compare_digest(token, key):
                found = kid
        return found

    def _too_large(self) -> str:
        return f"request body exceeds {self.max_bytes} bytes"

    async def _answer(
        self, send: Send, status: int, endpoint: str | None, message: str, *, code: str
    ) -> None:
        await send_json(send, status, error_body(message, code=code))
        if endpoint is not None:
            self.count(endpoint, status)


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _endpoint(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def tenant_of(key: str | None, cache_salt: str | None) -> str:
    """A request's tenant: its API key's id (None without authentication) and its
    ``cache_salt`` (vLLM's request field). ``""`` (the shared namespace) when it has neither."""
    if key is None and cache_salt is None:
        return ""
    material = f"{key or ''}\0{cache_salt if cache_salt is not None else ''}"
    return "t" + hashlib.sha256(material.encode()).hexdigest()[:23]
