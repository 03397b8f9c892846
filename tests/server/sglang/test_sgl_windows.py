"""Middle windows on SGLang's own scheduling classes (0.5.16 and 0.5.23): plans of the form
``[exact][window][copy][window][copy]...[turn]`` served with only the windows prefilled.

Each request goes through what the scheduler does with it: ``Req.init_next_round_input``
(radix match), SGLang's real ``PrefillAdder`` (``add_one_req``, then ``add_chunked_req`` per
round) with the plugin's hooks applied through SGLang's ``HookRegistry``, a forward step that
allocates the round's slots and writes their KV, SGLang's chunk caching between rounds
(0.5.16 ``cache_unfinished_req``, 0.5.23 ``checkpoint_kv_cache``) and the release at the end
(finished, or an abort's; `_sglang_support` holds the steps of each version). The forward is
the only fake: a context-free model whose KV depends on (token id, position) only, written
after SGLang's own rotary embedding. In such a model a fresh prefill gives
``key_at(token[p], p)`` at every position, so the final KV of every position is checked
against that, and the rounds show what was actually prefilled.
"""

from __future__ import annotations

import json

import pytest
from _sglang_support import (
    WORLD_VOCAB,
    World,
    apply_window_hooks,
    extend_bounds,
    make_req,
    prefix_slots,
    require_sglang,
)

require_sglang()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sglang.srt.managers.schedule_policy import PrefillAdder  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402

from leyline.directives import Directive, Mode  # noqa: E402
from leyline.protocol import Payload, TokenCounts  # noqa: E402
from leyline.server.sglang.cache import LeylineCacheConfig  # noqa: E402
from leyline.server.sglang.windows import WINDOW_ATTR  # noqa: E402

VOCAB = WORLD_VOCAB


@pytest.fixture(scope="module", autouse=True)
def _hooks() -> None:
    apply_window_hooks()
    assert PrefillAdder.add_one_req.__name__ == "add_one_req"
    assert hasattr(PrefillAdder.add_one_req, "__wrapped__")  # patched by the registry


def _toks(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, VOCAB, n).tolist()


def _payload(version: int, base: int | None, modes: list[str]) -> dict:
    """A valid wire payload with one replacement per mode (the server maps them by diff)."""
    ds = tuple(Directive(2 * i + 1, 2 * i + 2, (2 * i + 1, 2 * i + 2), Mode(m))
               for i, m in enumerate(modes))  # fmt: skip
    segs = (("0123456789abcdef", 10),) * (2 * len(modes) + 2)
    return Payload("s", version, base, segs, ds).to_wire()


def _info(req) -> dict:
    return json.loads(req.customized_info["leyline"][0])


def _base(world: World, tokens: list[int]) -> None:
    req = make_req("base", tokens, _payload(1, None, []))
    world.serve(req)


SYS, A, B, TURN = _toks(1, 60), _toks(2, 240), _toks(3, 300), _toks(4, 40)
# A donor's payload: only requests that opt in to content reuse are indexed for it.
DONATE = {"session": "donor", "version": 1, "base_version": None}
A_SHORT = _toks(5, 20)


def _two_edits() -> tuple[World, list[int], list[int]]:
    """A served base, and a request that truncates A and replaces a 50-token span before C."""
    w = World()
    c = _toks(6, 200)
    _base(w, SYS + A + B + _toks(7, 50) + c)
    return w, c, SYS + A_SHORT + B + _toks(8, 9) + c + TURN


