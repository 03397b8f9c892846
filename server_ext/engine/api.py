"""The OpenAI-compatible HTTP API of ``leyline serve`` (FastAPI).

Handlers parse and validate (pydantic at this boundary only), tokenize in a worker thread,
submit :class:`~leyline.server.engine.engine.Work` to the engine and answer in OpenAI's shapes,
including its error shape for every 4xx/5xx. The :class:`~leyline.server.engine.guard.Guard`
around the app authenticates, limits body sizes, counts requests and turns escaped exceptions
into bare 500s. A request's tenant (docs/security.md) is its API key plus its ``cache_salt``.

A client that goes away stops its request: a non-streaming handler watches for the
disconnect while it waits, a stream's generator is closed by Starlette. A stream answers
errors that happen before its first token as ordinary HTTP errors (it waits for the first
token before sending the 200), and later ones as an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from leyline.errors import DirectiveError, PayloadError
from leyline.protocol import (
    PAYLOAD_KEY,
    PROTOCOL_VERSION,
    SESSION_ID,
    Payload,
    ResponseInfo,
    usage_details,
    with_accounting,
)
from leyline.segments import render_segments
from leyline.server.engine.config import EngineConfig
from leyline.server.engine.engine import Engine
from leyline.server.engine.guard import HEALTH_PATH, KEY_STATE, Guard, tenant_of
from leyline.server.engine.metrics import Metrics
from leyline.server.engine.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    SamplingFields,
    SessionRequest,
    error_body,
    load_json,
)
from leyline.server.engine.request import EngineError, Finished, SamplingParams, Work
from leyline.server.engine.sessions import UnknownSession
from leyline.server.engine.tokenize import tokenize_chat
from leyline.server.engine.toolcalls import parse_tool_calls

log = logging.getLogger("leyline.serve")

_T = TypeVar("_T", bound=BaseModel)

# below these, sampling is greedy (vLLM and SGLang treat tiny temperatures the same way; a
# nucleus below the top token's mass is the top token)
_GREEDY_TEMPERATURE = 1e-5
_GREEDY_TOP_P = 1e-6

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "invalid request (OpenAI's error shape; `code` says which rule)",
        401: "missing or wrong API key",
        404: "unknown model or session (other tenants' sessions are unknown)",
        409: "the session has a request in flight",
        413: "request body too large",
        429: "too many sessions",
        500: "internal error (details are in the server log)",
        503: "overloaded or KV cache full; retry later",
    }.items()
}
_SCHEMAS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, SessionRequest)


def _body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref}}}}


def _from_engine(exc: EngineError) -> APIError:
    """The engine's refusal as an answer in OpenAI's error shape."""
    return APIError(exc.status, str(exc), code=exc.code, param=exc.param, type=exc.type)


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
    return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), loc or None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _quiet(fut: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's outcome nobody waits for (no 'never retrieved' noise)."""
    if not fut.cancelled():
        fut.exception()


