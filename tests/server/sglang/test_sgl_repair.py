"""REPAIR on SGLang's own scheduling classes (0.5.16 and 0.5.23): AMORTIZE plus a recompute
window of ``k`` tokens after the edit, served through the plugin's middle windows.

The requests go through SGLang's scheduling steps (`_sglang_support.World`, as in
`test_sgl_windows`: ``Req.init_next_round_input``, the real ``PrefillAdder`` with the plugin's
hooks, chunk caching and release of each version, a context-free fake forward). To tell recomputed KV from copied KV,
the fake model changes between requests (``_reweigh``): every row the edited request prefills
carries its own weights, every spliced row the base's, rotated to its new position. So each
position's final KV says who computed it: the window must be this request's, the spliced rest
must equal the donor rows with SGLang's rotary embedding at the new position.
"""

from __future__ import annotations

import json

import pytest
from _sglang_support import (
    WORLD_VOCAB,
    World,
    apply_window_hooks,
    make_req,
    prefix_slots,
    require_sglang,
)

require_sglang()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi.encoders import jsonable_encoder  # noqa: E402
from sglang.srt.entrypoints.openai.protocol import (  # noqa: E402
    ChatCompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)

from leyline._config import Environment  # noqa: E402
from leyline.directives import MAX_WINDOW, Directive, Mode  # noqa: E402
from leyline.protocol import Payload, ResponseInfo, TokenCounts  # noqa: E402
from leyline.server.sglang import response  # noqa: E402
from leyline.server.sglang.cache import LeylineCacheConfig  # noqa: E402
from leyline.server.sglang.windows import WINDOW_ATTR  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _hooks() -> None:
    apply_window_hooks()


def _toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, WORLD_VOCAB, n).tolist()


def _info(req) -> dict:
    return json.loads(req.customized_info["leyline"][0])


SYS, A, B, TURN = _toks(1, 60), _toks(2, 240), _toks(3, 300), _toks(4, 40)
A_SHORT = _toks(5, 20)
EDIT = len(SYS) + len(A_SHORT)  # where the replacement ends: the window starts here


def _payload(version: int, base: int | None, specs: list[tuple[str, int | None]]) -> dict:
    """A segment payload with one directive per ``(mode, window)`` (the server maps them onto
    its token diff)."""
    ds = tuple(Directive(2 * i + 1, 2 * i + 2, (2 * i + 1, 2 * i + 2), Mode(m), window=w)
               for i, (m, w) in enumerate(specs))  # fmt: skip
    segs = (("0123456789abcdef", 10),) * (2 * len(specs) + 2)
    return Payload("s", version, base, segs, ds).to_wire()


def _reweigh(w: World, seed: int) -> tuple[list, list]:
    """New weights for the fake model (what a different context does to KV); returns the old."""
    old = (w.raw_k, w.raw_v)
    g = torch.Generator().manual_seed(seed)
    w.raw_k = [k + torch.randn(k.shape, generator=g) for k in w.raw_k]
    w.raw_v = [v + torch.randn(v.shape, generator=g) for v in w.raw_v]
    return old


def _assert_kv(w: World, tokens: list[int], owners: list[tuple[int, int, tuple]]) -> None:
    """The request's final KV: positions ``[lo, hi)`` computed with the weights ``(k, v)`` at
    their own (new) positions, i.e. a fresh prefill by that model or its rows rotated there."""
    slots = w.kv_of(tokens)
    assert len(slots) == len(tokens)
    assert [lo for lo, _, _ in owners] == [0] + [hi for _, hi, _ in owners[:-1]]
    assert owners[-1][1] == len(tokens)
    for lo, hi, (raw_k, raw_v) in owners:
        toks, pos = torch.tensor(tokens[lo:hi]), torch.arange(lo, hi)
        for layer in range(2):
            raw = raw_k[layer][toks]
            _, k = w.rope.forward_native(pos, torch.zeros_like(raw).flatten(1), raw.flatten(1))
            got = w.stack.pool.k_buffer[layer][slots[lo:hi]]
            # NOTE: fp32 rounding of the rotation angles (up to ~600 rad here)
            torch.testing.assert_close(got, k.view_as(raw), rtol=1e-4, atol=1e-4)
            assert torch.equal(w.stack.pool.v_buffer[layer][slots[lo:hi]], raw_v[layer][toks])


def _edited(w: World, payload: dict, chunk: int | None = 4096, reweigh: bool = True):
    """Serve the base ``SYS + A + B``, then ``SYS + A_SHORT + B + TURN`` with ``payload`` (under
    new weights); returns (request, its rounds, the base's weights, the new weights)."""
    w.serve(make_req("base", SYS + A + B, _payload(1, None, [])))
    old = _reweigh(w, 99) if reweigh else (w.raw_k, w.raw_v)
    req = make_req("r2", SYS + A_SHORT + B + TURN, payload)
    w.prefilled = 0
    rounds = w.serve(req, chunk=chunk)
    return req, rounds, old, (w.raw_k, w.raw_v)


