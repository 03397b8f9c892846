"""Reliability of `leyline serve` (issue 13): each failure of the audit, with its exact request,
against the real server on loopback (uvicorn + FastAPI, the real `openai` client, httpx and raw
sockets). Every refusal is a 4xx in OpenAI's error shape that changes nothing and keeps the
connection; faults free everything and leave sessions where they were."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from _engine_server import RunningServer, assert_no_leaks, running_server

from leyline import Session

LIMIT = 256 * 1024  # the module server's max_request_bytes
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(kv_tokens=4096, max_request_bytes=LIMIT, max_session_ttl_s=3600.0) as s:
        yield s


@pytest.fixture
def http(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url, timeout=60) as h:
        yield h


def _state(srv: RunningServer) -> tuple[Any, ...]:
    st = srv.engine.stats()
    c = st["counters"]
    return st["kv"], st["sessions"], st["index_entries"], c["requests"], c["recomputed"]


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 2, **extra}


def _raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


_DEEP = b'{"model": "tiny-llama", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
_SURROGATE = b'{"model": "tiny-llama", "prompt": "abc \\ud800 def", "max_tokens": 2}'
_PAYLOAD = {"session": "bad-part", "version": 1}

BAD_REQUESTS = [
    ("seed 2**64", "/chat/completions", _raw(_chat(seed=2**64)), 400, "invalid_request"),
    ("nested 100,000 deep", "/chat/completions", _DEEP, 400, "invalid_json"),
    ("lone surrogate", "/completions", _SURROGATE, 400, "invalid_json"),
    (
        "text part 5",
        "/chat/completions",
        _raw(
            _chat(
                messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}],
                leyline=_PAYLOAD,
            )
        ),
        400,
        "invalid_request",
    ),
    (
        "text part null",
        "/chat/completions",
        _raw(
            _chat(
                messages=[{"role": "user", "content": [{"type": "text", "text": None}]}],
                leyline=_PAYLOAD,
            )
        ),
        400,
        "invalid_request",
    ),
    (
        "NaN",
        "/chat/completions",
        b'{"model": "tiny-llama", "temperature": NaN}',
        400,
        "invalid_json",
    ),
    ("1e400", "/chat/completions", b'{"model": "tiny-llama", "top_p": 1e400}', 400, "invalid_json"),
    ("logprobs", "/chat/completions", _raw(_chat(logprobs=True)), 400, "unsupported_parameter"),
    (
        "top_logprobs",
        "/chat/completions",
        _raw(_chat(top_logprobs=2)),
        400,
        "unsupported_parameter",
    ),
    (
        "echo",
        "/completions",
        _raw({"model": "tiny-llama", "prompt": "hi", "echo": True}),
        400,
        "unsupported_parameter",
    ),
    (
        "penalty",
        "/chat/completions",
        _raw(_chat(presence_penalty=1.0)),
        400,
        "unsupported_parameter",
    ),
    ("unknown field", "/chat/completions", _raw(_chat(surprise=1)), 400, "invalid_request"),
    (
        "max_tokens 10**9",
        "/chat/completions",
        _raw(_chat(max_tokens=10**9)),
        400,
        "context_length_exceeded",
    ),
    (
        "prompt + max_tokens > pool",
        "/chat/completions",
        _raw(_chat(max_tokens=4090)),
        400,
        "context_length_exceeded",
    ),
    (
        "stale base_version, stream",
        "/chat/completions",
        _raw(_chat(stream=True, leyline={"session": "fresh-s", "version": 2, "base_version": 1})),
        400,
        "stale_base_version",
    ),
    ("not an object", "/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("bad session id", "/leyline/sessions/bad%20id", b"{}", 400, "invalid_request"),
    ("ttl_s NaN", "/leyline/sessions/t1", b'{"ttl_s": NaN}', 400, "invalid_json"),
    ("ttl_s Infinity", "/leyline/sessions/t1", b'{"ttl_s": Infinity}', 400, "invalid_json"),
    ("ttl_s 1e300", "/leyline/sessions/t1", b'{"ttl_s": 1e300}', 400, "invalid_request"),
    ("ttl_s unknown field", "/leyline/sessions/t1", b'{"ttl": 5}', 400, "invalid_request"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_is_a_4xx_that_changes_nothing(
    srv: RunningServer, http: httpx.Client, path: str, body: bytes, status: int, code: str
) -> None:
    before = _state(srv)
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    assert r.headers.get("connection") != "close"
    assert _state(srv) == before
    assert_no_leaks(srv.engine)
    # the same kept-alive connection serves the next request
    assert http.post("/chat/completions", json=_chat()).status_code == 200


@pytest.mark.parametrize("field", [{"temperature": 1e-45}, {"top_p": 5e-324}])
def test_tiny_temperature_and_top_p_are_greedy(http: httpx.Client, field: dict[str, Any]) -> None:
    """vLLM's and SGLang's rule: below a tiny epsilon, sampling is greedy (not a 500)."""
    greedy = http.post("/chat/completions", json=_chat(max_tokens=6, temperature=0)).json()
    r = http.post("/chat/completions", json=_chat(max_tokens=6, **field))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


def test_500_carries_no_internals_and_keeps_the_connection(
    srv: RunningServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    before = srv.engine.stats()["kv"]

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(srv.engine, "materialize", boom)
    with caplog.at_level(logging.ERROR, logger="leyline.serve"):
        r = http.post("/chat/completions", json=_chat())
    monkeypatch.undo()
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert "secret-internal-detail" not in r.text and "RuntimeError" not in r.text
    assert "secret-internal-detail" in caplog.text  # the log has it
    assert srv.engine.stats()["kv"] == before
    assert http.post("/chat/completions", json=_chat()).status_code == 200


def test_exception_inside_a_stream_is_logged_and_sent_as_an_error_event(
    srv: RunningServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("commit-exploded")

    monkeypatch.setattr(srv.engine, "_commit", boom)  # after the first token was streamed
    body = _chat(max_tokens=4, stream=True)
    with (
        caplog.at_level(logging.ERROR, logger="leyline.serve"),
        http.stream("POST", "/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    monkeypatch.undo()
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "internal_error" and "commit-exploded" not in err["message"]
    assert "commit-exploded" in caplog.text
    assert_no_leaks(srv.engine)


def _raw_request(srv: RunningServer, head: str, body: bytes = b"") -> bytes:
    host, port = srv.base_url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while True:  # the status line, the headers, then the body may come in separate reads
            piece = sock.recv(65536)
            answer += piece
            top, sep, rest = answer.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in top.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if not piece or (sep and (length is None or len(rest) >= length)):
                return answer


def test_oversized_body_is_refused_before_it_is_read(srv: RunningServer) -> None:
    # a 96 MiB content-length and no body at all: the answer cannot have waited for it
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        "\r\nContent-Length: 100663296\r\n\r\n"
    )
    answer = _raw_request(srv, head)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"request_too_large" in answer


def test_oversized_chunked_body_is_refused(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # no content-length: chunked transfer encoding
        yield b'{"model": "tiny-llama", "messages": [], "pad": "'
        for _ in range(2 * LIMIT // 4096):
            yield b"x" * 4096
        yield b'"}'

    r = http.post("/chat/completions", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_failed_first_request_creates_no_session(
    srv: RunningServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = http.post(
        "/chat/completions",
        json=_chat(leyline={"session": "never-1", "version": 2, "base_version": 1}),
    )
    assert stale.status_code == 400
    assert http.get("/leyline/sessions/never-1").status_code == 404

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(srv.engine, "materialize", boom)
    failed = http.post(
        "/chat/completions", json=_chat(leyline={"session": "never-2", "version": 1})
    )
    monkeypatch.undo()
    assert failed.status_code == 500
    assert http.get("/leyline/sessions/never-2").status_code == 404
    assert_no_leaks(srv.engine)


def _wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_client_timeout_stops_generation_and_keeps_the_session_version(
    srv: RunningServer, http: httpx.Client
) -> None:
    session = Session("timeout-s")
    first = session.prepare(MESSAGES)
    ok = http.post("/chat/completions", json=_chat(**first.extra_body()))
    assert ok.status_code == 200
    session.commit(first)
    turn = [*MESSAGES, {"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}]
    second = session.prepare(turn)
    failed = srv.engine.stats()["counters"]["failed"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the server decodes
        http.post(
            "/chat/completions",
            json=_chat(max_tokens=4000, **second.extra_body()),
            timeout=httpx.Timeout(60, read=0.5),
        )
    _wait_for(lambda: srv.engine.stats()["counters"]["failed"] > failed, "not stopped")
    assert srv.engine.stats()["running"] == 0
    assert http.get("/leyline/sessions/timeout-s").json()["version"] == 1
    assert_no_leaks(srv.engine)
    retry = http.post("/chat/completions", json=_chat(**second.extra_body()))  # same version
    assert retry.status_code == 200 and retry.json()["leyline"]["version"] == 2


def test_short_request_is_not_starved_and_control_endpoints_answer(
    srv: RunningServer, http: httpx.Client
) -> None:
    """Decode steps interleave: a 2-token request finishes while a long one decodes, and
    /metrics, stats and session reads answer meanwhile (no engine lock held across it)."""
    events: list[str] = []
    started, short_done = threading.Event(), threading.Event()

    def long() -> None:
        body = _chat(max_tokens=1500, temperature=1.0, seed=3, stream=True)
        with httpx.stream("POST", f"{srv.base_url}/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                started.set()
                if line == "data: [DONE]":
                    events.append("long")
                    return
                if short_done.is_set():  # the long one was still decoding: leave it
                    events.append("long still decoding")
                    return

    assert http.post("/leyline/sessions/ctl-s").status_code == 200
    thread = threading.Thread(target=long)
    thread.start()
    try:
        assert started.wait(30)
        t0 = time.monotonic()
        for path in ("/leyline/stats", "/leyline/sessions/ctl-s"):
            assert http.get(path).status_code == 200
        assert http.get(srv.base_url.removesuffix("/v1") + "/metrics").status_code == 200
        r = http.post("/chat/completions", json=_chat(max_tokens=2))
        assert r.status_code == 200
        events.append("short")
        short_s = time.monotonic() - t0
        assert srv.engine.stats()["running"] == 1  # the long one is still decoding
    finally:
        short_done.set()
        thread.join(120)
    assert events == ["short", "long still decoding"], (events, short_s)
    _wait_for(lambda: srv.engine.stats()["running"] == 0, "the left stream kept decoding")
    assert_no_leaks(srv.engine)


def test_metrics_are_labelled_by_route_template(srv: RunningServer, http: httpx.Client) -> None:
    for i in range(40):
        assert http.get(f"/leyline/sessions/nobody-{i}").status_code == 404
        assert http.get(f"/no/such/path/{i}").status_code == 404
    text = http.get(srv.base_url.removesuffix("/v1") + "/metrics").text
    assert "nobody-" not in text and "/no/such/path" not in text
    assert 'endpoint="/v1/leyline/sessions/{sid}",status="404"' in text
    assert 'endpoint="unmatched",status="404"' in text


def test_openapi_declares_bodies_and_errors(http: httpx.Client) -> None:
    doc = http.get(str(http.base_url).removesuffix("/v1/") + "/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages", "cache_salt"} <= set(schema["properties"])
    assert schema.get("additionalProperties") is False
    for status in ("400", "401", "404", "413", "500"):
        assert status in chat["responses"]
    assert "ErrorResponse" in doc["components"]["schemas"]
    assert "requestBody" in doc["paths"]["/v1/leyline/sessions/{sid}"]["post"]


def test_session_ttl_is_capped(http: httpx.Client) -> None:
    assert http.post("/leyline/sessions/ttl-ok", json={"ttl_s": 3600}).status_code == 200
    r = http.post("/leyline/sessions/ttl-big", json={"ttl_s": 3601})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ttl_s"
    assert http.get("/leyline/sessions/ttl-big").status_code == 404
    assert http.delete("/leyline/sessions/ttl-ok").status_code == 200


def test_openai_client_sees_typed_errors(srv: RunningServer) -> None:
    client = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=srv.model, messages=MESSAGES, logprobs=True)  # type: ignore[arg-type]
    assert info.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=srv.model, messages=MESSAGES, max_tokens=10**9)  # type: ignore[arg-type]


def test_limits_are_cli_flags() -> None:
    from leyline.server.engine.cli import config_from_args, parser

    args = parser().parse_args(
        [
            "--max-sessions",
            "7",
            "--max-sessions-per-tenant",
            "3",
            "--max-queue",
            "9",
            "--max-running",
            "2",
            "--max-request-bytes",
            "4096",
            "--max-session-ttl",
            "900",
            "--api-key",
            "k1",
            "--api-key",
            "k2",
            "--cache-block-tokens",
            "1",
            "--index-all-requests",
            "on",
            "--max-tokens-default",
            "64",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.max_sessions, cfg.max_sessions_per_tenant, cfg.max_queue, cfg.max_running) == (
        7,
        3,
        9,
        2,
    )
    assert (cfg.max_request_bytes, cfg.max_session_ttl_s, cfg.api_keys) == (4096, 900, ("k1", "k2"))
    assert cfg.cache_block_tokens == 1 and cfg.index_all_requests and cfg.max_tokens_default == 64
    with pytest.raises(ValueError):
        config_from_args(parser().parse_args(["--max-session-ttl", "inf"]))