def create_app(engine: Engine, cfg: EngineConfig) -> FastAPI:
    """The HTTP app over a started engine."""
    app = FastAPI(title="Leyline", version="0.1.0")
    metrics = Metrics(engine)
    app.add_middleware(
        Guard,  # type: ignore[arg-type]  # a pure ASGI middleware class
        api_keys=cfg.api_keys,
        max_request_bytes=cfg.max_request_bytes,
        count=metrics.count,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    loaded = engine.loaded
    model_name = cfg.model
    created = int(time.time())
    room = min(loaded.max_positions, engine.store.capacity)  # prompt + max_tokens must fit

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _SCHEMAS:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return await _api_error(request, _from_engine(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return await _api_error(
            request, APIError(400, message, param=param, code="invalid_request")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, code=code), exc.status_code)

    def tenant(request: Request, cache_salt: str | None) -> str:
        return tenant_of(request.scope.get("state", {}).get(KEY_STATE), cache_salt)

    async def parse(request: Request, schema: type[_T]) -> _T:
        data = load_json(await request.body())  # the guard has bounded its size
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(list(exc.errors()))
            raise APIError(400, message, param=param, code="invalid_request") from exc
        if isinstance(parsed, SamplingFields):
            name = parsed.unsupported()
            if name is not None:
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")  # fmt: skip
            if parsed.model != model_name:
                raise APIError(
                    404,
                    f"model {parsed.model!r} is not served here (try {model_name!r})",
                    param="model",
                    code="model_not_found",
                )
        return parsed

    def check_length(n: int, param: str) -> None:
        if n >= room:
            raise APIError(
                400,
                f"the prompt has {n} tokens; this server fits {room} tokens of prompt and "
                f"output (the model's context is {loaded.max_positions}, the KV cache "
                f"{engine.store.capacity})",
                param=param,
                code="context_length_exceeded",
            )

    def sampling(req: SamplingFields, n_prompt: int) -> SamplingParams:
        try:
            stops = tuple(req.stop_list())
        except ValueError as exc:
            raise APIError(400, str(exc), param="stop", code="invalid_request") from exc
        left = room - n_prompt
        asked = req.token_limit()
        if asked is not None and asked > left:
            raise APIError(
                400,
                f"max_tokens {asked} does not fit: the prompt has {n_prompt} tokens and this "
                f"server fits {room} tokens of prompt and output",
                param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                code="context_length_exceeded",
            )
        greedy = req.temperature < _GREEDY_TEMPERATURE or req.top_p < _GREEDY_TOP_P
        return SamplingParams(
            max_tokens=asked or min(cfg.max_tokens_default, left),
            temperature=0.0 if greedy else req.temperature,
            top_p=1.0 if greedy else req.top_p,
            stop=stops,
            seed=req.seed,
        )

    def submit(work: Work) -> Future[Finished]:
        try:
            return engine.submit(work)
        except EngineError as exc:
            raise _from_engine(exc) from exc

    async def outcome(waiter: Awaitable[Finished]) -> Finished:
        try:
            return await waiter
        except EngineError as exc:
            raise _from_engine(exc) from exc
        except DirectiveError as exc:
            raise APIError(
                400, str(exc), param="leyline.directives", code="invalid_directive"
            ) from exc
        except UnknownSession as exc:
            raise APIError(404, str(exc), code="unknown_session") from exc

    async def run(request: Request, work: Work) -> Finished:
        """Serve ``work``; a client that disconnects meanwhile cancels it."""
        waiter = asyncio.wrap_future(submit(work))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            pending: set[asyncio.Future[Any]] = {waiter, watcher}
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancelled.set()
            raise
        finally:
            watcher.cancel()
        if not waiter.done():  # nobody is listening any more
            work.cancelled.set()
            waiter.add_done_callback(_quiet)
            raise APIError(499, "the client disconnected", code="cancelled")
        return await outcome(waiter)

    def payload(req: ChatCompletionRequest) -> Payload | None:
        body = {PAYLOAD_KEY: req.leyline, "custom_params": req.custom_params,
                "prompt_cache_key": req.prompt_cache_key}  # fmt: skip
        try:
            return Payload.from_request(body)
        except PayloadError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from exc

    def chat_work(req: ChatCompletionRequest, tenant_id: str) -> Work:
        ley = payload(req)
        sent = req.leyline is not None or (
            isinstance(req.custom_params, dict) and PAYLOAD_KEY in req.custom_params
        )  # a payload of the request's own, not just OpenAI's prompt_cache_key
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
        check_length(len(prompt.ids), "messages")
        hashes: tuple[str, ...] = ()
        aligned = prompt.aligned
        if ley is not None and aligned:
            try:
                hashes = tuple(s.hash for s in render_segments(messages, tools=req.tools))
            except (TypeError, ValueError, KeyError) as exc:
                raise APIError(400, f"cannot segment the messages: {exc}", param="messages",
                               code="invalid_request") from exc  # fmt: skip
            aligned = len(hashes) == len(prompt.segment_spans)
        return Work(
            ids=np.asarray(prompt.ids, dtype=np.int64),
            sampling=sampling(req, len(prompt.ids)),
            segment_spans=tuple(prompt.segment_spans),
            segment_hashes=hashes,
            aligned=aligned,
            leyline=ley,
            tenant=tenant_id,
            opted_in=sent and ley is not None and ley.approximate and ley.content_reuse,
        )

    def leyline_obj(done: Finished) -> dict[str, Any]:
        return ResponseInfo(
            session=done.session,
            version=done.version,
            tokens=done.tokens,
            directives=done.directives,
            notes=tuple(done.notes),
            extra={"ttft_ms": round(done.ttft_s * 1000, 2), "timings_ms": done.timings_ms},
        ).to_wire()

    def accounting(done: Finished) -> dict[str, Any]:
        """A response's ``usage`` and, for a session, its ``leyline`` object (built once;
        ``usage.leyline`` repeats it, see protocol.md)."""
        counts = {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": len(done.token_ids),
            "total_tokens": done.prompt_tokens + len(done.token_ids),
        }
        if done.session is None:
            return {"usage": {**counts, "prompt_tokens_details": usage_details(done.tokens)}}
        info = leyline_obj(done)
        return {"usage": with_accounting(counts, info), PAYLOAD_KEY: info}

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest), responses=_ERRORS)
    async def chat(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest)
        work = await asyncio.to_thread(chat_work, req, tenant(request, req.cache_salt))
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return await stream(request, work, rid)
        done = await run(request, work)
        content, tool_calls = parse_tool_calls(done.text) if req.tools else (done.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish = done.finish_reason
        if tool_calls:
            message["tool_calls"] = tool_calls
            finish = "tool_calls"
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
                ],
                PAYLOAD_KEY: None,
                **accounting(done),
            }
        )

    async def stream(request: Request, work: Work, rid: str) -> Response:
        """Wait for the first token (errors before it are plain HTTP errors), then stream."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        started = asyncio.Event()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def on_start() -> None:
            loop.call_soon_threadsafe(started.set)

        work.on_text, work.on_start = on_text, on_start
        task = asyncio.ensure_future(outcome(asyncio.wrap_future(submit(work))))
        first = asyncio.ensure_future(started.wait())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, first, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancelled.set()
            raise
        finally:
            first.cancel()
            watcher.cancel()
        if task.done() and task.exception() is not None and pieces.empty():
            raise task.exception()  # type: ignore[misc]  # answered by the handlers above
        if not (task.done() or started.is_set()):  # the client left before the first token
            work.cancelled.set()
            task.add_done_callback(_quiet)
            raise APIError(499, "the client disconnected", code="cancelled")
        return StreamingResponse(_events(work, rid, task, pieces), media_type="text/event-stream")

    async def _events(
        work: Work, rid: str, task: asyncio.Future[Finished], pieces: asyncio.Queue[str]
    ) -> AsyncIterator[bytes]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model_name}  # fmt: skip

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n".encode()

        def error(exc: APIError) -> bytes:
            return f"data: {json.dumps(exc.body())}\n\ndata: [DONE]\n\n".encode()

        getter: asyncio.Future[str] | None = None
        try:
            yield chunk({"role": "assistant", "content": ""})
            while not (task.done() and pieces.empty()):
                getter = asyncio.ensure_future(pieces.get())
                both: set[asyncio.Future[Any]] = {getter, task}
                await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield chunk({"content": getter.result()})
                else:
                    getter.cancel()
            try:
                done = task.result()
            except APIError as exc:
                yield error(exc)
                return
            yield chunk({}, done.finish_reason, **accounting(done))
            yield b"data: [DONE]\n\n"
        except Exception:  # a bug: the client gets an error event, the log the traceback
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error %s in the stream of %s", ref, rid)
            yield error(APIError(500, f"internal error (reference {ref})",
                                 code="internal_error", type="server_error"))  # fmt: skip
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if not task.done():  # the client went away: stop generating, free resources
                work.cancelled.set()
                task.add_done_callback(_quiet)

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest), responses=_ERRORS)
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
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
            check_length(len(ids), "prompt")
            return np.asarray(ids, dtype=np.int64)

        ids = await asyncio.to_thread(encode)
        work = Work(
            ids=ids, sampling=sampling(req, len(ids)), tenant=tenant(request, req.cache_salt)
        )
        done = await run(request, work)
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
                **accounting(done),
            }
        )

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": created, "owned_by": "leyline"}
            ],
        }

    @app.get(HEALTH_PATH)
    async def health() -> dict[str, Any]:
        return {"status": "ok"}  # open without a key: says nothing else

    @app.get("/metrics", responses=_ERRORS)
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

    def unknown(exc: UnknownSession) -> APIError:
        return APIError(404, str(exc), param="session", code="unknown_session")

    salt_query = Query(
        default=None,
        min_length=1,
        max_length=256,
        description="the cache_salt the session's requests carry (it is part of the tenant)",
    )

    @app.post(
        "/v1/leyline/sessions/{sid}",
        openapi_extra=_body(SessionRequest, required=False),
        responses=_ERRORS,
    )
    async def open_session(
        sid: str, request: Request, cache_salt: str | None = salt_query
    ) -> dict[str, Any]:
        raw = await request.body()
        body = SessionRequest()
        if raw.strip():
            data = load_json(raw)
            try:
                body = SessionRequest.model_validate(data)
            except ValidationError as exc:
                message, param = _validation_message(list(exc.errors()))
                raise APIError(400, message, param=param, code="invalid_request") from exc
        if body.ttl_s is not None and body.ttl_s > cfg.max_session_ttl_s:
            raise APIError(400, f"ttl_s must be at most {cfg.max_session_ttl_s} seconds",
                           param="ttl_s", code="invalid_request")  # fmt: skip
        return await asyncio.to_thread(
            engine.open_session, session_id(sid), body.ttl_s, tenant=tenant(request, cache_salt)
        )

    @app.get("/v1/leyline/sessions/{sid}", responses=_ERRORS)
    async def get_session(
        sid: str, request: Request, cache_salt: str | None = salt_query
    ) -> dict[str, Any]:
        try:
            return engine.session_info(session_id(sid), tenant=tenant(request, cache_salt))
        except UnknownSession as exc:
            raise unknown(exc) from exc

    @app.delete("/v1/leyline/sessions/{sid}", responses=_ERRORS)
    async def close_session(
        sid: str, request: Request, cache_salt: str | None = salt_query
    ) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(
                engine.close_session, session_id(sid), tenant=tenant(request, cache_salt)
            )
        except UnknownSession as exc:
            raise unknown(exc) from exc

    @app.get("/v1/leyline/info", responses=_ERRORS)
    async def info() -> dict[str, Any]:
        return {"server": "leyline-engine", "protocol": PROTOCOL_VERSION,
                "payload": ["custom_params.leyline", "leyline"], "model": model_name}  # fmt: skip

    @app.get("/v1/leyline/stats", responses=_ERRORS)
    async def stats() -> dict[str, Any]:
        return engine.stats()

    return app