@pytest.mark.parametrize(
    ("window", "config", "chunk"),
    [(64, None, 4096), (64, None, 16), (None, 40, 4096), (None, None, None)],
    ids=["window-64", "window-64-chunk-16", "config-default-40", "core-default-128"],
)
def test_repair_recomputes_the_window_and_splices_the_rest(window, config, chunk) -> None:
    """The window (``window``, else the server's default) after the replacement is prefilled by
    this request in the round that ends at it; the rest of the kept suffix is the base's rows
    rotated to their new positions; the accounting says so."""
    k = window or config or 128
    cfg = LeylineCacheConfig(min_copy_run=32, min_moved_run=16, repair_window=config)
    w = World(config=cfg)
    new = SYS + A_SHORT + B + TURN
    req, rounds, old, fresh = _edited(w, _payload(2, 1, [("repair", window)]), chunk)
    info = _info(req)
    t = info["tokens"]
    assert info["directives"] == [{"index": 0, "status": "applied", "reason": None,
                                   "spliced_tokens": len(B) - k, "window_tokens": k}]  # fmt: skip
    assert (t["exact"], t["inherited"], t["spliced"], t["chunk_reused"]) == (
        len(SYS),
        0,
        len(B) - k,
        0,
    )
    assert t["recomputed"] == len(A_SHORT) + k + len(TURN) == w.prefilled
    assert t["repaired"] == k  # part of recomputed
    counts = TokenCounts.from_wire(t)
    assert counts.repaired == k and counts.total == len(new) and info["exact_kv"] is False
    assert info["windows"] == 1 and getattr(req, WINDOW_ATTR) is None
    # The first rounds end exactly at the window's end; the splice behind it is not prefilled.
    assert rounds[0][0] == len(SYS) and EDIT + k in [e for _s, e in rounds]
    assert all(e <= EDIT + k or s >= EDIT + len(B) for s, e in rounds)
    _assert_kv(w, new, [(0, len(SYS), old), (len(SYS), EDIT + k, fresh),
                        (EDIT + k, EDIT + len(B), old), (EDIT + len(B), len(new), fresh)])  # fmt: skip
    w.assert_no_leak()


def test_amortize_is_repair_with_no_window() -> None:
    """The same edit as AMORTIZE splices the whole kept suffix and reports no window."""
    w = World()
    req, _rounds, old, fresh = _edited(w, _payload(2, 1, [("amortize", None)]))
    info = _info(req)
    assert "repaired" not in info["tokens"] and "window_tokens" not in info["directives"][0]
    assert info["tokens"]["spliced"] == len(B)
    new = SYS + A_SHORT + B + TURN
    _assert_kv(w, new, [(0, len(SYS), old), (len(SYS), EDIT, fresh),
                        (EDIT, EDIT + len(B), old), (EDIT + len(B), len(new), fresh)])  # fmt: skip


def test_a_window_past_the_suffix_is_forget() -> None:
    """``window`` longer than the kept suffix: nothing is copied, the request stays in the
    plain namespace (its KV is exact and shared with requests that did not opt in), and the
    accounting is FORGET's plus ``repaired``."""
    runs = {}
    for mode, window in (("repair", MAX_WINDOW), ("forget", None)):
        w = World()
        req, _rounds, old, fresh = _edited(w, _payload(2, 1, [(mode, window)]))
        runs[mode] = _info(req)
        new = SYS + A_SHORT + B + TURN
        _assert_kv(w, new, [(0, len(SYS), old), (len(SYS), len(new), fresh)])
        assert w.prefilled == len(new) - len(SYS)
        plain = make_req("p", new, None)  # no payload: SGLang's own path, plain namespace
        plain.init_next_round_input(w.cache)
        assert len(prefix_slots(w.cache, plain)) == len(new) - 1
        w.cache.dec_lock_ref(plain.last_node)
        w.assert_no_leak()
    repair, forget = runs["repair"], runs["forget"]
    assert repair["exact_kv"] is True and repair["windows"] == 0
    assert repair["tokens"] == {**forget["tokens"], "repaired": len(B)}
    assert repair["directives"] == [{"index": 0, "status": "applied", "reason": None,
                                     "spliced_tokens": 0, "window_tokens": len(B)}]  # fmt: skip


def test_a_short_spliced_tail_is_recomputed_but_not_counted_as_window() -> None:
    """The window leaves 10 kept tokens, fewer than ``min_copy_run``: not worth a prefill round,
    so they are recomputed too, but ``repaired`` counts only the window, and the directive
    says its splice was not served."""
    k = len(B) - 10
    w = World()
    req, rounds, old, fresh = _edited(w, _payload(2, 1, [("repair", k)]))
    info = _info(req)
    t = info["tokens"]
    new = SYS + A_SHORT + B + TURN
    _assert_kv(w, new, [(0, len(SYS), old), (len(SYS), len(new), fresh)])
    assert t["recomputed"] == len(new) - len(SYS) == w.prefilled and t["spliced"] == 0
    assert t["repaired"] == k and info["exact_kv"] is True
    (outcome,) = info["directives"]
    assert outcome["status"] == "ignored" and outcome["window_tokens"] == k
    assert "10 copy tokens behind a window recomputed" in outcome["reason"]
    assert rounds == [(len(SYS), len(new))]


