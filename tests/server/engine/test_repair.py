"""REPAIR on the embedded engine, driven with the real ``openai`` client.

Oracles: the window's KV (and everything before it) must equal the model's own fresh forward
(Hugging Face's cache) over prefix + replacement + window; the spliced rest must equal the old
rows with only the rotary part of K rotated (the rotation itself is checked against Hugging
Face's rotary code in tests/server/core/test_rope.py); the accounting must say which is which.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from _engine_server import RunningServer, assert_no_leaks, running_server, served_kv
from _histories import debug_history, tool_output

import leyline
from leyline import Mode, Session
from leyline.middleware import TruncateOlderThan
from leyline.protocol import Payload
from leyline.server.core.planner import DEFAULT_REPAIR, RepairWindow
from leyline.server.core.rope import RopeSpec, rotate

ATOL = 2e-5  # fp32: the pool's prefill vs the model's plain forward


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(model="tiny-llama", kv_tokens=8192) as s:
        yield s


def _send(
    srv: RunningServer,
    session: Session,
    messages: list[dict[str, Any]],
    *,
    mode: Mode = Mode.AMORTIZE,
    window: int | None = None,
) -> dict[str, Any]:
    client = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    prepared = session.prepare(messages, default_mode=mode, window=window)
    r = client.chat.completions.create(
        model=srv.model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        extra_body=prepared.extra_body(),
    )
    session.commit(prepared)
    return r.model_dump()


def _oracle_kv(srv: RunningServer, ids: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's own fresh prefill of ``ids``: per layer (K, V) as (tokens, heads, dim)."""
    model = srv.engine.loaded.model
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=True)
    return [
        (layer.keys[0].transpose(0, 1).float(), layer.values[0].transpose(0, 1).float())
        for layer in out.past_key_values.layers
    ]


def _shift(old: np.ndarray, new: np.ndarray, a: int, b: int) -> int:
    """The (negative) position shift that maps ``new[a:b]`` back onto ``old``."""
    for d in range(len(old) - b + 1):
        if np.array_equal(new[a:b], old[a + d : b + d]):
            return -d
    raise AssertionError("the spliced tokens are not in the old sequence")


@pytest.mark.parametrize("window", [24, 100])
def test_repair_window_is_exact_and_the_rest_is_spliced(srv: RunningServer, window: int) -> None:
    session = Session()
    h = debug_history(f"w{window}")
    _send(srv, session, h)
    old_tokens, old_k, old_v = served_kv(srv.engine, session.id)
    edited = h[:3] + h[5:]  # drop the first tool output and the reply after it
    r = _send(srv, session, edited, mode=Mode.REPAIR, window=window)
    ley, t = r["leyline"], r["leyline"]["tokens"]
    (outcome,) = ley["directives"]
    assert outcome["status"] == "applied", ley
    # truthful accounting: the window is recomputed (exact), the rest spliced (approximate)
    assert 0 < t["repaired"] <= window and outcome["window_tokens"] == t["repaired"]
    assert t["spliced"] == outcome["spliced_tokens"] > 200
    assert t["approximate"] == t["spliced"] and ley["exact_kv"] is False
    assert t["exact"] + t["spliced"] + t["recomputed"] == r["usage"]["prompt_tokens"]
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == t["exact"] + t["spliced"]

    new_tokens, new_k, new_v = served_kv(srv.engine, session.id)
    # the window sits right before the spliced run; the exact prefix, the edit point and the
    # window equal the model's own fresh prefill of exactly those tokens
    a = t["exact"] + t["repaired"]
    b = a + t["spliced"]
    oracle = _oracle_kv(srv, new_tokens[:a])
    for layer, (k, v) in enumerate(oracle):
        torch.testing.assert_close(new_k[layer][:a], k, rtol=0, atol=ATOL)
        torch.testing.assert_close(new_v[layer][:a], v, rtol=0, atol=ATOL)
    # without the window these rows would have been the old ones rotated: they differ
    shift = _shift(old_tokens, new_tokens, a, b)
    assert shift < 0
    w0 = t["exact"]
    stale = rotate(old_k[1][w0 - shift : a - shift], shift, RopeSpec.from_hf_config(
        srv.engine.loaded.model.config), offset=srv.engine.store.layout.rope_offset)  # fmt: skip
    assert float((stale - new_k[1][w0:a]).abs().max()) > 100 * ATOL
    # the spliced rest equals the donor rows, rotary part rotated by the shift, V copied
    spec = RopeSpec.from_hf_config(srv.engine.loaded.model.config)
    offset = srv.engine.store.layout.rope_offset
    for layer in range(len(new_k)):
        expect = rotate(old_k[layer][a - shift : b - shift], shift, spec, offset=offset)
        torch.testing.assert_close(new_k[layer][a:b], expect, rtol=1e-5, atol=ATOL)
        assert torch.equal(new_v[layer][a:b], old_v[layer][a - shift : b - shift])
    assert_no_leaks(srv.engine)


def test_full_window_is_exact_like_forget(srv: RunningServer) -> None:
    session = Session()
    h = debug_history("full")
    _send(srv, session, h)
    edited = h[:3] + h[5:] + [{"role": "user", "content": "And the line number?"}]
    r = _send(srv, session, edited, mode=Mode.REPAIR, window=10**6)
    ley, t = r["leyline"], r["leyline"]["tokens"]
    assert t["spliced"] == t["approximate"] == 0 and ley["exact_kv"] is True
    assert t["repaired"] > 300 and ley["directives"][0]["window_tokens"] == t["repaired"]
    new_tokens, new_k, new_v = served_kv(srv.engine, session.id)
    n = r["usage"]["prompt_tokens"]
    for layer, (k, v) in enumerate(_oracle_kv(srv, new_tokens[:n])):
        torch.testing.assert_close(new_k[layer][:n], k, rtol=0, atol=ATOL)
        torch.testing.assert_close(new_v[layer][:n], v, rtol=0, atol=ATOL)
    # exact KV goes into the tree as exact: a plain request of the same prompt reuses it all
    plain = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    again = plain.chat.completions.create(
        model=srv.model,
        messages=edited,  # type: ignore[arg-type]
        max_tokens=1,
        temperature=0,
    ).model_dump()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= n - 1
    assert_no_leaks(srv.engine)


