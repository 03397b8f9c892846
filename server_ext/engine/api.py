"""The OpenAI-compatible HTTP API of ``leyline serve`` (FastAPI).

Handlers parse and validate (pydantic at this boundary only), tokenize in a worker thread,
submit :class:`~leyline.server.engine.engine.Work` to the engine and answer in OpenAI's shapes,
including its error shape for every 4xx/5xx.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from leyline.errors import DirectiveError, PayloadError
from leyline.protocol import (
    PROTOCOL_VERSION,
    SESSION_ID,
    Payload,
    ResponseInfo,
    usage_details,
    with_accounting,
)
from leyline.segments import render_segments
from leyline.server.engine.engine import Engine
from leyline.server.engine.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_body,
)
from leyline.server.engine.request import EngineError, Finished, SamplingParams, Work
from leyline.server.engine.sessions import UnknownSession
from leyline.server.engine.tokenize import tokenize_chat
from leyline.server.engine.toolcalls import parse_tool_calls

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Metrics:
    """Prometheus metrics on a registry of the app's own (several apps may share a process)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "leyline_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "leyline_prompt_tokens", "Prompt tokens by how they were served", ["kind"], registry=r
        )
        self.completion_tokens = Counter(
            "leyline_completion_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "leyline_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "leyline_request_latency_seconds",
            "Engine time per request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_used = Gauge("leyline_kv_used_tokens", "KV slots in use", registry=r)
        self.kv_capacity = Gauge("leyline_kv_capacity_tokens", "KV slots in the pool", registry=r)
        self.evicted = Gauge("leyline_evicted_tokens", "Tokens evicted so far", registry=r)
        self.sessions = Gauge("leyline_sessions", "Open sessions", registry=r)
        self.queue = Gauge("leyline_queue_depth", "Requests waiting for the engine", registry=r)
        self.engine = engine
        engine.observers.append(self.observe)

    def observe(self, done: Finished) -> None:
        for kind, n in done.tokens.to_wire().items():
            if kind != "approximate":  # a sum of three kinds, not a kind
                self.prompt_tokens.labels(kind).inc(n)
        self.completion_tokens.inc(len(done.token_ids))
        self.ttft.observe(done.ttft_s)
        self.latency.observe(done.latency_s)

    def render(self) -> bytes:
        stats = self.engine.stats()
        self.kv_used.set(stats["kv"]["used_tokens"])
        self.kv_capacity.set(stats["kv"]["capacity_tokens"])
        self.evicted.set(stats["counters"]["evicted_tokens"])
        self.sessions.set(stats["sessions"])
        self.queue.set(self.engine.queue_depth)
        return generate_latest(self.registry)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _from_engine(exc: EngineError) -> APIError:
    """The engine's refusal as an answer in OpenAI's error shape."""
    return APIError(exc.status, str(exc), code=exc.code, param=exc.param, type=exc.type)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), loc or None


