"""A STUB OpenAI-compatible HTTP server for the middleware tests (not a model, not Leyline).

It listens on 127.0.0.1 on a free port (stdlib ``http.server`` in a thread), records every
request body, and answers ``POST /v1/chat/completions`` with scripted replies: text or tool
calls, streamed (SSE) when asked. Three behaviours of real servers are modelled:

- ``leyline=True``: the response carries a ``leyline`` accounting object (and
  ``usage.prompt_tokens_details.cached_tokens``), on the final chunk when streaming;
- ``leyline=False``: a plain OpenAI-compatible server that ignores the field;
- ``strict=True``: a server that rejects the unknown ``custom_params`` field (the payload's
  carrier) with an OpenAI-shaped 400 (and never returns accounting).

Recorded bodies hold the payload decoded under ``"leyline"`` (it arrives as the JSON string
``custom_params.leyline``) so tests can read it; ``raw_requests`` keeps the bodies as sent.

The accounting numbers are a deterministic function of the request so tests can check sums:
``exact = 10 * version``, ``spliced = 3 * len(directives)``, ``recomputed = 7``.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer: ``content`` text and/or ``tool_calls`` as ``(name, args dict)``,
    or an OpenAI-shaped ``error`` with HTTP ``status``."""

    content: str | None = "ok"
    tool_calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    error: str | None = None
    status: int = 400


@dataclass
class StubOpenAIServer:
    """The stub server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    leyline: bool = True
    strict: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    raw_requests: list[dict[str, Any]] = field(default_factory=list)
    script: deque[Reply] = field(default_factory=deque)
    _server: ThreadingHTTPServer | None = None
    _calls: int = 0

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def queue(self, *replies: Reply) -> None:
        """Append scripted replies; when the script runs out the stub answers ``"ok"``."""
        self.script.extend(replies)

    @property
    def bodies_with_leyline(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "leyline" in r]

    def start(self) -> StubOpenAIServer:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                stub.raw_requests.append(json.loads(json.dumps(body)))
                carried = (body.get("custom_params") or {}).get("leyline")
                if isinstance(carried, str):
                    body["leyline"] = json.loads(carried)
                stub.requests.append(body)
                if not self.path.endswith("/chat/completions"):
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                elif stub.strict and "custom_params" in body:
                    msg = "Unrecognized request argument supplied: custom_params"
                    self._json(400, _error(msg, param="custom_params"))
                elif stub.script and stub.script[0].error is not None:
                    reply = stub.script.popleft()
                    self._json(reply.status, _error(reply.error or "", param=None))
                elif body.get("stream"):
                    self._sse(stub._answer(body, stream=True))
                else:
                    self._json(200, stub._answer(body, stream=False)[0])

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, chunks: list[dict[str, Any]]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for c in chunks:
                    self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StubOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answers ------------------------------------------------------------------------------
    def _answer(self, body: dict[str, Any], *, stream: bool) -> list[dict[str, Any]]:
        self._calls += 1
        reply = self.script.popleft() if self.script else Reply()
        ident = f"chatcmpl-stub{self._calls}"
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{self._calls}_{k}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
                for k, (name, args) in enumerate(reply.tool_calls)
            ]
        finish = "tool_calls" if reply.tool_calls else "stop"
        prompt_tokens = sum(len(json.dumps(m)) for m in body.get("messages", [])) // 4
        extra = self._accounting(body, prompt_tokens)
        base = {"id": ident, "created": 1, "model": body.get("model", "stub")}
        if not stream:
            return [
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    **extra,
                }
            ]
        chunk = {**base, "object": "chat.completion.chunk"}
        words = (reply.content or "").split(" ")
        out = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        out += [
            {**chunk, "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}}]}
            for i, w in enumerate(words)
        ]
        out.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        out.append({**chunk, "choices": [], **extra})
        return out

    def _accounting(self, body: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        ley = body.get("leyline") if isinstance(body.get("leyline"), dict) else None
        exact = 10 * int(ley.get("version", 0)) if ley else 0
        directives = ley.get("directives", []) if ley else []
        cached = exact + 3 * len(directives)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 2,
            "total_tokens": prompt_tokens + 2,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if not self.leyline or self.strict:
            return {"usage": usage}
        return {
            "usage": usage,
            "leyline": {
                "session": ley.get("session") if ley else None,
                "version": ley.get("version") if ley else None,
                "tokens": {
                    "exact": exact,
                    "spliced": 3 * len(directives),
                    "chunk_reused": 0,
                    "recomputed": 7,
                },
                "directives": [
                    {"index": i, "status": "applied", "reason": None}
                    for i in range(len(directives))
                ],
            },
        }


def _error(message: str, param: str | None = "leyline") -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }
