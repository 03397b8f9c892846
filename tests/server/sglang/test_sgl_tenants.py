"""Tenants on SGLang (0.5.16 and 0.5.23): issue 13's guarantees in the plugin, on SGLang's own
classes (docs/security.md, "On SGLang").

A tenant is what SGLang keys its radix tree with: the request's ``cache_salt`` (0.5.16 folds
it into ``extra_key``; 0.5.23 keeps it apart) with its ``extra_key``. Requests run through
SGLang's ``Req.init_next_round_input``, its real ``PrefillAdder`` with the plugin's window
hooks, its chunk caching and release (`_sglang_support` holds each version's steps); the only
fake is the forward, which writes a KV row per (token id, position). The HTTP tests put the
plugin's routes on SGLang's module-level ``app`` behind SGLang's own API-key middleware.
"""

from __future__ import annotations

import json

import pytest
from _sglang_support import (
    apply_window_hooks,
    commit,
    extend_bounds,
    make_req,
    mha_stack,
    prefix_slots,
    release,
    require_sglang,
    row,
    stash,
)

require_sglang()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_ABORT, ScheduleBatch  # noqa: E402
from sglang.srt.managers.schedule_policy import PrefillAdder  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402

from leyline.server.sglang import compat  # noqa: E402
from leyline.server.sglang.cache import (  # noqa: E402
    LeylineCacheConfig,
    LeylineRadixCache,
    tenant_of,
)
from leyline.server.sglang.pool import PoolBinding  # noqa: E402
from leyline.server.sglang.rotary import rope_spec_from_module  # noqa: E402

VOCAB = 3000


@pytest.fixture(scope="module", autouse=True)
def _hooks() -> None:
    apply_window_hooks()


class World:
    """A real MHA pool, allocator and Leyline cache, served the way SGLang's scheduler does."""

    def __init__(self, **config: object) -> None:
        from sglang.srt.layers.rotary_embedding import get_rope

        self.stack = mha_stack(size=3000, layers=2, heads=2, head_dim=32, v_dim=16,
                               dtype=torch.float32)  # fmt: skip
        rope = get_rope(32, 32, 32768, 10000, True, None, torch.float32)
        binding = PoolBinding.from_pool(self.stack.pool, rope_spec_from_module(rope))
        cfg = LeylineCacheConfig(min_copy_run=32, min_moved_run=16, **config)  # type: ignore[arg-type]
        self.cache = LeylineRadixCache(self.stack.params, binding, cfg)
        self.prefilled = 0

    def forward(self, req) -> None:
        s, e = extend_bounds(req)
        prefix = prefix_slots(self.cache, req)
        new = self.stack.alloc.alloc(e - s)
        assert new is not None
        toks = torch.tensor(list(req.full_untruncated_fill_ids[s:e]), dtype=torch.float32)
        for layer in range(2):
            self.stack.pool.k_buffer[layer][new] = (toks + torch.arange(s, e) / 1e4)[:, None, None]
            self.stack.pool.v_buffer[layer][new] = toks[:, None, None]
        idx = row(self.stack, req)
        self.stack.req_to_token.write((idx, slice(0, e)), torch.cat([prefix, new]).to(torch.int32))
        commit(req, e)
        self.prefilled += e - s

    def run(self, req) -> None:
        """Admission and prefill rounds (windows end chunks) up to the release's call."""
        req.init_next_round_input(self.cache)
        adder = PrefillAdder(1, self.cache, self.stack.alloc, ScheduleBatch(reqs=[]), 0.5,
                             10_000, 4096)  # fmt: skip
        adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None)
        chunked = adder.new_chunked_req is req
        self.forward(req)
        while chunked:
            stash(self.cache, req)
            req.init_next_round_input()
            adder = PrefillAdder(1, self.cache, self.stack.alloc, ScheduleBatch(reqs=[]), 0.5,
                                 10_000, 4096)  # fmt: skip
            chunked = adder.add_chunked_req(req) is req
            self.forward(req)

    def serve(self, req) -> dict | None:
        self.run(req)
        release(self.cache, self.stack, req)
        return _info(req)

    def matched(self, tokens: list[int], salt: str | None) -> int:
        """What a request without payload of tenant ``salt`` finds cached (SGLang's path)."""
        probe = make_req("probe", tokens, None, salt=salt)
        probe.init_next_round_input(self.cache)
        n = len(prefix_slots(self.cache, probe))
        if n:
            self.cache.dec_lock_ref(probe.last_node)
        return n

    def assert_no_leak(self) -> None:
        assert self.cache.protected_size() == 0
        assert self.stack.alloc.available_size() + self.cache.evictable_size() == self.stack.size


