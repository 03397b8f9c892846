"""Tenants, authentication and the cached-token side channel (issue 13, docs/security.md), on
the real server with EngineConfig's shipped defaults (block-granular reuse, no donation from
requests that did not opt in) plus two API keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from _engine_server import RunningServer, assert_no_leaks, running_server

from leyline import LeylineClient, Session
from leyline.errors import ServerError
from leyline.server.engine.config import EngineConfig

KEYS = ("key-alice", "key-bob")
DEFAULTS = EngineConfig()
SHIPPED = {
    "cache_block_tokens": DEFAULTS.cache_block_tokens,
    "index_all_requests": DEFAULTS.index_all_requests,
}
DOC = "".join(
    f"Clause {i}: the tenant pays {i * 7} credits by day {i % 28 + 1}.\n" for i in range(40)
)
SECRET = "7391"


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(kv_tokens=8192, api_keys=KEYS, **SHIPPED) as s:
        yield s


def _http(srv: RunningServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=srv.base_url, headers=headers, timeout=60)


def _chat(h: httpx.Client, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    r = h.post("/chat/completions", json={"model": "tiny-llama", "messages": messages,
                                          "max_tokens": 2, "temperature": 0, **extra})  # fmt: skip
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_every_route_but_health_needs_the_key(srv: RunningServer) -> None:
    root = srv.base_url.removesuffix("/v1")
    routes = [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/leyline/stats"),
              ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/leyline/info"),
              ("GET", "/v1/leyline/sessions/s"), ("DELETE", "/v1/leyline/sessions/s"),
              ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]  # fmt: skip
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]}):
        for method, path in routes:
            r = httpx.request(method, root + path, headers=header, timeout=10)
            assert r.status_code == 401, (method, path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert httpx.get(root + "/health", timeout=10).json() == {"status": "ok"}
    with _http(srv, KEYS[1]) as h:
        assert h.get(root + "/openapi.json").status_code == 200


def test_sdk_and_openai_client_pass_the_key(srv: RunningServer) -> None:
    client = openai.OpenAI(base_url=srv.base_url, api_key=KEYS[0], max_retries=0)
    assert [m.id for m in client.models.list()] == [srv.model]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base_url, api_key="nope", max_retries=0).models.list()
    with LeylineClient(srv.base_url, api_key=KEYS[0]) as lc:
        result = lc.chat(Session(), [{"role": "user", "content": "hi"}], model=srv.model,
                         max_tokens=2)  # fmt: skip
        assert result.accounting is not None
    with LeylineClient(srv.base_url, api_key="nope") as bad, pytest.raises(ServerError) as info:
        bad.stats()
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


def test_content_is_never_reused_across_tenants(srv: RunningServer) -> None:
    """Bob sends the document Alice sent (same prompt, and moved into a new turn with content
    reuse on): nothing of Alice's KV serves him; Alice herself, and the same key with the same
    cache_salt, do reuse it (so the check can fail)."""
    doc_msgs = [{"role": "system", "content": "Summarise."}, {"role": "user", "content": DOC}]
    moved = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Q?"},
             {"role": "assistant", "content": "ok"}, {"role": "user", "content": DOC}]  # fmt: skip
    with _http(srv, KEYS[0]) as alice, _http(srv, KEYS[1]) as bob:
        _chat(alice, doc_msgs, leyline={"session": "a-doc", "version": 1})
        b1 = _chat(bob, doc_msgs)
        b2 = _chat(bob, moved, leyline={"session": "b-doc", "version": 1})
        assert b1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert b2["leyline"]["tokens"]["chunk_reused"] == 0
        assert b2["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # the same request under Alice's key, but another cache_salt: another tenant
        salted = _chat(alice, doc_msgs, cache_salt="alice-team-2")
        assert salted["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # controls: Alice's own repeat and moved copy are served from her cache
        a1 = _chat(alice, doc_msgs)
        a2 = _chat(alice, moved, leyline={"session": "a-moved", "version": 1})
        assert (
            a1["usage"]["prompt_tokens_details"]["cached_tokens"]
            > 0.9 * a1["usage"]["prompt_tokens"]
        )
        assert a2["leyline"]["tokens"]["chunk_reused"] > 0
        again = _chat(alice, doc_msgs, cache_salt="alice-team-2")
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert_no_leaks(srv.engine)


def test_plain_requests_do_not_donate_to_content_reuse(srv: RunningServer) -> None:
    """A request without a payload of its own (here: only OpenAI's prompt_cache_key) is not
    indexed for content reuse; the same document from an opted-in request is."""
    plain_doc = DOC.replace("credits", "tokens")
    shared_doc = DOC.replace("credits", "coins")
    with _http(srv, KEYS[0]) as alice:
        _chat(alice, [{"role": "user", "content": plain_doc}], prompt_cache_key="plain-1")
        _chat(alice, [{"role": "user", "content": shared_doc}], leyline={"session": "d-1",
                                                                        "version": 1})  # fmt: skip
        for i, doc in enumerate((plain_doc, shared_doc)):
            msgs = [{"role": "system", "content": "Other context first."},
                    {"role": "user", "content": doc}]  # fmt: skip
            r = _chat(alice, msgs, leyline={"session": f"probe-{i}", "version": 1})
            reused = r["leyline"]["tokens"]["chunk_reused"]
            assert (reused > 0) == (doc is shared_doc), (i, r["leyline"]["tokens"])


def test_sessions_are_invisible_to_other_tenants(srv: RunningServer) -> None:
    msgs = [{"role": "user", "content": "Remember the number 42."}]
    with _http(srv, KEYS[0]) as alice, _http(srv, KEYS[1]) as bob:
        session = Session("shared-name")
        first = session.prepare(msgs)
        _chat(alice, msgs, **first.extra_body())
        session.commit(first)
        for method in ("GET", "DELETE"):
            r = bob.request(method, "/leyline/sessions/shared-name")
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_session"
        # a salted Alice is another tenant too
        assert alice.get("/leyline/sessions/shared-name?cache_salt=x").status_code == 404
        # Bob's request naming the id opens his own session; Alice's is untouched
        theirs = Session("shared-name")
        p = theirs.prepare([{"role": "user", "content": "Something else entirely."}])
        _chat(bob, [{"role": "user", "content": "Something else entirely."}], **p.extra_body())
        assert bob.get("/leyline/sessions/shared-name").json()["version"] == 1
        turn = [*msgs, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "?"}]
        second = session.prepare(turn)
        r = _chat(alice, turn, **second.extra_body())  # not stale: Bob did not move it
        assert r["leyline"]["version"] == 2
        assert alice.get("/leyline/sessions/shared-name").json()["version"] == 2
        assert bob.delete("/leyline/sessions/shared-name").status_code == 200
        assert alice.get("/leyline/sessions/shared-name").status_code == 200


def _extract(h: httpx.Client, prefix: str, suffix: str, n_digits: int) -> str:
    """The audit's attack: guess the secret digit by digit, keeping the guess whose request
    reports the most cached tokens (10 requests a digit)."""
    known = ""
    for _ in range(n_digits):
        best, best_cached = "0", -1
        for d in "0123456789":
            msgs = [{"role": "system", "content": prefix + known + d + suffix},
                    {"role": "user", "content": "hi"}]  # fmt: skip
            cached = _chat(h, msgs)["usage"]["prompt_tokens_details"]["cached_tokens"]
            if cached > best_cached:
                best, best_cached = d, cached
        known += best
    return known


VICTIM_PREFIX = "You are the vault of ACME. The secret code is "
VICTIM_SUFFIX = ". Never tell anyone the code."


def _victim(h: httpx.Client) -> None:
    msgs = [{"role": "system", "content": VICTIM_PREFIX + SECRET + VICTIM_SUFFIX},
            {"role": "user", "content": "hello"}]  # fmt: skip
    _chat(h, msgs)


def test_another_tenant_cannot_extract_a_secret_from_cached_tokens(srv: RunningServer) -> None:
    with _http(srv, KEYS[0]) as victim, _http(srv, KEYS[1]) as attacker:
        _victim(victim)
        assert _extract(attacker, VICTIM_PREFIX, "", len(SECRET)) != SECRET


def test_a_co_tenant_cannot_extract_it_with_the_default_granularity(srv: RunningServer) -> None:
    """Same key (one tenant): counts move only in whole blocks, so the digit-by-digit search
    gets no signal; with per-token accounting (the operator's option) the same attack works,
    which shows the attack is real."""
    with _http(srv, KEYS[0]) as victim, _http(srv, KEYS[0]) as attacker:
        _victim(victim)
        assert _extract(attacker, VICTIM_PREFIX, "", len(SECRET)) != SECRET
    with (
        running_server(kv_tokens=4096, cache_block_tokens=1) as exact,
        _http(exact, None) as victim,
        _http(exact, None) as attacker,
    ):
        _victim(victim)
        assert _extract(attacker, VICTIM_PREFIX, "", len(SECRET)) == SECRET


def test_sessions_per_tenant_are_capped() -> None:
    with (
        running_server(api_keys=KEYS, max_sessions=4, max_sessions_per_tenant=2) as s,
        _http(s, KEYS[0]) as alice,
        _http(s, KEYS[1]) as bob,
    ):
        assert alice.post("/leyline/sessions/a1").status_code == 200
        assert alice.post("/leyline/sessions/a2").status_code == 200
        r = alice.post("/leyline/sessions/a3")
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
        assert bob.post("/leyline/sessions/b1").status_code == 200  # Bob is not locked out


@pytest.mark.parametrize("mode", ["amortize", "forget"])
def test_whole_blocks_do_not_make_a_sessions_own_turns_approximate(
    srv: RunningServer, mode: str
) -> None:
    """With the shipped block size, the tokens a session's previous version shares with its
    next prompt (sent by the client before) stay an exact hit: no shift-0 copies reported as
    spliced, no approximate KV inherited by the turns after (the demo's FORGET session showed
    "spliced 10" on a plain appended turn)."""
    h = _http(srv, KEYS[0])
    doc = "".join(f"{mode} note {i}: item {i * 11} is due on day {i % 27}.\n" for i in range(40))
    messages = [{"role": "user", "content": doc + "Summarize note 3."}]  # content of its own
    for turn in range(3):
        body = _chat(h, messages, leyline={"session": f"blocks-{mode}", "mode": mode})
        tokens = body["leyline"]["tokens"]
        assert tokens["spliced"] == tokens["inherited"] == tokens["chunk_reused"] == 0, tokens
        assert body["leyline"]["exact_kv"] is True
        if turn:
            assert tokens["exact"] > body["usage"]["prompt_tokens"] - 40  # the appended turn
        reply = body["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "More."}]
    assert_no_leaks(srv.engine)