@pytest.mark.parametrize("chunk", [4096, 16, None])
def test_replacement_prefills_only_the_window_and_the_turn(chunk) -> None:
    """Truncating an old tool output: the short replacement is one window, the suffix after it
    is spliced, the turn is prefilled; with a small SGLang chunk budget the window spans
    several chunks; with chunked prefill off (None) the hooks give the budget."""
    w = World()
    base = SYS + A + B
    _base(w, base)
    new = SYS + A_SHORT + B + TURN
    req = make_req("r2", new, _payload(2, 1, ["amortize"]))
    w.prefilled = 0
    rounds = w.serve(req, chunk=chunk)
    info = _info(req)
    t = info["tokens"]
    assert info["windows"] == 1
    assert info["directives"] == [
        {"index": 0, "status": "applied", "reason": None, "spliced_tokens": len(B)}
    ]
    assert t["exact"] == len(SYS) and t["spliced"] == len(B) and t["inherited"] == 0
    assert t["recomputed"] == len(A_SHORT) + len(TURN) == w.prefilled
    assert TokenCounts.from_wire(t).total == len(new) and info["exact_kv"] is False
    assert rounds[0][0] == len(SYS) and rounds[-1][1] == len(new)
    window_end = len(SYS) + len(A_SHORT)
    assert any(e == window_end for _s, e in rounds)
    assert rounds[-1][0] >= window_end + len(B) or chunk == 16
    assert getattr(req, WINDOW_ATTR) is None
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_two_windows_in_one_request() -> None:
    w, c, new = _two_edits()
    req = make_req("r2", new, _payload(2, 1, ["amortize", "amortize"]))
    w.prefilled = 0
    rounds = w.serve(req)
    info = _info(req)
    assert info["windows"] == 2 and len(rounds) == 3
    assert [d["status"] for d in info["directives"]] == ["applied", "applied"]
    assert [d["spliced_tokens"] for d in info["directives"]] == [len(B), len(c)]
    assert info["tokens"]["recomputed"] == w.prefilled == len(A_SHORT) + 9 + len(TURN)
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_mixed_amortize_and_forget_with_an_appended_turn() -> None:
    """One outcome per client directive; FORGET recomputes from its edit on (exact)."""
    w, _c, new = _two_edits()
    req = make_req("r2", new, _payload(2, 1, ["amortize", "forget"]))
    w.serve(req)
    info = _info(req)
    assert [(d["status"], d["spliced_tokens"]) for d in info["directives"]] == [
        ("applied", len(B)), ("applied", 0)
    ]  # fmt: skip
    assert info["tokens"]["spliced"] == len(B)
    assert info["tokens"]["recomputed"] == len(new) - len(SYS) - len(B)
    w.assert_fresh_prefill_kv(new)


def test_moved_block_is_copied_whole_without_windows() -> None:
    """A message moved later: every token of it and around it is copied (one delta per run);
    only the turn is prefilled."""
    w = World()
    c = _toks(6, 200)
    base = SYS + A + B + c
    _base(w, base)
    new = SYS + B + A + c + TURN
    req = make_req("r2", new, _payload(2, 1, ["amortize", "amortize"]))
    w.prefilled = 0
    rounds = w.serve(req)
    t = _info(req)["tokens"]
    assert t["spliced"] + t["chunk_reused"] >= len(B) + len(A) + len(c) - 32
    assert w.prefilled == t["recomputed"] <= len(TURN) + 32
    assert len(rounds) <= 2
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_abort_between_windows_leaks_nothing() -> None:
    w, _c, new = _two_edits()
    req = make_req("r2", new, _payload(2, 1, ["amortize", "amortize"]))
    rounds = w.serve(req, abort_after=1)
    assert len(rounds) == 1 and getattr(req, WINDOW_ATTR) is None
    w.assert_no_leak()
    w.cache.evict(EvictParams(num_tokens=10**6))
    assert w.stack.alloc.available_size() == w.stack.size
    # The session still serves the next request correctly.
    req3 = make_req("r3", new, _payload(3, 1, ["amortize", "amortize"]))
    w.serve(req3)
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_eviction_pressure_keeps_donors_and_invariant() -> None:
    """The pool holds the base, unrelated cached content and little else: the splice behind
    the window evicts the unrelated content, never the base it copies from."""
    base = SYS + A + B
    new = SYS + A_SHORT + B + TURN
    size = len(base) + 120 + len(new) - len(SYS) + 8
    w = World(size=size)
    _base(w, base)
    other = make_req("other", _toks(9, 120), None)
    w.serve(other)
    req = make_req("r2", new, _payload(2, 1, ["amortize"]))
    w.prefilled = 0
    w.serve(req)
    info = _info(req)
    assert info["directives"][0]["status"] == "applied"
    assert w.prefilled == len(A_SHORT) + len(TURN)
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_a_full_pool_recomputes_and_says_why() -> None:
    """No slot for the splice behind the window: the suffix is prefilled (same KV), and the
    directive is not reported applied."""
    w = World()
    base = SYS + A + B
    new = SYS + A_SHORT + B + TURN
    _base(w, base)
    req = make_req("r2", new, _payload(2, 1, ["amortize"]))
    hold = make_req("hold", [*base, 1], _payload(9, None, []))  # the base cannot be evicted
    hold.init_next_round_input(w.cache)
    w.cache.inc_lock_ref(hold.last_node)
    w.prefilled = 0
    w.serve(req, squeeze=True)
    assert w.prefilled == len(new) - len(SYS)
    info = _info(req)
    assert info["tokens"]["spliced"] == 0
    assert info["directives"][0]["status"] == "ignored"
    assert "no free KV slots" in info["directives"][0]["reason"], info
    w.assert_fresh_prefill_kv(new)
    w.cache.dec_lock_ref(hold.last_node)
    w.assert_no_leak()