def _toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, VOCAB, n).tolist()


def _info(req) -> dict | None:
    info = (req.customized_info or {}).get("leyline")
    return None if info is None else json.loads(info[0])


def _content(info: dict) -> dict:
    """The accounting without its host timings (which differ between any two runs)."""
    return {k: v for k, v in info.items() if k not in ("timings_ms", "timeline_ms")}


SYS, A, B, TURN, DONOR = _toks(1, 60), _toks(2, 240), _toks(3, 300), _toks(4, 40), _toks(5, 900)
EDITED = SYS + A[:20] + B + TURN  # A truncated: B moves left by 220 tokens
DIFF = {"session": "s", "mode": "amortize"}  # the server-diff payload: the plugin numbers versions
OPT_IN = {"session": "donor", "version": 1, "base_version": None}


def _edit_session(w: World, salt: str | None) -> dict:
    """Version 1 of session ``s`` and an AMORTIZE edit of it (version 2), for tenant ``salt``."""
    w.serve(make_req("v1", SYS + A + B, DIFF, salt=salt))
    info = w.serve(make_req("v2", EDITED, DIFF, salt=salt))
    assert info is not None and info["version"] == 2 and info["tokens"]["spliced"] == len(B)
    return info


# ----- cached KV and the content index -----


def test_another_tenants_spliced_kv_and_sessions_are_out_of_reach() -> None:
    """Bob sends Alice's session id and her edited prompt: he opens a session of his own, and
    neither her radix entries (plain or approximate) nor her session's base serve him. His
    response is the one he gets from a server that never saw Alice."""
    w, fresh = World(), World()
    _edit_session(w, "alice")
    bob = {}
    for world in (w, fresh):
        world.prefilled = 0
        req = make_req("bob", EDITED, DIFF, salt="bob")
        bob[id(world)] = (world.serve(req), world.prefilled, tenant_of(req))
    (seen, prefilled, tenant), (unseen, prefilled_fresh, _) = bob[id(w)], bob[id(fresh)]
    assert _content(seen) == _content(unseen) and prefilled == prefilled_fresh == len(EDITED)
    assert seen["version"] == 1 and seen["tokens"]["recomputed"] == len(EDITED)
    assert w.cache.sessions.latest(tenant, "s") == 1
    assert w.matched(EDITED, "carol") == 0 and w.matched(EDITED, "alice") > 0
    # Alice's session is untouched: her next turn still builds on her version 2.
    again = w.serve(make_req("v3", EDITED + TURN, DIFF, salt="alice"))
    t = again["tokens"]
    assert again["version"] == 3 and t["inherited"] > len(B) // 2
    assert t["exact"] + t["inherited"] == len(EDITED)
    w.assert_no_leak()


@pytest.mark.parametrize("tenant", ["alice", "bob", None])
def test_chunks_are_reused_only_within_their_tenant(tenant) -> None:
    """Alice donated DONOR (opted in). A request that could reuse it by content finds it only
    when it is hers; the others' accounting equals a server without her content."""
    w = World()
    w.serve(make_req("donor", DONOR, OPT_IN, salt="alice"))
    new = _toks(6, 40) + DONOR + TURN
    info = w.serve(make_req("r", new, {**OPT_IN, "session": "r"}, salt=tenant))
    if tenant == "alice":
        assert info["tokens"]["chunk_reused"] > len(DONOR) // 2
    else:
        assert info["tokens"]["chunk_reused"] == info["tokens"]["exact"] == 0
        assert w.prefilled - len(DONOR) == len(new)
    w.assert_no_leak()


@pytest.mark.parametrize(
    ("donor_payload", "index_all", "indexed"),
    [
        (None, False, False),  # a plain OpenAI request
        ({**OPT_IN, "content_reuse": False}, False, False),
        ({**OPT_IN, "approximate": False}, False, False),
        (OPT_IN, False, True),
        (None, True, True),  # LEYLINE_SGLANG_INDEX_ALL_REQUESTS=1
    ],
)
def test_only_opted_in_content_is_indexed(donor_payload, index_all, indexed) -> None:
    w = World(index_all_requests=index_all)
    w.serve(make_req("donor", DONOR, donor_payload, salt="alice"))
    assert (len(w.cache._index()) > 0) is indexed
    new = _toks(6, 40) + DONOR + TURN
    info = w.serve(make_req("r", new, {**OPT_IN, "session": "r"}, salt="alice"))
    assert (info["tokens"]["chunk_reused"] > 0) is indexed
    # Even donated to everyone, content stays in its tenant.
    bob = w.serve(make_req("b", new, {**OPT_IN, "session": "b"}, salt="bob"))
    assert bob["tokens"]["chunk_reused"] == bob["tokens"]["exact"] == 0
    w.assert_no_leak()