def test_server_diff_repair_and_bad_windows_over_http(srv: RunningServer) -> None:
    h = debug_history("sd")
    client = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)

    def send(messages: list[dict[str, Any]], payload: Payload) -> dict[str, Any]:
        r = client.chat.completions.create(
            model=srv.model, messages=messages, max_tokens=2, temperature=0,  # type: ignore[arg-type]
            extra_body=payload.to_custom_params_body(),
        )  # fmt: skip
        return r.model_dump()

    payload = Payload("repair-sd", mode=Mode.REPAIR, window=32)
    send(h, payload)
    edited = [dict(m) for m in h]
    edited[3]["content"] = edited[3]["content"][:60] + "\n[... truncated]"
    ley = send(edited, payload)["leyline"]
    assert ley["tokens"]["repaired"] == ley["directives"][0]["window_tokens"] > 0
    assert ley["tokens"]["repaired"] <= 32 and ley["tokens"]["spliced"] > 200

    url = f"{srv.base_url}/chat/completions"
    before = srv.engine.session_info("repair-sd")["version"]
    for body, code, param in [
        ({"session": "repair-sd", "mode": "amortize", "window": 8}, "invalid_payload",
         "custom_params.leyline.window"),
        ({"session": "repair-sd", "mode": "repair", "window": -8}, "invalid_payload",
         "custom_params.leyline.window"),
        ({"session": "repair-sd", "version": 9, "base_version": 2, "segments": [],
          "directives": [{"start": 0, "end": 1, "replacement": [0, 0], "mode": "forget",
                          "window": 8}]}, "invalid_directive",
         "custom_params.leyline.directives[0]"),
    ]:  # fmt: skip
        r = httpx.post(url, timeout=60, json={
            "model": srv.model, "messages": edited, "max_tokens": 1,
            "custom_params": {"leyline": json.dumps(body)},
        })  # fmt: skip
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"]) == (code, param) and "window" in err["message"]
    assert srv.engine.session_info("repair-sd")["version"] == before  # nothing changed
    assert_no_leaks(srv.engine)


def _tool_history(tag: str) -> list[dict[str, Any]]:
    def call(i: str) -> dict[str, Any]:
        fn = {"name": "cat", "arguments": json.dumps({"path": f"{tag}-{i}.log"})}
        return {"role": "assistant", "tool_calls": [{"id": i, "type": "function", "function": fn}]}

    return [
        {"role": "system", "content": "You are a debugging agent."},
        {"role": "user", "content": f"Task {tag}: find the failing test."},
        call("a"),
        {"role": "tool", "tool_call_id": "a", "content": tool_output(tag + "-a")},
        call("b"),
        {"role": "tool", "tool_call_id": "b", "content": tool_output(tag + "-b")},
        {"role": "assistant", "content": "Found it."},
        {"role": "user", "content": "Which file?"},
    ]


@pytest.mark.parametrize("how", ["default_mode", "policy_mode"])
def test_wrap_asks_for_repair(srv: RunningServer, how: str) -> None:
    raw = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    if how == "default_mode":
        policy = TruncateOlderThan(n=3, max_chars=80)
        client = leyline.wrap(raw, policy=policy, default_mode="repair", repair_window=16)
    else:
        policy = TruncateOlderThan(n=3, max_chars=80, mode="repair")  # type: ignore[arg-type]
        client = leyline.wrap(raw, policy=policy, repair_window=16)
    h = _tool_history(how)
    client.chat.completions.create(model=srv.model, messages=h, max_tokens=2)  # type: ignore[arg-type]
    # one more turn: the first tool output is now older than the last 3 turns and is cut
    more = [*h, {"role": "assistant", "content": "Checking."}, {"role": "user", "content": "Line?"}]
    client.chat.completions.create(model=srv.model, messages=more, max_tokens=2)  # type: ignore[arg-type]
    acc = client.last_accounting
    assert acc is not None and [d.status.value for d in acc.directives] == ["applied"]
    (outcome,) = acc.directives
    # the truncated tool output is followed by its window, then the spliced rest
    assert 0 < (outcome.window_tokens or 0) <= 16 and acc.spliced == outcome.spliced_tokens > 100
    assert_no_leaks(srv.engine)


def test_leyline_serve_sets_the_default_window() -> None:
    """``leyline serve --repair-window`` is the window of repair directives that give none."""
    from leyline.server.engine.cli import config_from_args, parser

    cfg = config_from_args(
        parser().parse_args(["--repair-window", "10%", "--repair-window-cap", "8"])
    )
    assert cfg.repair_window == RepairWindow(fraction=0.1, cap=8)
    assert config_from_args(parser().parse_args([])).repair_window == DEFAULT_REPAIR
    h = debug_history("cli")
    edited = [dict(m) for m in h]
    edited[3]["content"] = edited[3]["content"][:60] + "\n[... truncated]"
    with running_server(repair_window=cfg.repair_window) as small:
        session = Session("repair-cli")
        _send(small, session, h)
        ley = _send(small, session, edited, mode=Mode.REPAIR)["leyline"]
    (outcome,) = ley["directives"]
    assert outcome["status"] == "applied" and 0 < outcome["window_tokens"] <= 8
    assert ley["tokens"]["spliced"] > 200