def test_requests_without_payload_take_sglangs_path_under_the_hooks() -> None:
    w = World()
    plain = make_req("p", SYS + A + B, None)
    rounds = w.serve(plain, chunk=100)
    assert rounds == [(0, 100), (100, 200), (200, 300), (300, 400), (400, 500), (500, 600)]
    assert not hasattr(plain, WINDOW_ATTR) and plain.customized_info is None
    again = make_req("p2", SYS + A + B + TURN, None)
    assert w.serve(again, chunk=4096) == [(len(SYS + A + B), len(SYS + A + B + TURN))]
    w.assert_no_leak()


def test_splice_verification_reports_rows_checked_against_the_core_rotate() -> None:
    """``LEYLINE_SGLANG_VERIFY_SPLICES=1`` (the real-server correctness run) checks every
    spliced row against the core's torch `rotate` of its donor and reports it per request."""
    w = World(config=LeylineCacheConfig(min_copy_run=32, verify_splices=True))
    _base(w, SYS + A + B)
    new = SYS + A_SHORT + B + TURN
    req = make_req("r2", new, _payload(2, 1, ["amortize"]))
    w.serve(req)
    checks = _info(req)["splice_checks"]
    # the exact prefix seeded from the plain namespace (delta 0), then the spliced suffix
    assert checks["rows"] == len(SYS) + len(B) and checks["bit_exact_outside_rope"] is True
    assert checks["max_abs_err"] < 1e-4
    # A corrupted splice is caught: rotate the wrong way and the check reports it.
    w.cache.splicer.check(torch.tensor([1]), torch.tensor([2]), torch.tensor([5]))
    assert w.cache.splicer.checks["max_abs_err"] > 1e-3