def test_operator_setting_is_read_by_the_backend_factory(monkeypatch) -> None:
    from leyline._config import Environment

    monkeypatch.setenv("LEYLINE_SGLANG_INDEX_ALL_REQUESTS", "1")
    assert Environment.read().sglang_index_all_requests is True
    monkeypatch.delenv("LEYLINE_SGLANG_INDEX_ALL_REQUESTS")
    assert Environment.read().sglang_index_all_requests is False


def test_a_tenant_cannot_pose_as_another_through_its_extra_key() -> None:
    """0.5.23 keeps the salt apart from the extra key; the plugin's tenant key must not let an
    extra key spell another (extra key, salt) pair (it did: ``extra_key + "\\x1f" + salt``)."""
    if not compat.CHECKPOINTS:
        pytest.skip("0.5.16 concatenates cache_salt and extra_key itself (SGLang's namespace)")
    real = make_req("a", [1, 2, 3], None, extra_key="x", salt="y")
    forged = make_req("f", [1, 2, 3], None, extra_key="x\x1fy")
    assert tenant_of(real) != tenant_of(forged)
    assert tenant_of(real) != tenant_of(make_req("n", [1, 2, 3], None, extra_key="x"))


# ----- session versions: only a request that completed records one -----


@pytest.mark.parametrize("how", ["released", "finished_aborted"])
def test_an_aborted_request_records_no_session_version(how) -> None:
    w = World()
    w.serve(make_req("v1", SYS + A + B, DIFF, salt="alice"))
    req = make_req("v2", EDITED, DIFF, salt="alice")
    w.run(req)
    if how == "released":  # the scheduler's abort: released without inserting
        release(w.cache, w.stack, req, insert=False)
    else:  # aborted after its last forward: finished with FINISH_ABORT, released as finished
        _finish_aborted(w, req)
    tenant = tenant_of(req)
    assert w.cache.sessions.latest(tenant, "s") == 1
    info = w.serve(make_req("v2b", EDITED, DIFF, salt="alice"))
    assert info["version"] == 2  # edits version 1, as the aborted request did
    if how == "released":  # the splice it made stayed in the tree: this retry needs none
        assert info["directives"][0]["status"] == "not_needed"
    else:  # SGLang inserted all its KV when it released it as finished: found cached
        assert info["tokens"]["recomputed"] == 1
        assert info["directives"][0]["status"] == "not_needed"
    w.cache.evict(EvictParams(num_tokens=10**6))
    w.assert_no_leak()


def _finish_aborted(w: World, req) -> None:
    req.finished_reason = FINISH_ABORT()
    if compat.CHECKPOINTS:
        from sglang.srt.mem_cache.common import release_kv_cache

        release_kv_cache(req, w.cache, checkpoint=True)
        return
    w.cache.cache_finished_req(req, is_insert=True, kv_len_to_handle=req.kv_committed_len)
    w.stack.req_to_token.free(req)


# ----- HTTP: the plugin's routes behind SGLang's --api-key -----


@pytest.fixture
def app_with_keys(monkeypatch):
    """SGLang's module-level app with the plugin's routes and SGLang's own API-key middleware,
    added the way its launcher does when started with ``--api-key k --admin-api-key adm``
    (0.5.16 ``launch_server``, 0.5.23 ``_setup_and_run_http_server``); undone afterwards."""
    from sglang.srt.entrypoints import http_server
    from sglang.srt.utils.auth import add_api_key_middleware

    from leyline.server.sglang.routes import install_routes

    app = http_server.app
    monkeypatch.setattr(app, "user_middleware", list(app.user_middleware))
    monkeypatch.setattr(app, "middleware_stack", None)
    install_routes(app)
    add_api_key_middleware(app, api_key="k", admin_api_key="adm")
    return app


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/leyline/health"),
        ("GET", "/v1/leyline/info"),
        ("POST", "/v1/leyline/sessions/s1"),
        ("DELETE", "/v1/leyline/sessions/s1"),
    ],
)
def test_plugin_routes_sit_behind_sglangs_api_key(app_with_keys, method, path) -> None:
    from fastapi.testclient import TestClient

    client = TestClient(app_with_keys)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k"}):
        assert client.request(method, path, headers=headers).status_code == 401
    # NORMAL endpoints take the API key, not the admin key (SGLang's decide_request_auth).
    admin = client.request(method, path, headers={"Authorization": "Bearer adm"})
    assert admin.status_code == 401
    ok = client.request(method, path, headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200, ok.text
