"""Directive planner: splices, FORGET, verification against the prompt, chunk reuse, invariants."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from leyline.server.core.chunking import ChunkParams, chunk_spans
from leyline.server.core.index import ContentIndex
from leyline.server.core.planner import (
    CachedSequence,
    Mode,
    Plan,
    RepairWindow,
    TokenDirective,
    build_plan,
)

A, F, R = Mode.AMORTIZE, Mode.FORGET, Mode.REPAIR
SLOT0 = 7000  # base token i lives in slot SLOT0 + 3 * i (any injective map will do)


def _rand(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 120_000, n, dtype=np.int64)


def _base(rng: np.random.Generator, n: int) -> CachedSequence:
    return CachedSequence(_rand(rng, n), SLOT0 + 3 * np.arange(n))


def _edit(base: CachedSequence, directives: list[TokenDirective]) -> np.ndarray:
    out, prev = [], 0
    for d in directives:
        out += [base.tokens[prev : d.start], d.replacement]
        prev = d.end
    return np.concatenate([*out, base.tokens[prev:]])


def _donors(tokens: np.ndarray, slots: np.ndarray) -> dict[int, tuple[int, int]]:
    """slot -> (token, position) of a sequence indexed with token i at position i."""
    return {int(s): (int(t), i) for i, (t, s) in enumerate(zip(tokens, slots, strict=True))}


def _per_token(plan: Plan, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    kinds, slots, pos = [""] * n, np.full(n, -1), np.full(n, -1)
    for r in plan.runs:
        kinds[r.start : r.end] = [r.kind] * len(r)
        if r.kind != "recompute":
            slots[r.start : r.end], pos[r.start : r.end] = r.src_slots, r.src_positions
    return kinds, slots, pos


def _check(
    plan: Plan,
    request: np.ndarray,
    exact_len: int,
    base: CachedSequence | None = None,
    donors: dict[int, tuple[int, int]] | None = None,
    min_reuse: int = 32,
) -> list[str]:
    """Invariants every plan must satisfy; returns the per-token kinds."""
    n = len(request)
    assert plan.runs[0].start == 0 and plan.runs[-1].end == n
    assert all(a.end == b.start for a, b in pairwise(plan.runs))
    assert all(len(r) > 0 for r in plan.runs)
    assert plan.runs[-1].kind == "recompute"
    counts = (plan.exact_tokens, plan.spliced_tokens, plan.chunk_tokens, plan.recomputed_tokens)
    assert sum(counts) == n == plan.num_tokens
    kinds, slots, pos = _per_token(plan, n)
    for r in plan.copy_runs():
        assert np.all(np.arange(r.start, r.end) - r.src_positions == r.delta)
    for i, k in enumerate(kinds):
        if k == "exact":
            assert i < exact_len and pos[i] == i
        elif k == "spliced":
            assert base is not None and i >= exact_len
            # The prompt is the source of truth: a spliced token is the same token.
            assert base.tokens[pos[i]] == request[i] and base.slots[pos[i]] == slots[i]
        elif k == "chunk":
            assert donors is not None and i >= min_reuse
            assert donors[int(slots[i])] == (int(request[i]), int(pos[i]))
    return kinds


def test_no_base_exact_then_recompute() -> None:
    rng = np.random.default_rng(0)
    req = _rand(rng, 90)
    plan = build_plan(req, exact_len=40, exact_slots=np.arange(1, 41))
    assert [(r.kind, r.start, r.end) for r in plan.runs] == [
        ("exact", 0, 40),
        ("recompute", 40, 90),
    ]
    assert plan.outcomes == () and not plan.approximate
    assert np.array_equal(plan.runs[0].src_slots, np.arange(1, 41))
    # A full exact hit still recomputes the last token.
    full = build_plan(req, exact_len=90, exact_slots=np.arange(90))
    assert [(r.kind, r.start, r.end) for r in full.runs] == [
        ("exact", 0, 89),
        ("recompute", 89, 90),
    ]
    one = build_plan(req[:1], exact_len=1, exact_slots=[3])
    assert [(r.kind, r.start, r.end) for r in one.runs] == [("recompute", 0, 1)]


@pytest.mark.parametrize(
    ("span", "rlen"),
    [((200, 260), 0), ((200, 260), 13), ((200, 260), 60), ((200, 260), 150), ((200, 200), 37)],
    ids=["delete", "shorter", "same-length", "longer", "insert"],
)
def test_single_amortize_directive(span: tuple[int, int], rlen: int) -> None:
    rng = np.random.default_rng(rlen)
    base = _base(rng, 600)
    d = TokenDirective(*span, _rand(rng, rlen), A)
    turn = _rand(rng, 50)
    req = np.concatenate([_edit(base, [d]), turn])
    s = span[0]
    plan = build_plan(req, exact_len=s, exact_slots=base.slots[:s], base=base, directives=[d])
    _check(plan, req, s, base)
    delta = d.shift
    suffix = (s + rlen, 600 + delta)
    want = [("exact", 0, s)]
    if rlen:
        want.append(("recompute", s, s + rlen))
    want += [("spliced", *suffix), ("recompute", suffix[1], len(req))]
    assert [(r.kind, r.start, r.end) for r in plan.runs] == want
    spliced = plan.copy_runs()[0]
    assert spliced.delta == delta
    assert np.array_equal(spliced.src_positions, np.arange(span[1], 600))
    assert np.array_equal(spliced.src_slots, base.slots[span[1] :])
    (out,) = plan.outcomes
    assert (out.status, out.reason, out.spliced_tokens) == ("applied", None, 600 - span[1])
    assert plan.approximate


def test_multiple_directives_have_one_delta_per_run() -> None:
    rng = np.random.default_rng(1)
    base = _base(rng, 1000)
    ds = [
        TokenDirective(100, 150, [], A),  # delete 50
        TokenDirective(300, 300, _rand(rng, 20), A),  # insert 20
        TokenDirective(500, 510, [], A),  # delete 10 (joins two kept runs: delta changes)
        TokenDirective(700, 800, _rand(rng, 100), A),  # same length
    ]
    req = np.concatenate([_edit(base, ds), _rand(rng, 10)])
    plan = build_plan(req, exact_len=100, exact_slots=base.slots[:100], base=base, directives=ds)
    _check(plan, req, 100, base)
    copies = [(r.start, r.end, r.delta) for r in plan.copy_runs()]
    assert copies == [(100, 250, -50), (270, 470, -30), (470, 660, -40), (760, 960, -40)]
    assert [o.spliced_tokens for o in plan.outcomes] == [150, 200, 190, 200]
    assert plan.spliced_tokens == 740 and all(o.status == "applied" for o in plan.outcomes)
    assert plan.recomputed_tokens == 20 + 100 + 10


def test_forget_recomputes_everything_after_its_start() -> None:
    rng = np.random.default_rng(2)
    base = _base(rng, 800)
    index = ContentIndex()
    index.add_sequence(base.tokens, base.slots)  # base content is findable by chunk
    ds = [TokenDirective(100, 120, [], A), TokenDirective(400, 450, _rand(rng, 5), F)]
    req = np.concatenate([_edit(base, ds), _rand(rng, 30)])
    plan = build_plan(
        req, exact_len=100, exact_slots=base.slots[:100], base=base, directives=ds, index=index
    )
    _check(plan, req, 100, base, donors={})
    assert [(r.kind, r.start, r.end) for r in plan.runs] == [
        ("exact", 0, 100),
        ("spliced", 100, 380),
        ("recompute", 380, len(req)),
    ]
    assert [(o.status, o.spliced_tokens) for o in plan.outcomes] == [
        ("applied", 280),
        ("applied", 0),
    ]
    # An exact match past the FORGET start is still exact: it equals a fresh prefill.
    plan2 = build_plan(
        req, exact_len=500, exact_slots=np.arange(500), base=base, directives=ds, index=index
    )
    assert [(r.kind, r.start, r.end) for r in plan2.runs] == [
        ("exact", 0, 500),
        ("recompute", 500, len(req)),
    ]


def test_forget_blocks_chunk_copies_from_forgotten_suffix_even_before_its_start() -> None:
    rng = np.random.default_rng(3)
    base = _base(rng, 2000)
    index = ContentIndex()
    index.add_sequence(base.tokens, base.slots)
    donors = _donors(base.tokens, base.slots)
    # The edit copies base[1200:1800] (which the FORGET drops) in front of the kept prefix.
    moved = TokenDirective(50, 50, base.tokens[1200:1800], A)
    forget = TokenDirective(1000, 2000, [], F)
    req = np.concatenate([_edit(base, [moved, forget]), _rand(rng, 40)])
    kw = dict(exact_len=50, exact_slots=base.slots[:50], base=base, index=index)
    plan = build_plan(req, directives=[moved, forget], **kw)  # type: ignore[arg-type]
    kinds = _check(plan, req, 50, base, donors=donors)
    assert kinds[650:1600] == ["spliced"] * 950 and set(kinds[1600:]) == {"recompute"}
    assert plan.chunk_tokens == 0  # the moved copy saw the forgotten content: never copied
    assert [(o.status, o.spliced_tokens) for o in plan.outcomes] == [
        ("applied", 950),
        ("applied", 0),
    ]
    # Without the FORGET the same moved content is chunk-reused from base[1200:1800].
    free = build_plan(req[:1600], directives=[moved], **kw)  # type: ignore[arg-type]
    _check(free, req[:1600], 50, base, donors=donors)
    assert free.chunk_tokens > 400


def test_ignored_forget_still_blocks_reuse() -> None:
    rng = np.random.default_rng(13)
    base = _base(rng, 2000)
    index = ContentIndex()
    index.add_sequence(base.tokens, base.slots)
    req = np.concatenate([base.tokens[:50], base.tokens[1200:1800], base.tokens[50:1000]])
    kw = dict(exact_len=50, exact_slots=base.slots[:50], index=index)
    plan = build_plan(req, base=base, directives=[TokenDirective(1000, 2000, [], F)], **kw)  # type: ignore[arg-type]
    assert plan.outcomes[0].status == "ignored"
    assert plan.outcomes[0].reason == "tokens differ at position 50"
    assert plan.exact_tokens == 50 and plan.recomputed_tokens == len(req) - 50
    assert build_plan(req, **kw).chunk_tokens > 400  # type: ignore[arg-type]


def test_mismatching_directive_is_ignored() -> None:
    rng = np.random.default_rng(4)
    base = _base(rng, 500)
    d = TokenDirective(100, 200, _rand(rng, 30), A)
    edited = _edit(base, [d])
    req = edited.copy()
    req[110] += 1  # the client's replacement is not what the prompt says
    plan = build_plan(req, exact_len=100, exact_slots=base.slots[:100], base=base, directives=[d])
    _check(plan, req, 100, base)
    (out,) = plan.outcomes
    assert out.status == "ignored" and out.reason == "tokens differ at position 110"
    assert plan.spliced_tokens == 0 and plan.recomputed_tokens == 330
    # A deletion whose next token disagrees has nothing verified either.
    dd = TokenDirective(100, 200, [], A)
    req2 = np.concatenate([base.tokens[:100], _rand(rng, 300)])
    plan2 = build_plan(
        req2, exact_len=100, exact_slots=base.slots[:100], base=base, directives=[dd]
    )
    assert plan2.outcomes[0].status == "ignored" and plan2.spliced_tokens == 0
    assert plan2.outcomes[0].reason == "tokens differ at position 100"


def test_splicing_stops_at_first_mismatch() -> None:
    rng = np.random.default_rng(5)
    base = _base(rng, 500)
    ds = [TokenDirective(100, 140, [], A), TokenDirective(300, 310, [], A)]
    req = _edit(base, ds)
    req[200] += 1
    req = np.concatenate([req, _rand(rng, 9)])
    plan = build_plan(req, exact_len=100, exact_slots=base.slots[:100], base=base, directives=ds)
    kinds = _check(plan, req, 100, base)
    assert kinds[100:200] == ["spliced"] * 100 and set(kinds[200:]) == {"recompute"}
    assert [(o.status, o.spliced_tokens) for o in plan.outcomes] == [
        ("applied", 100),
        ("ignored", 0),
    ]
    # A truncated request that ends inside the replacement.
    d = TokenDirective(100, 140, _rand(rng, 40), A)
    short = _edit(base, [d])[:120]
    plan2 = build_plan(
        short, exact_len=100, exact_slots=base.slots[:100], base=base, directives=[d]
    )
    assert (
        plan2.outcomes[0].reason
        == "request ends at position 120, inside the edited span ending at 140"
    )


def test_exact_match_covers_directive_and_prefix_gap_is_spliced() -> None:
    rng = np.random.default_rng(6)
    base = _base(rng, 400)
    d = TokenDirective(200, 220, [], A)
    req = np.concatenate([_edit(base, [d]), _rand(rng, 5)])
    # Retry: the radix tree already holds the edited sequence.
    plan = build_plan(req, exact_len=300, exact_slots=np.arange(300), base=base, directives=[d])
    _check(plan, req, 300, base)
    assert [(r.kind, r.start, r.end) for r in plan.runs][:2] == [
        ("exact", 0, 300),
        ("spliced", 300, 380),
    ]
    assert plan.outcomes[0].spliced_tokens == 80
    # Radix match shorter than the directive start: the gap is spliced with delta 0.
    plan = build_plan(req, exact_len=50, exact_slots=base.slots[:50], base=base, directives=[d])
    _check(plan, req, 50, base)
    assert [(r.kind, r.start, r.end, r.delta) for r in plan.copy_runs()] == [
        ("spliced", 50, 200, 0),
        ("spliced", 200, 380, -20),
    ]
    assert plan.outcomes[0].spliced_tokens == 180


def test_moved_content_is_found_by_chunk_index() -> None:
    rng = np.random.default_rng(7)
    sys_old, content, tail = _rand(rng, 300), _rand(rng, 4000), _rand(rng, 200)
    donor = np.concatenate([sys_old, content, tail])
    slots = rng.permutation(100_000)[: len(donor)] + 1
    index = ContentIndex()
    index.add_sequence(donor, slots, salt="t1")
    donors = _donors(donor, slots)
    req = np.concatenate([_rand(rng, 170), content, _rand(rng, 64)])
    plan = build_plan(req, exact_len=0, exact_slots=[], index=index, salt="t1")
    kinds = _check(plan, req, 0, donors=donors)
    assert {r.delta for r in plan.copy_runs()} == {170 - 300}
    recovered = kinds[170:4170].count("chunk") / 4000
    assert recovered >= 0.9, recovered
    assert index.stats.hits >= 4000 // 512 and index.stats.collisions_rejected == 0
    # Another tenant's salt never matches; neither does a disabled carve-out.
    other = build_plan(req, exact_len=0, exact_slots=[], index=index, salt="t2")
    assert other.chunk_tokens == 0
    off = build_plan(
        req, exact_len=0, exact_slots=[], index=index, salt="t1", min_reuse_position=len(req)
    )
    assert off.chunk_tokens == 0


def test_chunks_below_min_reuse_position_are_recomputed() -> None:
    rng = np.random.default_rng(8)
    seq = _rand(rng, 1500)
    slots = np.arange(1, 1501)
    index = ContentIndex()
    index.add_sequence(seq, slots)
    donors = _donors(seq, slots)
    first = chunk_spans(seq)[0]
    assert first.end > 32
    for min_reuse in (32, first.end, first.end + 1):
        plan = build_plan(
            seq, exact_len=0, exact_slots=[], index=index, min_reuse_position=min_reuse
        )
        kinds = _check(plan, seq, 0, donors=donors, min_reuse=min_reuse)
        assert kinds[: first.end] == ["recompute"] * first.end  # the first chunk starts at 0
        chunk_starts = [c.start for c in chunk_spans(seq)]
        reusable = [s for s in chunk_starts if s >= min_reuse]
        assert all(kinds[s] == "chunk" for s in reusable)
        assert plan.copy_runs()[0].start == reusable[0]
        assert plan.runs[-1] == plan.recompute_runs()[-1] and len(plan.runs[-1]) == 1


def test_partial_chunk_after_exact_prefix_and_collision() -> None:
    rng = np.random.default_rng(9)
    seq = _rand(rng, 1200)
    index = ContentIndex()
    index.add_sequence(seq, np.arange(1, 1201))
    donors = _donors(seq, np.arange(1, 1201))
    mid = next(c for c in chunk_spans(seq) if c.start > 300)
    cut = (mid.start + mid.end) // 2
    plan = build_plan(seq, exact_len=cut, exact_slots=np.arange(1, cut + 1), index=index)
    kinds = _check(plan, seq, cut, donors=donors)
    assert kinds[cut : mid.end] == ["chunk"] * (mid.end - cut)  # the chunk's tail is reused
    # An entry whose key matches but whose tokens differ is rejected.
    bad = ContentIndex()
    c = chunk_spans(seq)[3]
    bad.add(
        c.key, seq[c.start : c.end] + 1, np.arange(c.end - c.start) + 1, np.arange(c.end - c.start)
    )
    plan = build_plan(seq, exact_len=0, exact_slots=[], index=bad)
    assert plan.chunk_tokens == 0 and bad.stats.collisions_rejected == 1


def test_max_tokens_reusable_caps_copies() -> None:
    rng = np.random.default_rng(10)
    base = _base(rng, 700)
    d = TokenDirective(100, 150, [], A)
    req = np.concatenate([_edit(base, [d]), _rand(rng, 20)])
    plan = build_plan(
        req,
        exact_len=100,
        exact_slots=base.slots[:100],
        base=base,
        directives=[d],
        max_tokens_reusable=123,
    )
    _check(plan, req, 100, base)
    assert plan.spliced_tokens == 123 and plan.outcomes[0].spliced_tokens == 123
    assert plan.exact_tokens == 100


def test_last_token_recomputed_when_spliced() -> None:
    rng = np.random.default_rng(11)
    base = _base(rng, 300)
    d = TokenDirective(10, 20, [], A)
    req = _edit(base, [d])  # no new turn: the spliced suffix reaches the end
    plan = build_plan(req, exact_len=10, exact_slots=base.slots[:10], base=base, directives=[d])
    _check(plan, req, 10, base)
    assert [(r.kind, r.start, r.end) for r in plan.runs] == [
        ("exact", 0, 10),
        ("spliced", 10, 289),
        ("recompute", 289, 290),
    ]
    assert plan.outcomes[0].spliced_tokens == 279


def test_invalid_arguments() -> None:
    rng = np.random.default_rng(12)
    base = _base(rng, 100)
    req = base.tokens
    ok = dict(exact_len=0, exact_slots=[], base=base)
    cases = [
        ([TokenDirective(50, 60, [], A), TokenDirective(10, 20, [], A)], "unsorted"),
        ([TokenDirective(10, 30, [], A), TokenDirective(20, 40, [], A)], "overlaps"),
        ([TokenDirective(90, 101, [], A)], "exceeds"),
    ]
    for ds, msg in cases:
        with pytest.raises(ValueError, match=msg):
            build_plan(req, directives=ds, **ok)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base"):
        build_plan(req, exact_len=0, exact_slots=[], directives=[TokenDirective(1, 2, [], A)])
    with pytest.raises(ValueError, match="exact_len"):
        build_plan(req, exact_len=5, exact_slots=[1, 2])
    with pytest.raises(ValueError, match="no tokens"):
        build_plan([], exact_len=0, exact_slots=[])
    with pytest.raises(ValueError, match="start <= end"):
        TokenDirective(5, 4, [], A)
    with pytest.raises(ValueError):
        TokenDirective(1, 2, [], "keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal length"):
        CachedSequence([1, 2], [1])
    assert TokenDirective(1, 2, [3], "forget").mode is F  # type: ignore[arg-type]


def test_fuzz_invariants() -> None:
    """Random bases, directives, corruptions and indexes: every plan satisfies the invariants."""
    rng = np.random.default_rng(1234)
    params = ChunkParams(min_size=8, max_size=64, mask_bits=4)  # small chunks: more hits
    for it in range(150):
        n_base = int(rng.integers(1, 400))
        base = CachedSequence(rng.integers(0, 40, n_base), rng.permutation(5000)[:n_base] + 1)
        cuts = np.sort(rng.integers(0, n_base + 1, 2 * int(rng.integers(0, 4))))
        ds = [
            TokenDirective(
                int(a),
                int(b),
                rng.integers(0, 40, int(rng.integers(0, 30))),
                mode := (F if rng.random() < 0.2 else R if rng.random() < 0.3 else A),
                int(rng.integers(0, 50)) if mode is R and rng.random() < 0.7 else None,
            )
            for a, b in zip(cuts[::2], cuts[1::2], strict=True)
        ]
        req = np.concatenate([_edit(base, ds), rng.integers(0, 40, int(rng.integers(0, 60)))])
        if it % 4 == 0:  # no directives: base content moved around, found only by chunk
            pieces = np.array_split(base.tokens, int(rng.integers(1, 6)))
            req = np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])
            ds = []
        if len(req) == 0:
            continue
        if rng.random() < 0.3:
            req[rng.integers(0, len(req))] += 1
        if rng.random() < 0.2:
            req = req[: rng.integers(1, len(req) + 1)]
        lcp = 0
        while lcp < min(len(req), n_base) and req[lcp] == base.tokens[lcp]:
            lcp += 1
        exact = int(rng.integers(0, lcp + 1))
        index = ContentIndex()
        index.add_sequence(base.tokens, base.slots, params=params)
        donors = _donors(base.tokens, base.slots)
        plan = build_plan(
            req,
            exact_len=exact,
            exact_slots=base.slots[:exact],
            base=base,
            directives=ds,
            index=index,
            chunk_params=params,
            min_reuse_position=int(rng.integers(0, 40)),
            max_tokens_reusable=None if it % 3 else int(rng.integers(0, 200)),
        )
        _check(plan, req, exact, base, donors=donors, min_reuse=0)
        assert len(plan.outcomes) == len(ds)
        for o in plan.outcomes:
            assert (o.status == "ignored") == (o.reason is not None)
            assert o.spliced_tokens == 0 or o.status == "applied"
        assert sum(o.spliced_tokens for o in plan.outcomes) <= plan.spliced_tokens
        # REPAIR windows are recomputed tokens, and only REPAIR requests have them
        kinds = _per_token(plan, len(req))[0]
        assert all(kinds[i] == "recompute" for s, e in plan.windows for i in range(s, e))
        assert plan.repaired_tokens <= plan.recomputed_tokens
        assert not plan.windows or any(d.mode is R for d in ds)
        assert all(o.window_tokens == 0 for o, d in zip(plan.outcomes, ds, strict=True)
                   if d.mode is not R)  # fmt: skip
        forget = [j for j, d in enumerate(ds) if d.mode is F]
        if forget:
            f = ds[forget[0]]
            new_start = f.start + sum(d.shift for d in ds[: forget[0]])
            for r in plan.copy_runs():
                assert r.end <= new_start and r.src_positions.max() < f.start


# ---------------------------------------------------------------------- REPAIR
def _repair_case(window: int | None, rlen: int = 13) -> tuple[np.ndarray, CachedSequence, list]:
    rng = np.random.default_rng(11)
    base = _base(rng, 600)
    d = TokenDirective(200, 260, _rand(rng, rlen), R, window)
    return np.concatenate([_edit(base, [d]), _rand(rng, 50)]), base, [d]


@pytest.mark.parametrize("window", [0, 1, 64, 300])
def test_repair_window_extends_the_replacement(window: int) -> None:
    req, base, ds = _repair_case(window)
    plan = build_plan(req, exact_len=200, exact_slots=base.slots[:200], base=base, directives=ds)
    _check(plan, req, 200, base)
    end = 213 + window  # the replacement [200, 213), then the window
    want = [("exact", 0, 200), ("recompute", 200, end)]
    if window < 340:
        want.append(("spliced", end, 553))
    want.append(("recompute", 553, len(req)))
    if window >= 340:  # the window covers the whole kept suffix: nothing is approximate
        want[1:] = [("recompute", 200, len(req))]
    assert [(r.kind, r.start, r.end) for r in plan.runs] == want
    assert plan.windows == (((213, end),) if window else ())
    assert plan.repaired_tokens == min(window, 340)
    (out,) = plan.outcomes
    assert (out.status, out.spliced_tokens, out.window_tokens) == (
        "applied", 340 - min(window, 340), min(window, 340))  # fmt: skip
    # the spliced rest keeps AMORTIZE's donors and delta
    amortize = build_plan(req, exact_len=200, exact_slots=base.slots[:200], base=base,
                          directives=[TokenDirective(200, 260, ds[0].replacement, A)])  # fmt: skip
    assert amortize.windows == () and amortize.repaired_tokens == 0
    for run in plan.copy_runs():
        (twin,) = [r for r in amortize.copy_runs() if r.start <= run.start < r.end]
        assert run.delta == twin.delta == -47
        assert np.array_equal(run.src_slots, twin.src_slots[run.start - twin.start :][: len(run)])
    assert plan.approximate == (window < 340)


def test_repair_default_window_is_the_planners() -> None:
    req, base, ds = _repair_case(None)
    kw = dict(exact_len=200, exact_slots=base.slots[:200], base=base, directives=ds)
    assert build_plan(req, **kw).repaired_tokens == 128  # type: ignore[arg-type]
    # a fraction of the suffix (the edited sequence's 340 tokens after the replacement), capped
    frac = build_plan(req, repair=RepairWindow(fraction=0.1), **kw)  # type: ignore[arg-type]
    assert frac.windows == ((213, 213 + 34),)
    capped = build_plan(req, repair=RepairWindow(fraction=0.5, cap=20), **kw)  # type: ignore[arg-type]
    assert capped.windows == ((213, 233),)
    # an explicit window wins over the default
    req2, base2, ds2 = _repair_case(5)
    plan = build_plan(req2, exact_len=200, exact_slots=base2.slots[:200], base=base2,
                      directives=ds2, repair=RepairWindow(tokens=100))  # fmt: skip
    assert plan.windows == ((213, 218),)


def test_repair_window_inside_the_exact_match_counts_nothing() -> None:
    req, base, ds = _repair_case(64)
    edited = _edit(base, ds)
    slots = np.arange(1, 251)  # e.g. a window computed exactly by an earlier request
    plan = build_plan(req, exact_len=250, exact_slots=slots, base=base, directives=ds)
    assert edited[:250].tolist() == req[:250].tolist()
    assert plan.windows == ((250, 277),) and plan.outcomes[0].window_tokens == 27


def test_ignored_repair_directive_has_no_window() -> None:
    req, base, ds = _repair_case(64)
    req = req.copy()
    req[205] += 1  # the replacement is not the request's
    plan = build_plan(req, exact_len=200, exact_slots=base.slots[:200], base=base, directives=ds)
    (out,) = plan.outcomes
    assert out.status == "ignored" and out.window_tokens == 0 and plan.windows == ()


def test_repair_windows_at_moved_content_runs() -> None:
    """Moved content (chunk runs) gets the window at its start in a REPAIR request only."""
    rng = np.random.default_rng(12)
    base = _base(rng, 900)
    block = base.tokens[300:700]
    # delete [300, 700) in place and re-insert the block after the kept tail
    ds_a = [TokenDirective(300, 700, [], A), TokenDirective(900, 900, block, A)]
    req = np.concatenate([_edit(base, ds_a), _rand(rng, 20)])
    moved = [(500, 300, 400)]
    kw = dict(exact_len=300, exact_slots=base.slots[:300], base=base, moved=moved)
    donors = _donors(base.tokens, base.slots)
    amortize = build_plan(req, directives=ds_a, **kw)  # type: ignore[arg-type]
    kinds = _check(amortize, req, 300, base, donors=donors)
    assert kinds[500:900] == ["chunk"] * 400 and amortize.windows == ()
    ds_r = [TokenDirective(300, 700, [], R, 16), TokenDirective(900, 900, block, R, 16)]
    plan = build_plan(req, directives=ds_r, **kw)  # type: ignore[arg-type]
    kinds = _check(plan, req, 300, base, donors=donors)
    # the window after the deletion, and the first 16 tokens of the moved block
    assert plan.windows == ((300, 316), (500, 516))
    assert kinds[300:316] == ["recompute"] * 16 and kinds[316:500] == ["spliced"] * 184
    assert kinds[500:516] == ["recompute"] * 16 and kinds[516:900] == ["chunk"] * 384
    # the second directive's own window is the new turn (recomputed anyway); the moved block's
    # window is the request's, counted in repaired_tokens
    assert [o.window_tokens for o in plan.outcomes] == [16, 0] and plan.repaired_tokens == 32


def test_repair_windows_come_before_the_copy_cap() -> None:
    req, base, ds = _repair_case(64)
    plan = build_plan(req, exact_len=200, exact_slots=base.slots[:200], base=base,
                      directives=ds, max_tokens_reusable=100)  # fmt: skip
    kinds = _check(plan, req, 200, base)
    assert plan.windows == ((213, 277),)
    assert kinds[277:377] == ["spliced"] * 100 and kinds[377] == "recompute"


def test_repair_window_validation() -> None:
    with pytest.raises(ValueError, match="only for mode 'repair'"):
        TokenDirective(0, 1, [], A, 5)
    with pytest.raises(ValueError, match="integer"):
        TokenDirective(0, 1, [], R, -1)
    for bad in (dict(), dict(tokens=4, fraction=0.1), dict(tokens=-1), dict(fraction=0.0),
                dict(fraction=1.5), dict(fraction=0.1, cap=-2)):  # fmt: skip
        with pytest.raises(ValueError):
            RepairWindow(**bad)  # type: ignore[arg-type]
    assert RepairWindow(tokens=64, cap=10).size(1000) == 10
    assert RepairWindow(fraction=1.0).size(37) == 37