def test_retraction_between_windows_resumes_from_the_cached_part() -> None:
    """SGLang retracts a chunked request under memory pressure (``release_kv_cache`` without
    insert, ``Req.reset_for_retract``) and admits it again later: the window and the splice
    behind it stay cached, so the second admission prefills only the turn."""
    w = World()
    _base(w, SYS + A + B)
    new = SYS + A_SHORT + B + TURN
    req = make_req("r2", new, _payload(2, 1, ["amortize"]))
    w.prefilled = 0
    w.serve(req, abort_after=1)  # the first round, cached, then released without insert
    req.reset_for_retract()
    assert w.cache.protected_size() == 0
    rounds = w.serve(req)
    assert rounds == [(len(SYS) + len(A_SHORT) + len(B), len(new))]
    assert w.prefilled == len(A_SHORT) + len(TURN)
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_evicting_a_chunk_donor_to_make_room_replans_without_it() -> None:
    """The copy behind a window needs slots and only the donor's own sequence can be evicted:
    the donor's chunks leave the index with it and the plan is redone (its tokens are
    prefilled), instead of copying from slots that were just freed (possibly into themselves)."""
    donor = _toks(12, 1200)
    head = _toks(13, 40)
    new = head + donor + TURN
    payload = {"session": "t", "version": 1, "base_version": None}
    dry = World()  # where the window before the reused chunks ends
    dry.serve(make_req("donor", donor, DONATE))
    probe = make_req("probe", new, payload)
    probe.init_next_round_input(dry.cache)
    window_end = getattr(probe, WINDOW_ATTR)
    assert window_end is not None
    # The window fits, the copy behind it does not until the donor is evicted.
    w = World(size=len(donor) + window_end + 45)
    w.serve(make_req("donor", donor, DONATE))  # indexed for content reuse, evictable
    assert len(w.cache._index()) > 0
    req = make_req("r", new, payload)
    w.prefilled = 0
    w.serve(req)
    info = _info(req)
    assert info["tokens"]["chunk_reused"] == 0, info
    assert w.prefilled == len(new)
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_a_window_never_makes_a_second_chunked_request_in_one_round() -> None:
    """SGLang keeps one chunked request: while another request's chunk uses this round's
    budget, a request with a window waits; when it is admitted, the round's budget is spent."""
    w = World()
    _base(w, SYS + A + B)
    windowed = make_req("r2", SYS + A_SHORT + B + TURN, _payload(2, 1, ["amortize"]))
    windowed.init_next_round_input(w.cache)
    assert getattr(windowed, WINDOW_ATTR) is not None
    other = make_req("other", _toks(20, 400), None)
    other.init_next_round_input(w.cache)
    adder = w.adder(100)
    adder.add_one_req(other, has_chunked_req=False, truncation_align_size=None)
    assert adder.new_chunked_req is other and adder.rem_chunk_tokens == 0
    adder.add_one_req(windowed, has_chunked_req=True, truncation_align_size=None)
    assert adder.can_run_list == [other]  # not admitted in this round
    # Next round, with budget: admitted, chunk ends at the window, budget spent.
    w.cache.dec_lock_ref(other.last_node)
    adder = w.adder(4096)
    adder.add_one_req(windowed, has_chunked_req=False, truncation_align_size=None)
    assert adder.new_chunked_req is windowed
    assert extend_bounds(windowed)[1] == getattr(windowed, WINDOW_ATTR)
    assert adder.rem_chunk_tokens == 0
    w.cache.dec_lock_ref(windowed.last_node)


# ----- truthful accounting across a session's requests -----


def test_appended_turns_stay_exact() -> None:
    """Without edits nothing approximate is used: each version is served from the plain
    namespace, and the next one finds it there as an exact prefix."""
    w = World()
    _base(w, SYS + A)
    v2 = SYS + A + TURN
    req = make_req("r2", v2, _payload(2, 1, []))
    w.serve(req)
    info = _info(req)
    assert info["tokens"]["exact"] == len(SYS + A) and info["exact_kv"] is True
    assert info["tokens"]["recomputed"] == len(TURN)
    plain = make_req("p", v2, None)  # a request without payload shares that KV
    plain.init_next_round_input(w.cache)
    assert len(prefix_slots(w.cache, plain)) == len(v2) - 1
    w.cache.dec_lock_ref(plain.last_node)
    w.assert_no_leak()


def test_a_spliced_prefix_is_inherited_by_the_next_request_not_exact() -> None:
    w = World()
    _base(w, SYS + A + B)
    v2 = SYS + A_SHORT + B + TURN
    w.serve(make_req("r2", v2, _payload(2, 1, ["amortize"])))
    v3 = v2 + _toks(21, 30)
    req = make_req("r3", v3, _payload(3, 2, []))
    w.prefilled = 0
    w.serve(req)
    info = _info(req)
    t = info["tokens"]
    assert t["exact"] <= len(SYS)  # what the edit left of the exact base
    assert t["inherited"] == len(v2) - t["exact"] > 0  # v2's window, splice and turn
    assert t["spliced"] == t["chunk_reused"] == 0 and t["recomputed"] == 30 == w.prefilled
    assert t["approximate"] == t["inherited"] and info["exact_kv"] is False
    # The inherited KV stays out of reach of requests that did not opt in.
    for payload in (None, {**_payload(4, 3, []), "approximate": False}):
        other = make_req("o", v3, payload)
        other.init_next_round_input(w.cache)
        assert len(prefix_slots(w.cache, other)) == t["exact"] and other.customized_info is None
        w.cache.dec_lock_ref(other.last_node)
    w.assert_fresh_prefill_kv(v3)
    w.assert_no_leak()


