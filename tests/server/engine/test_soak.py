"""Soak: 8 concurrent sessions x 20 turns of random edits on a KV budget that forces eviction.

Half the sessions edit with AMORTIZE (+ content reuse), half with exact FORGET and no approximate
KV; every FORGET response must equal a fresh engine's greedy answer to the same final prompt,
and at the end no slot may be leaked.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import openai
import pytest
from _engine_server import RunningServer, assert_no_leaks, running_server

from leyline import Mode, Session

SESSIONS = 8
TURNS = 20


def _observation(rng: random.Random, tag: str) -> str:
    return "".join(
        f"{tag}: line {i} value={rng.randint(0, 999)}\n" for i in range(rng.randint(2, 5))
    )


def _edit(rng: random.Random, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A random agent-style edit of one earlier (non-system, non-last) message pair."""
    h = [dict(m) for m in history]
    if len(h) < 6:
        return h
    i = rng.randrange(1, len(h) - 2)
    kind = rng.choice(["truncate", "drop_pair", "replace", "keep"])
    if kind == "truncate":
        h[i]["content"] = str(h[i]["content"])[:40] + "\n[truncated]"
    elif kind == "drop_pair" and i + 1 < len(h) - 1:
        del h[i : i + 2]
    elif kind == "replace":
        h[i]["content"] = f"replaced {rng.randint(0, 10**6)}"
    return h


def _conversation(
    srv: RunningServer, k: int, exact: bool, finals: dict[int, tuple[list, str]], errors: list
) -> None:
    rng = random.Random(k)
    client = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    session = Session(f"soak-{k}", content_reuse=not exact)
    mode = Mode.FORGET if exact else Mode.AMORTIZE
    history: list[dict[str, Any]] = [{"role": "system", "content": f"Soak agent {k}."}]
    try:
        for turn in range(TURNS):
            history.append({"role": "user", "content": _observation(rng, f"s{k}t{turn}")})
            if turn and rng.random() < 0.6:
                history = _edit(rng, history)
            prepared = session.prepare(history, default_mode=mode)
            r = client.chat.completions.create(
                model=srv.model,
                messages=history,  # type: ignore[arg-type]
                max_tokens=3,
                temperature=0,
                extra_body=prepared.extra_body(),
            )
            session.commit(prepared)
            text = r.choices[0].message.content or ""
            finals[k] = ([dict(m) for m in history], text)
            history.append({"role": "assistant", "content": text or "ok"})
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.slow
def test_soak_concurrent_sessions_with_eviction() -> None:
    finals: dict[int, tuple[list, str]] = {}
    errors: list[BaseException] = []
    with running_server(model="tiny-llama", kv_tokens=3000) as srv:
        threads = [
            threading.Thread(target=_conversation, args=(srv, k, k % 2 == 1, finals, errors))
            for k in range(SESSIONS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        stats = srv.engine.stats()
        assert stats["counters"]["evicted_tokens"] > 0, stats
        assert stats["counters"]["requests"] >= SESSIONS * TURNS
        assert_no_leaks(srv.engine)
    with running_server(model="tiny-llama", kv_tokens=8192) as fresh:
        client = openai.OpenAI(base_url=fresh.base_url, api_key="t", max_retries=0)
        for k in range(1, SESSIONS, 2):  # the exact (FORGET) sessions
            messages, text = finals[k]
            ref = client.chat.completions.create(
                model=fresh.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=3,
                temperature=0,
            )
            assert text == ref.choices[0].message.content, k