@pytest.mark.parametrize(
    ("specs", "mode", "window"),
    [
        ([("amortize", None), ("repair", None)], "repair", 40),  # the server's default
        ([("amortize", None), ("repair", 24)], "repair", 24),
        ([("repair", 24), ("repair", None)], "repair", 40),  # the largest asked for
        ([("repair", 24), ("forget", None)], "forget", 0),
    ],
)
def test_directives_merged_by_the_diff_take_the_strictest_mode(specs, mode, window) -> None:
    """Two directives, one edit in the token diff (the replacement and a deletion 0 tokens
    apart): the edit is served in the strictest mode asked for, with the largest window, and
    both directives share one outcome that says so (``spliced_tokens``/``window_tokens``
    null: not attributable to one of them)."""
    cfg = LeylineCacheConfig(min_copy_run=32, min_moved_run=16, repair_window=40)
    w = World(config=cfg)
    w.serve(make_req("base", SYS + A + B, _payload(1, None, [])))
    new = SYS + A_SHORT + B[5:] + TURN
    req = make_req("r2", new, _payload(2, 1, specs))
    w.serve(req)
    info = _info(req)
    t = info["tokens"]
    assert t.get("repaired", 0) == window
    kept = len(B) - 5
    assert t["spliced"] == (0 if mode == "forget" else kept - window)
    assert info["exact_kv"] is (mode == "forget")
    for i, outcome in enumerate(info["directives"]):
        assert outcome["index"] == i and outcome["status"] == "applied"
        assert outcome["spliced_tokens"] is None
        assert outcome.get("window_tokens", 0) == (None if window else 0)
        assert "1 edits for 2 directives" in outcome["reason"]
        assert f"served together as {mode}" in outcome["reason"]
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_server_diff_payload_carries_its_window() -> None:
    """``{"session", "mode": "repair", "window": k}``: the plugin's own diff finds the edit,
    every edit gets ``k``; one outcome per edit found."""
    w = World()
    payload = {"session": "d", "mode": "repair", "window": 32}
    w.serve(make_req("base", SYS + A + B, payload))
    new = SYS + A_SHORT + B + TURN
    req = make_req("r2", new, payload)
    w.serve(req)
    info = _info(req)
    assert info["version"] == 2 and info["tokens"]["repaired"] == 32
    assert info["directives"] == [{"index": 0, "status": "applied", "reason": None,
                                   "spliced_tokens": len(B) - 32, "window_tokens": 32}]  # fmt: skip
    w.assert_fresh_prefill_kv(new)


def test_the_repair_accounting_reaches_the_openai_response() -> None:
    """What the cache published for a REPAIR request, lifted by the plugin's
    ``_build_chat_response`` hook into SGLang's own response classes (test_sgl_response drives
    the hook through OpenAIServingChat): ``repaired`` inside ``tokens`` (part of
    ``recomputed``) and the directive's ``window_tokens``, top level and ``usage.leyline``."""
    w = World()
    req, *_ = _edited(w, _payload(2, 1, [("repair", 64)]), reweigh=False)
    n = len(req.origin_input_ids)
    usage = UsageInfo(prompt_tokens=n, completion_tokens=1, total_tokens=n + 1,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=n - 124))  # fmt: skip
    built = ChatCompletionResponse(id="c", model="m", choices=[], usage=usage)
    ret = [{"meta_info": {"leyline": req.customized_info["leyline"]}}]
    body = jsonable_encoder(response.with_accounting(built, None, None, ret))
    assert body["leyline"] == body["usage"]["leyline"] == _info(req)
    info = ResponseInfo.from_wire(body["leyline"])
    assert info.tokens.repaired == 64 <= info.tokens.recomputed == 124
    assert info.directives[0].window_tokens == 64
    assert body["usage"]["prompt_tokens_details"]["approximate_tokens"] == len(B) - 64


def test_the_default_window_is_a_setting(monkeypatch) -> None:
    """``LEYLINE_SGLANG_REPAIR_WINDOW`` (read in `leyline._config`) and the cache config."""
    monkeypatch.setenv("LEYLINE_SGLANG_REPAIR_WINDOW", "48")
    assert Environment.read().sglang_repair_window == 48
    assert LeylineCacheConfig(repair_window=48).repair.size(1000) == 48
    assert LeylineCacheConfig().repair.size(1000) == 128  # the core's DEFAULT_REPAIR
    monkeypatch.delenv("LEYLINE_SGLANG_REPAIR_WINDOW")
    assert Environment.read().sglang_repair_window is None
    for bad in ("-3", "12k", "1.5"):
        monkeypatch.setenv("LEYLINE_SGLANG_REPAIR_WINDOW", bad)
        with pytest.raises(ValueError, match="LEYLINE_SGLANG_REPAIR_WINDOW"):
            Environment.read()
    with pytest.raises(ValueError, match="repair_window"):
        LeylineCacheConfig(repair_window=-1)