@pytest.mark.parametrize(
    ("mode", "session"), [("amortize", "s"), ("forget", "s"), ("forget", "unknown")]
)
def test_forget_uses_no_chunk_from_the_content_index(mode, session) -> None:
    """The replacement holds content another request left in the content index: AMORTIZE may
    copy its chunks; FORGET asks for exact KV after its edit, so nothing is copied, even when
    the server has no base to locate the edit in (``unknown``: the directive is ignored)."""
    w = World()
    donor = _toks(12, 1200)
    w.serve(make_req("donor", donor, DONATE))  # indexed for content reuse
    _base(w, SYS + A + B)
    new = SYS + A_SHORT + donor + B + TURN
    req = make_req("r2", new, {**_payload(2, 1, [mode]), "session": session})
    w.prefilled = 0
    w.serve(req)
    info = _info(req)
    t = info["tokens"]
    status = info["directives"][0]["status"]
    assert status == ("applied" if session == "s" else "ignored")
    if mode == "amortize":
        assert t["chunk_reused"] > len(donor) // 2 and t["spliced"] == len(B)
    else:
        assert t["chunk_reused"] == t["spliced"] == t["inherited"] == 0
        assert t["exact"] == len(SYS) and info["exact_kv"] is True
        assert w.prefilled == len(new) - len(SYS) == t["recomputed"]
    w.assert_fresh_prefill_kv(new, tol=1e-3)  # rotated copies up to ~1,600 rad
    w.assert_no_leak()


@pytest.mark.parametrize("tenant", ["alice", "bob"])
def test_tenants_are_walls_for_chunk_reuse_and_matching(tenant) -> None:
    """Content cached for one tenant (``cache_salt``) is neither matched nor copied from the
    content index for another: the same request from the same tenant reuses it."""
    w = World()
    donor = _toks(12, 1200)
    w.serve(make_req("donor", donor, DONATE, salt="alice"))  # indexed for alice
    new = _toks(13, 40) + donor + TURN
    payload = {"session": "t", "version": 1, "base_version": None}
    req = make_req("r", new, payload, salt=tenant)
    w.prefilled = 0
    w.serve(req)
    t = _info(req)["tokens"]
    if tenant == "alice":
        assert t["chunk_reused"] > len(donor) // 2 and w.prefilled < len(new) - len(donor) // 2
    else:
        assert t["chunk_reused"] == t["exact"] == t["inherited"] == 0
        assert w.prefilled == len(new) == t["recomputed"]
    plain = make_req("p", donor + TURN, None, salt=tenant)
    plain.init_next_round_input(w.cache)
    assert len(prefix_slots(w.cache, plain)) == (len(donor) if tenant == "alice" else 0)
    w.assert_no_leak()


def test_a_retried_edit_is_not_needed_not_ignored() -> None:
    """The same edited request again (a client retry): the edit and everything after it are
    already cached, so the directive is reported ``not_needed`` and nothing is copied."""
    w = World()
    _base(w, SYS + A + B)
    new = SYS + A_SHORT + B + TURN
    first = make_req("r2", new, _payload(2, 1, ["amortize"]))
    w.serve(first)
    assert _info(first)["directives"][0]["status"] == "applied"
    retry = make_req("r2-retry", new, _payload(2, 1, ["amortize"]))
    w.prefilled = 0
    w.serve(retry)
    info = _info(retry)
    (outcome,) = info["directives"]
    assert outcome["status"] == "not_needed" and outcome["spliced_tokens"] == 0
    assert outcome["reason"]
    t = info["tokens"]
    assert (t["exact"], t["inherited"]) == (len(SYS), len(new) - 1 - len(SYS))
    assert t["recomputed"] == 1 == w.prefilled  # the last prompt token, for its logits
    w.assert_no_leak()


