"""Directive-aware caching end to end: AMORTIZE, FORGET, content reuse, versions, eviction.

Oracles: FORGET's KV must equal the model's own fresh forward over the edited prompt; AMORTIZE's
spliced KV must equal the old KV with only its rotary part rotated (the rotation itself is
checked against Hugging Face's rotary code in tests/server/core/test_rope.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from _engine_server import RunningServer, assert_no_leaks, running_server, served_kv
from _histories import debug_history

from leyline import Session
from leyline.server.core.rope import RopeSpec, rotate


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-deepseek"])
def srv(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """The same behaviours on a GQA model and on an MLA model (latent + rope rows)."""
    with running_server(model=request.param, kv_tokens=6144) as s:
        yield s


class Agent:
    def __init__(self, srv: RunningServer, session: Session | None = None) -> None:
        self.srv = srv
        self.client = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
        self.session = session or Session()

    def send(self, messages: list[dict[str, Any]], forget: tuple[int, ...] = ()) -> dict[str, Any]:
        prepared = self.session.prepare(messages, forget=forget)
        r = self.client.chat.completions.create(
            model=self.srv.model,
            messages=messages,
            max_tokens=4,
            temperature=0,  # type: ignore[arg-type]
            extra_body=prepared.extra_body(),
        )
        self.session.commit(prepared)
        return r.model_dump()


def test_append_turns_are_exact_hits(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("app")
    first = agent.send(h[:4])
    second = agent.send(h)
    assert first["leyline"]["tokens"]["exact"] < 5
    t = second["leyline"]["tokens"]
    assert t["exact"] >= first["usage"]["prompt_tokens"] - 1
    assert t["recomputed"] < second["usage"]["prompt_tokens"] - t["exact"] + 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == t["exact"]


def test_amortize_deletion_splices_the_suffix(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("amz")
    agent.send(h)
    old_tokens, old_k, _ = served_kv(srv.engine, agent.session.id)
    edited = h[:3] + h[5:]  # drop the first tool output and the reply after it
    r = agent.send(edited)
    t = r["leyline"]["tokens"]
    (outcome,) = r["leyline"]["directives"]
    assert outcome["status"] == "applied", r["leyline"]
    assert t["spliced"] > 200 and t["spliced"] == outcome["spliced_tokens"]
    assert t["recomputed"] <= 2  # nothing new: only the last prompt token (for its logits)
    # spliced KV == old KV with the rotary part rotated by the shift (analytic reference)
    new_tokens, new_k, _ = served_kv(srv.engine, agent.session.id)
    shift = len(old_tokens) - len(new_tokens)
    tail = t["spliced"]
    start_new = t["exact"]
    spec = RopeSpec.from_hf_config(srv.engine.loaded.model.config)
    for layer in range(len(new_k)):
        old = old_k[layer][start_new + shift : start_new + shift + tail]
        got = new_k[layer][start_new : start_new + tail]
        expect = rotate(old, -shift, spec, offset=srv.engine.store.layout.rope_offset)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    assert np.array_equal(
        new_tokens[start_new : start_new + tail],
        old_tokens[start_new + shift : start_new + shift + tail],
    )
    assert_no_leaks(srv.engine)


def test_amortize_recomputes_only_the_replacement_and_the_new_turn(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("rep")
    agent.send(h)
    edited = [dict(m) for m in h]
    edited[3]["content"] = "[tool output truncated]"
    turn = {"role": "user", "content": "Now fix it, please, and explain the change."}
    r = agent.send([*edited, {"role": "assistant", "content": "ok"}, turn])
    t = r["leyline"]["tokens"]
    tok = srv.engine.loaded.tokenizer
    new_tokens = len(tok.encode("[tool output truncated]" + "ok" + turn["content"]))
    assert t["spliced"] > 200
    # the replacement, the new turn and their chat-template glue (a few tokens per message)
    assert new_tokens <= t["recomputed"] <= new_tokens + 24, (t, new_tokens)


def test_forget_equals_fresh_prefill(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("fgt")
    agent.send(h)
    redacted = [dict(m) for m in h]
    redacted[3]["content"] = "[redacted]"
    r = agent.send(redacted, forget=(3,))
    t = r["leyline"]["tokens"]
    assert t["spliced"] == 0 and t["chunk_reused"] == 0
    assert t["recomputed"] > 100
    # a fresh server given the edited prompt answers with the same greedy tokens
    with running_server(model=srv.model) as fresh:
        plain = openai.OpenAI(base_url=fresh.base_url, api_key="t", max_retries=0)
        ref = plain.chat.completions.create(
            model=fresh.model,
            messages=redacted,  # type: ignore[arg-type]
            max_tokens=4,
            temperature=0,
        )
    assert r["choices"][0]["message"]["content"] == ref.choices[0].message.content
    # and its KV equals the model's own forward over the edited prompt (fp32)
    tokens, ks, _ = served_kv(srv.engine, agent.session.id)
    model = srv.engine.loaded.model
    with torch.no_grad():
        out = model(torch.from_numpy(tokens)[None], use_cache=True)
    layout = srv.engine.store.layout
    for layer, k in enumerate(ks):
        cached = out.past_key_values.layers[layer]
        if layout.kind == "mha":
            ref = cached.keys[0].transpose(0, 1)  # (seq, heads, dim)
        else:  # HF caches [normalized c_kv] as keys and the rotated k_pe (evens, odds) as values
            k_pe = cached.values[0, 0]
            pairs = torch.stack(k_pe.chunk(2, dim=-1), dim=-1).flatten(-2)  # back to pairs
            ref = torch.cat([cached.keys[0, 0], pairs], dim=-1)[:, None]
        torch.testing.assert_close(k, ref, rtol=1e-4, atol=1e-5)


def test_moved_content_is_reused_by_hash(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("mov")
    agent.send(h)
    moved = [h[0], h[1], h[2], h[5], h[4], h[3], h[6], h[7]]  # swap the two tool outputs
    r = agent.send(moved)
    t = r["leyline"]["tokens"]
    assert t["spliced"] + t["chunk_reused"] > 150, r["leyline"]


def test_plain_client_never_sees_approximate_kv(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("iso")
    agent.send(h)
    edited = h[:3] + h[5:]
    assert agent.send(edited)["leyline"]["tokens"]["spliced"] > 0
    plain = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    r = plain.chat.completions.create(model=srv.model, messages=edited, max_tokens=2)  # type: ignore[arg-type]
    details = r.usage.prompt_tokens_details  # type: ignore[union-attr]
    # only the exact prefix before the edit can be shared
    assert details is not None and details.cached_tokens < 60


def test_bad_directives_and_versions_change_nothing(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("bad")
    agent.send(h)
    before = srv.engine.session_info(agent.session.id)
    prepared = agent.session.prepare(h[:3] + h[5:])
    payload = prepared.payload()
    url = f"{srv.base_url}/chat/completions"

    def post(p: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            url,
            json={"model": srv.model, "messages": h[:3] + h[5:], "max_tokens": 2, "leyline": p},
            timeout=60,
        )

    overlapping = {
        **payload,
        "directives": [
            {"start": 1, "end": 4, "replacement": [1, 1], "mode": "amortize"},
            {"start": 2, "end": 5, "replacement": [1, 1], "mode": "amortize"},
        ],
    }
    r = post(overlapping)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_directive"
    beyond = {**payload, "directives": [{"start": 1, "end": 999, "replacement": [1, 1]}]}
    assert post(beyond).json()["error"]["code"] == "invalid_directive"
    bad_mode = {
        **payload,
        "directives": [{"start": 1, "end": 2, "replacement": [1, 1], "mode": "squash"}],
    }
    assert post(bad_mode).json()["error"]["code"] == "invalid_directive"
    stale = {**payload, "version": payload["version"] + 1, "base_version": payload["version"]}
    assert post(stale).json()["error"]["code"] == "stale_base_version"  # the server is at 1
    newer_base = {**payload, "base_version": payload["version"]}  # not older than version
    assert post(newer_base).json()["error"]["code"] == "invalid_payload"
    old = {**payload, "version": 1, "base_version": None, "directives": []}
    assert post(old).json()["error"]["code"] == "stale_version"
    assert srv.engine.session_info(agent.session.id) == before | {
        "expires_in_s": srv.engine.session_info(agent.session.id)["expires_in_s"]
    }
    assert_no_leaks(srv.engine)
    # the session still works with the good payload
    assert post(payload).status_code == 200


def test_wrong_segments_are_ignored_not_trusted(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("lie")
    agent.send(h)
    prepared = agent.session.prepare(h[:3] + h[5:])
    payload = prepared.payload()
    payload["segments"] = [["0" * 16, 1] for _ in payload["segments"]]
    r = httpx.post(
        f"{srv.base_url}/chat/completions",
        json={"model": srv.model, "messages": h[:3] + h[5:], "max_tokens": 2, "leyline": payload},
        timeout=60,
    ).json()
    assert r["leyline"]["directives"][0]["status"] == "ignored"
    assert r["leyline"]["tokens"]["spliced"] == 0


def test_concurrent_sessions_and_busy_rejection(srv: RunningServer) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            agent = Agent(srv)
            h = debug_history(f"c{i}")
            agent.send(h[:4])
            agent.send(h)
            r = agent.send(h[:3] + h[5:])
            assert r["leyline"]["tokens"]["spliced"] > 0
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_no_leaks(srv.engine)


def test_small_cache_evicts_and_stays_consistent(srv: RunningServer) -> None:
    with running_server(model=srv.model, kv_tokens=1500) as small:
        agents = [Agent(small) for _ in range(6)]
        for turn in range(3):
            for i, agent in enumerate(agents):
                h = debug_history(f"e{i}")
                agent.send(h[: 4 + 2 * turn] if turn < 2 else h)
                assert_no_leaks(small.engine)
        stats = small.engine.stats()
        assert stats["counters"]["evicted_tokens"] > 0
        for agent in agents:
            httpx.delete(f"{small.base_url}/leyline/sessions/{agent.session.id}")
        assert small.engine.tree.protected_tokens == 0
        assert_no_leaks(small.engine)


def test_spliced_prefix_matched_later_is_inherited_not_exact(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("inh")
    agent.send(h)
    edited = h[:3] + h[5:]
    r2 = agent.send(edited)
    before_edit = r2["leyline"]["tokens"]["exact"]
    assert r2["leyline"]["tokens"]["spliced"] > 200 and not r2["leyline"]["exact_kv"]
    turn = [*edited, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Go on."}]
    r3 = agent.send(turn)
    t = r3["leyline"]["tokens"]
    # the spliced KV of request 2 is now matched as a prefix: approximate, reported as such
    assert t["exact"] <= before_edit and t["inherited"] > 200, t
    assert t["approximate"] == t["inherited"] + t["spliced"] + t["chunk_reused"]
    assert r3["leyline"]["exact_kv"] is False
    details = r3["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == t["exact"] + t["approximate"]
    assert details["approximate_tokens"] == t["approximate"]
    # the same session asking for exact KV only gets no approximate token at all
    agent.session.approximate = False
    r4 = agent.send(
        [*turn, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "?"}]
    )
    t4 = r4["leyline"]["tokens"]
    assert t4["approximate"] == 0 and r4["leyline"]["exact_kv"] is True, t4
    assert r4["usage"]["prompt_tokens_details"]["approximate_tokens"] == 0


def test_forget_with_repeated_and_moved_content_equals_fresh(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("rpt")
    agent.send(h)
    # message 3 is redacted (FORGET) and its content comes back at the end (moved, so the
    # base and the content index hold its KV): FORGET must reuse none of it
    edited = [*h[:3], {"role": "user", "content": "[redacted]"}, *h[4:],
              {"role": "assistant", "content": "ok"}, {"role": "user", "content": h[3]["content"]}]  # fmt: skip
    r = agent.send(edited, forget=(3,))
    t = r["leyline"]["tokens"]
    assert t["chunk_reused"] == 0 and t["spliced"] == 0, r["leyline"]
    with running_server(model=srv.model) as fresh:
        plain = openai.OpenAI(base_url=fresh.base_url, api_key="t", max_retries=0)
        ref = plain.chat.completions.create(
            model=fresh.model,
            messages=edited,
            max_tokens=4,
            temperature=0,  # type: ignore[arg-type]
        )
    assert r["choices"][0]["message"]["content"] == ref.choices[0].message.content


def test_edit_already_cached_exactly_is_not_needed(srv: RunningServer) -> None:
    agent = Agent(srv)
    h = debug_history("ndd")
    agent.send(h)
    edited = h[:3] + h[5:]
    plain = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    plain.chat.completions.create(model=srv.model, messages=edited, max_tokens=2)  # type: ignore[arg-type]
    r = agent.send(edited)  # the edited prompt is already an exact prefix hit
    (outcome,) = r["leyline"]["directives"]
    assert outcome["status"] == "not_needed", r["leyline"]
    assert r["leyline"]["tokens"]["spliced"] == 0 and r["leyline"]["exact_kv"] is True


def _server_diff(
    srv: RunningServer, messages: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    client = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    r = client.chat.completions.create(
        model=srv.model,
        messages=messages,
        max_tokens=2,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )
    return r.model_dump()


def test_server_diff_payload_splices_without_segments(srv: RunningServer) -> None:
    h = debug_history("sdf")
    body = {"custom_params": {"leyline": json.dumps({"session": "sdiff-1", "mode": "amortize"})}}
    first = _server_diff(srv, h, extra_body=body)
    assert (first["leyline"]["session"], first["leyline"]["version"]) == ("sdiff-1", 1)
    edited = [dict(m) for m in h]
    edited[3]["content"] = edited[3]["content"][:60] + "\n[... truncated]"
    r = _server_diff(srv, edited, extra_body=body)
    ley = r["leyline"]
    assert ley["version"] == 2 and ley["tokens"]["spliced"] > 200, ley
    assert [d["status"] for d in ley["directives"]] == ["applied"]
    assert srv.engine.session_info("sdiff-1")["version"] == 2
    assert_no_leaks(srv.engine)


def test_prompt_cache_key_only_gets_an_exact_session(srv: RunningServer) -> None:
    h = debug_history("pck")
    first = _server_diff(srv, h[:6], prompt_cache_key="agent 7 / run 3")  # not a valid id
    sid = first["leyline"]["session"]
    assert sid.startswith("pck-") and first["leyline"]["version"] == 1
    second = _server_diff(srv, h, prompt_cache_key="agent 7 / run 3")
    t = second["leyline"]["tokens"]
    assert second["leyline"]["session"] == sid and t["exact"] >= first["usage"]["prompt_tokens"] - 1
    edited = [dict(m) for m in h]
    edited[3]["content"] = "[cleared]"
    third = _server_diff(srv, edited, prompt_cache_key="agent 7 / run 3")
    # no payload: the edits are FORGET, nothing approximate is served to a plain client
    assert third["leyline"]["exact_kv"] is True and third["leyline"]["tokens"]["spliced"] == 0
    assert srv.engine.session_info(sid)["version"] == 3  # the session's cache is kept for it
