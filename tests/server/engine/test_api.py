"""The HTTP API of `leyline serve`, driven with the real `openai` client and raw httpx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from _engine_server import RunningServer, assert_no_leaks, running_server

from leyline import Session


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(kv_tokens=4096) as s:
        yield s


def _client(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "List three colours."},
]


def test_chat_completion_shape(srv: RunningServer) -> None:
    r = _client(srv).chat.completions.create(
        model=srv.model,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    )
    assert r.object == "chat.completion"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 10
    assert r.usage.completion_tokens <= 6
    assert r.model_dump().get("leyline") is None  # no session: no accounting object


def test_greedy_is_deterministic_and_cached(srv: RunningServer) -> None:
    c = _client(srv)
    msgs = [*MESSAGES, {"role": "user", "content": "and three animals " * 20}]
    a = c.chat.completions.create(model=srv.model, messages=msgs, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    b = c.chat.completions.create(model=srv.model, messages=msgs, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert a.choices[0].message.content == b.choices[0].message.content
    assert b.usage is not None and b.usage.prompt_tokens_details is not None
    # everything but the last prompt token is an exact hit the second time
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1


def test_streaming_matches_non_streaming(srv: RunningServer) -> None:
    c = _client(srv)
    msgs = [{"role": "user", "content": "Count: one two three"}]
    full = c.chat.completions.create(model=srv.model, messages=msgs, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    session = Session()
    prepared = session.prepare(msgs)
    stream = c.chat.completions.create(
        model=srv.model,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        extra_body=prepared.extra_body(),
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    last = chunks[-1].model_dump()
    assert last["usage"]["prompt_tokens"] == full.usage.prompt_tokens  # type: ignore[union-attr]
    assert last["leyline"]["tokens"]["recomputed"] >= 1
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_sequences(srv: RunningServer) -> None:
    c = _client(srv)
    msgs = [{"role": "user", "content": "Say anything."}]
    free = c.chat.completions.create(model=srv.model, messages=msgs, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    text = free.choices[0].message.content or ""
    if len(text) < 4:
        pytest.skip("the random model produced too little text to cut")
    stop = text[2:4]
    cut = c.chat.completions.create(
        model=srv.model,
        messages=msgs,
        max_tokens=12,
        temperature=0,
        stop=[stop],  # type: ignore[arg-type]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_models_health_metrics(srv: RunningServer) -> None:
    c = _client(srv)
    r = c.completions.create(
        model=srv.model, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert r.usage is not None and r.usage.completion_tokens <= 5
    assert [m.id for m in c.models.list()] == [srv.model]
    root = srv.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{root}/metrics").text
    assert 'leyline_prompt_tokens_total{kind="recomputed"}' in metrics
    assert "leyline_ttft_seconds_bucket" in metrics
    assert "leyline_kv_capacity_tokens 4096.0" in metrics


def test_session_endpoints(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.base_url) as h:
        assert h.post("/leyline/sessions/abc", json={"ttl_s": 30}).json()["version"] == 0
        assert h.get("/leyline/sessions/abc").status_code == 200
        assert h.delete("/leyline/sessions/abc").json()["closed"] is True
        r = h.get("/leyline/sessions/abc")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_session"
        assert h.post("/leyline/sessions/bad id!").status_code in (400, 404)
        assert h.post("/leyline/sessions/x", json={"ttl_s": -1}).status_code == 400
        stats = h.get("/leyline/stats").json()
        assert stats["kv"]["capacity_tokens"] == 4096


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"model": "nope", "messages": MESSAGES}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "tiny-llama", "messages": []}).encode(), 400, "invalid_request"),
        (
            json.dumps({"model": "tiny-llama", "messages": MESSAGES, "n": 2}).encode(),
            400,
            "invalid_request",
        ),
        (
            json.dumps({"model": "tiny-llama", "messages": MESSAGES, "temperature": 9}).encode(),
            400,
            "invalid_request",
        ),
        (
            json.dumps(
                {"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]}
            ).encode(),
            400,
            "invalid_request",
        ),
        (
            json.dumps(
                {
                    "model": "tiny-llama",
                    "messages": MESSAGES,
                    "leyline": {"session": "s", "version": 1, "surprise": 1},
                }
            ).encode(),
            400,
            "invalid_payload",
        ),
        (
            json.dumps(
                {"model": "tiny-llama", "messages": [{"role": "user", "content": "word " * 5000}]}
            ).encode(),
            400,
            "context_length_exceeded",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    srv: RunningServer, body: bytes, status: int, code: str
) -> None:
    before = srv.engine.stats()["counters"]["requests"]
    r = httpx.post(
        f"{srv.base_url}/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert srv.engine.stats()["counters"]["requests"] == before
    assert_no_leaks(srv.engine)


def test_oversized_body_is_413(srv: RunningServer) -> None:
    r = httpx.post(f"{srv.base_url}/chat/completions", content=b" " * (9 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_openai_client_raises_typed_errors(srv: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError):
        _client(srv).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]


def test_cancelled_stream_frees_resources(srv: RunningServer) -> None:
    """A client that leaves mid-stream stops the generation: the request is dropped (not
    committed, not counted as served) and everything it held is freed."""
    before = srv.engine.stats()["counters"]
    msgs = [{"role": "user", "content": "Write a long story. " * 10}]
    with httpx.stream(
        "POST",
        f"{srv.base_url}/chat/completions",
        json={
            "model": srv.model,
            "messages": msgs,
            "max_tokens": 400,
            "stream": True,
            "temperature": 1.0,
        },
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": "' in line:
                break  # leave mid-stream
    deadline = time.monotonic() + 30
    while srv.engine.stats()["counters"]["failed"] == before["failed"]:
        assert time.monotonic() < deadline, "the abandoned stream was never stopped"
        time.sleep(0.02)
    after = srv.engine.stats()
    assert after["counters"]["requests"] == before["requests"] and after["running"] == 0
    assert_no_leaks(srv.engine)


def test_reset_cache_empties_sessions_and_kv(srv: RunningServer) -> None:
    session = Session()
    prepared = session.prepare(MESSAGES)
    _client(srv).chat.completions.create(
        model=srv.model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=2,
        extra_body=prepared.extra_body(),
    )
    assert srv.engine.stats()["sessions"] >= 1
    srv.engine.reset_cache()
    stats = srv.engine.stats()
    assert stats["sessions"] == 0 and stats["kv"]["used_tokens"] == 0
    assert stats["index_entries"] == 0


def test_server_failure_releases_everything(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that fails inside the engine (after slots were allocated and locks taken)
    answers 500 in OpenAI's shape and leaves the cache as it was."""
    session = Session()
    prepared = session.prepare(MESSAGES)
    before = srv.engine.stats()["kv"]

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(srv.engine, "materialize", boom)  # phase 3, after slots and locks
    r = httpx.post(
        f"{srv.base_url}/chat/completions",
        json={"model": srv.model, "messages": MESSAGES, "max_tokens": 2,
              "leyline": prepared.payload()},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert srv.engine.stats()["kv"] == before
    assert_no_leaks(srv.engine)
    # the session was not advanced: the same prepared request now succeeds
    ok = _client(srv).chat.completions.create(
        model=srv.model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=2,
        extra_body=prepared.extra_body(),
    )
    assert ok.model_dump()["leyline"]["version"] == 1