@pytest.mark.parametrize("modes", [[], ["amortize"]])
def test_accounting_follows_an_eviction_before_admission(modes) -> None:
    """SGLang's scheduling policy matches a waiting request before admitting it; what is
    evicted in between is prefilled, and the accounting says so."""
    w = World()
    _base(w, SYS + A + B)
    new = SYS + A + B + TURN if not modes else SYS + A_SHORT + B + TURN
    req = make_req("r2", new, _payload(2, 1, modes))
    req.init_next_round_input(w.cache)  # the policy's lookup: planned, copies made
    assert _info(req)["tokens"]["exact"] == (len(SYS) if modes else len(SYS + A + B))
    w.cache.evict(EvictParams(num_tokens=10**6))  # nothing was locked yet
    w.prefilled = 0
    w.serve(req)
    info = _info(req)
    assert info["tokens"]["recomputed"] == len(new) == w.prefilled
    if modes:
        assert info["directives"][0]["status"] == "ignored"
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_forget_never_inherits_approximate_kv_past_its_edit() -> None:
    """Another session already sent the same edited prompt with AMORTIZE: the approximate
    namespace holds its spliced suffix. A FORGET request for those tokens is served from exact
    KV only (its match there runs past the edit), and says so."""
    w = World()
    _base(w, SYS + A + B)
    new = SYS + A_SHORT + B + TURN
    w.serve(make_req("r2", new, _payload(2, 1, ["amortize"])))
    w.serve(make_req("b2", SYS + A + B, {**_payload(1, None, []), "session": "s2"}))
    req = make_req("f2", new, {**_payload(2, 1, ["forget"]), "session": "s2"})
    w.prefilled = 0
    w.serve(req)
    info = _info(req)
    t = info["tokens"]
    assert info["exact_kv"] is True and t["inherited"] == t["spliced"] == 0
    assert t["exact"] == len(SYS) and w.prefilled == len(new) - len(SYS) == t["recomputed"]
    assert info["directives"][0]["status"] == "applied"
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()


def test_exact_counts_only_kv_seeded_from_the_plain_namespace() -> None:
    """An approximate request's prompt replayed without approximation is cached exact in the
    plain namespace too; a later request served in the approximate namespace still uses that
    namespace's (spliced) KV, and counts it inherited."""
    w = World()
    _base(w, SYS + A + B)
    v2 = SYS + A_SHORT + B + TURN
    w.serve(make_req("r2", v2, _payload(2, 1, ["amortize"])))
    w.serve(make_req("replay", v2, None))  # exact, in the plain namespace
    v3 = SYS + A_SHORT + B[:100] + B[150:] + TURN + _toks(22, 20)
    req = make_req("r3", v3, _payload(3, 2, ["amortize"]))
    w.serve(req)
    t = _info(req)["tokens"]
    assert t["exact"] == len(SYS)  # what r2 seeded; the plain match is 100 + 20 tokens longer
    assert t["inherited"] == len(A_SHORT) + 100 and t["spliced"] > 0
    w.assert_no_leak()


def test_exact_prefix_survives_a_split_of_a_seeded_node() -> None:
    """Another session shares only the head of a seeded prefix: SGLang splits that radix node
    (`LeylineRadixCache._split_node`), and both halves stay exact."""
    w = World()
    _base(w, SYS + A + B)
    w.serve(make_req("r2", SYS + A_SHORT + B + TURN, _payload(2, 1, ["amortize"])))
    head, a2, b2, turn2 = SYS[:30] + _toks(23, 30), _toks(24, 240), _toks(25, 300), _toks(26, 40)
    s2 = {"session": "s2"}
    w.serve(make_req("b2", head + a2 + b2, {**_payload(1, None, []), **s2}))
    new = head + _toks(27, 20) + b2 + turn2
    req = make_req("r2b", new, {**_payload(2, 1, ["amortize"]), **s2})
    w.serve(req)
    t = _info(req)["tokens"]
    assert (t["exact"], t["inherited"], t["spliced"]) == (len(head), 0, len(b2))
    w.assert_fresh_prefill_kv(new)
    w.assert_no_leak()