def create_app(
    engine: Engine, *, model_name: str, max_request_bytes: int, max_tokens_default: int = 256
) -> FastAPI:
    """The HTTP app over a started engine."""
    app = FastAPI(title="Leyline", version="0.1.0")
    metrics = _Metrics(engine)
    app.state.engine = engine
    app.state.metrics = metrics
    loaded = engine.loaded
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return _error(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return await _api_error(request, _from_engine(exc))

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        raw = await request.body()
        if len(raw) > max_request_bytes:
            raise APIError(
                413, f"request body exceeds {max_request_bytes} bytes", code="request_too_large"
            )
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise APIError(400, f"malformed JSON: {exc}", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, param=param, code="invalid_request") from exc
        assert isinstance(parsed, SamplingFields)
        if parsed.model != model_name:
            raise APIError(
                404,
                f"model {parsed.model!r} is not served here (try {model_name!r})",
                param="model",
                code="model_not_found",
            )
        return parsed

    def sampling(req: SamplingFields) -> SamplingParams:
        try:
            stops = tuple(req.stop_list())
        except ValueError as exc:
            raise APIError(400, str(exc), param="stop", code="invalid_request") from exc
        return SamplingParams(
            max_tokens=req.token_limit(max_tokens_default),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=stops,
            seed=req.seed,
        )

    def check_length(n: int) -> None:
        if n >= loaded.max_positions:
            raise APIError(
                400,
                f"the prompt has {n} tokens; this model's context is {loaded.max_positions}",
                param="messages",
                code="context_length_exceeded",
            )
        if n > engine.store.capacity:
            raise APIError(
                400,
                f"the prompt has {n} tokens; the KV cache holds {engine.store.capacity}",
                param="messages",
                code="context_length_exceeded",
            )

    async def run(work: Work) -> Finished:
        try:
            return await asyncio.wrap_future(engine.submit(work))
        except asyncio.CancelledError:
            work.cancelled.set()
            raise
        except EngineError as exc:
            raise _from_engine(exc) from exc
        except DirectiveError as exc:
            raise APIError(
                400, str(exc), param="leyline.directives", code="invalid_directive"
            ) from exc
        except UnknownSession as exc:
            raise APIError(404, str(exc), code="unknown_session") from exc

    def payload(req: ChatCompletionRequest) -> Payload | None:
        body = {"leyline": req.leyline, "custom_params": req.custom_params,
                "prompt_cache_key": req.prompt_cache_key}  # fmt: skip
        try:
            return Payload.from_request(body)
        except PayloadError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc

    def chat_work(req: ChatCompletionRequest) -> Work:
        ley = payload(req)
        messages = req.message_dicts()
        try:
            prompt = tokenize_chat(loaded.tokenizer, messages, tools=req.tools)
        except Exception as exc:  # templates raise TemplateError, TypeError, ...
            raise APIError(
                400,
                f"cannot render the chat template: {exc}",
                param="messages",
                code="invalid_request",
            ) from exc
        check_length(len(prompt.ids))
        hashes: tuple[str, ...] = ()
        aligned = prompt.aligned
        if ley is not None and aligned:
            hashes = tuple(s.hash for s in render_segments(messages, tools=req.tools))
            aligned = len(hashes) == len(prompt.segment_spans)
        return Work(
            ids=np.asarray(prompt.ids, dtype=np.int64),
            sampling=sampling(req),
            segment_spans=tuple(prompt.segment_spans),
            segment_hashes=hashes,
            aligned=aligned,
            leyline=ley,
        )

    def usage(done: Finished) -> dict[str, Any]:
        counts = {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": len(done.token_ids),
            "total_tokens": done.prompt_tokens + len(done.token_ids),
        }
        if done.session is None:
            return {**counts, "prompt_tokens_details": usage_details(done.tokens)}
        return with_accounting(counts, leyline_obj(done))  # usage.leyline: see protocol.md

    def leyline_obj(done: Finished) -> dict[str, Any]:
        return ResponseInfo(
            session=done.session,
            version=done.version,
            tokens=done.tokens,
            directives=done.directives,
            notes=tuple(done.notes),
            extra={"ttft_ms": round(done.ttft_s * 1000, 2), "timings_ms": done.timings_ms},
        ).to_wire()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        work = await asyncio.to_thread(chat_work, req)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream_chat(work, rid, req), media_type="text/event-stream")
        done = await run(work)
        content, tool_calls = parse_tool_calls(done.text) if req.tools else (done.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish = done.finish_reason if done.finish_reason != "cancelled" else "stop"
        if tool_calls:
            message["tool_calls"] = tool_calls
            finish = "tool_calls"
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
                ],
                "usage": usage(done),
                "leyline": leyline_obj(done) if done.session is not None else None,
            }
        )

    async def _stream_chat(
        work: Work, rid: str, req: ChatCompletionRequest
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        work.on_text = on_text
        head = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_name,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            body = {
                **head,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
                **extra,
            }
            return f"data: {json.dumps(body)}\n\n".encode()

        task = asyncio.ensure_future(run(work))
        try:
            yield chunk({"role": "assistant", "content": ""})
            while not (task.done() and pieces.empty()):
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield chunk({"content": getter.result()})
                else:
                    getter.cancel()
            try:
                done = task.result()
            except APIError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            finish = done.finish_reason if done.finish_reason != "cancelled" else "stop"
            extra: dict[str, Any] = {"usage": usage(done)}
            if done.session is not None:
                extra["leyline"] = leyline_obj(done)
            yield chunk({}, finish, **extra)
            yield b"data: [DONE]\n\n"
            metrics.requests.labels("/v1/chat/completions", "200").inc()
        finally:
            if not task.done():  # the client went away: stop generating, free resources
                work.cancelled.set()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await parse(request, CompletionRequest)
        if req.stream:
            raise APIError(
                400,
                "streaming is supported on /v1/chat/completions only",
                param="stream",
                code="invalid_request",
            )

        def encode() -> np.ndarray:
            if isinstance(req.prompt, str):
                ids = loaded.tokenizer.encode(req.prompt, add_special_tokens=False)
            else:
                ids = list(req.prompt)
                if any(not 0 <= t < loaded.vocab_size for t in ids):
                    raise APIError(
                        400,
                        "prompt token ids out of the vocabulary",
                        param="prompt",
                        code="invalid_request",
                    )
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_request")
            check_length(len(ids))
            return np.asarray(ids, dtype=np.int64)

        ids = await asyncio.to_thread(encode)
        done = await run(Work(ids=ids, sampling=sampling(req)))
        metrics.requests.labels("/v1/completions", "200").inc()
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "text": done.text,
                        "finish_reason": done.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage(done),
            }
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": created, "owned_by": "leyline"}
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def session_id(sid: str) -> str:
        if not SESSION_ID.match(sid):
            raise APIError(
                400,
                "session ids are 1-128 characters of [A-Za-z0-9._:-]",
                param="session",
                code="invalid_request",
            )
        return sid

    @app.post("/v1/leyline/sessions/{sid}")
    async def open_session(sid: str, request: Request) -> dict[str, Any]:
        raw = await request.body()
        ttl = None
        if raw.strip():
            try:
                body = json.loads(raw)
                ttl = body.get("ttl_s") if isinstance(body, dict) else None
            except ValueError as exc:
                raise APIError(400, f"malformed JSON: {exc}", code="invalid_json") from exc
            if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
                raise APIError(
                    400, "ttl_s must be a positive number", param="ttl_s", code="invalid_request"
                )
        return await asyncio.to_thread(engine.open_session, session_id(sid), ttl)

    @app.get("/v1/leyline/sessions/{sid}")
    async def get_session(sid: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(engine.session_info, session_id(sid))
        except UnknownSession as exc:
            raise APIError(404, str(exc), code="unknown_session") from exc

    @app.delete("/v1/leyline/sessions/{sid}")
    async def close_session(sid: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(engine.close_session, session_id(sid))
        except UnknownSession as exc:
            raise APIError(404, str(exc), code="unknown_session") from exc

    @app.get("/v1/leyline/info")
    async def info() -> dict[str, Any]:
        return {"server": "leyline-engine", "protocol": PROTOCOL_VERSION,
                "payload": ["custom_params.leyline", "leyline"], "model": model_name}  # fmt: skip

    @app.get("/v1/leyline/stats")
    async def stats() -> dict[str, Any]:
        return await asyncio.to_thread(engine.stats)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, code=code), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(
            error_body(
                f"internal error: {type(exc).__name__}: {exc}",
                type="server_error",
                code="internal_error",
            ),
            500,
        )

    return app
