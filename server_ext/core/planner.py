"""Directive planner: decide, for one request, where every prompt token's KV comes from.

Engine adapters only move bytes according to the ``Plan``; every decision is made here.

A plan is a tuple of ``Run`` s that are sorted, contiguous and cover ``[0, len(request))``
exactly. Kinds:

- ``exact``: ``request[:exact_len]``, the exact prefix the adapter's radix tree matched; KV is
  used in place from ``exact_slots`` (no copy, delta 0).
- ``spliced``: a kept token of the session's cached sequence (``base``) that an AMORTIZE edit
  moved; its KV is copied from ``src_slots`` and its rotary part rotated by
  ``delta = arange(start, end) - src_positions``. Approximate: it saw the old context.
- ``chunk``: content found in the ``ContentIndex`` (moved content, possibly from another
  sequence); copied and rotated like ``spliced``. Approximate.
- ``recompute``: prefilled fresh.

Every copy run (``spliced``/``chunk``) has one delta for all its tokens, so a kernel rotates a
run by one angle. Runs of one kind with equal deltas are merged.

Directives (``TokenDirective``: ``[start, end)`` over ``base.tokens``, replacement ``R``, mode)
must be sorted and non-overlapping and lie inside ``base`` (ValueError otherwise). Applying them
to ``base.tokens`` gives the edited sequence ``E``; every kept base token gets a new position.

- The prompt is the source of truth. ``p`` is the first index where ``E`` and ``request``
  differ (or ``min(len(E), len(request))``). Base tokens are spliced only at positions
  ``exact_len <= i < p``; everything of ``E`` from ``p`` on is dropped. A directive is
  ``applied`` when the request agrees with ``E`` through its replacement and at least one token
  after it (or up to the end of ``E``/the request); otherwise it is ``ignored`` with a reason.
  Its ``spliced_tokens`` counts the spliced tokens of the kept segment that follows it.
- AMORTIZE: ``R`` is recomputed (or chunk-reused); the kept suffix is spliced. Kept tokens with
  delta 0 (before the first directive but past the exact match, or after a same-length
  replacement) are still ``spliced``: their KV saw the old span.
- REPAIR: AMORTIZE plus a recompute window: the first ``k`` positions after the replacement
  (``directive.window``, else ``repair.size(suffix)`` with ``suffix`` the edited sequence's
  tokens after the replacement) are recomputed instead of spliced or chunk-reused, so the
  replacement is in effect extended by the window. With an exact prefix the window's KV is
  exact (a fresh prefill of prefix + replacement + window); the rest of the kept suffix is
  spliced. A request with any applied REPAIR directive also recomputes the first tokens of
  every chunk run (moved content; window: the largest explicit ``window`` of its REPAIR
  directives, else ``repair.size(run length)``). ``Plan.windows`` lists the recomputed
  windows, ``Plan.repaired_tokens`` counts them (tokens that would otherwise have been copied).
- FORGET: from the first FORGET directive's new start on, nothing is reused except the exact
  match (exact KV equals a fresh prefill): no splice, no chunk reuse. As a guard against the
  edited-away content leaking through a chunk copy, chunk runs before that point never copy
  from ``base.slots[start:]`` either. An ``ignored`` FORGET still takes effect, at
  ``min(new start, p)``: a client bug may cost speed, never a leak.
- Tokens past ``len(E)`` (the new turn) are recomputed or chunk-reused.

Moved content (``moved`` given, with ``base``): ``(request_pos, base_pos, length)`` triples
say that ``request[request_pos:+length]`` equals ``base.tokens[base_pos:+length]`` (content the
edit moved, e.g. a message placed later; the adapter finds them by diffing). Tokens still to
be recomputed there become ``chunk`` runs copying from ``base.slots`` (verified token by token
here, the same FORGET barrier and guard as chunk reuse). A whole moved span is copied with one
delta, with no recompute at CDC chunk edges.

Content reuse (``index`` given): the whole request is chunked (CDC, so boundaries do not depend
on where the exact match ends), and each chunk that starts at ``>= min_reuse_position`` (the
attention-sink carve-out) and still has tokens to recompute is looked up; a hit (equal token
ids) turns those tokens into a ``chunk`` run copying from the entry's slots and positions. The
index must have been filled with the same ``salt``, ``chunk_params`` and ``chunk_mode``
(``ContentIndex.add_sequence``), else nothing matches.

``max_tokens_reusable`` caps the copied (spliced + chunk) tokens, taken in position order (after
the REPAIR windows); the rest is recomputed. Finally the last request token is always recomputed: the engine needs its
logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

import numpy as np

# the SDK's Mode: directives mean the same thing on the wire and in the planner
from leyline.directives import Mode, validate_window
from leyline.protocol import DirectiveOutcome, Status
from leyline.server.core.chunking import (
    DEFAULT_PARAMS,
    ChunkParams,
    cdc_boundaries,
    fixed_boundaries,
    span_keys,
    token_array,
)
from leyline.server.core.index import ContentIndex

__all__ = [
    "DEFAULT_REPAIR",
    "CachedSequence",
    "DirectiveOutcome",
    "Mode",
    "Plan",
    "RepairWindow",
    "Run",
    "RunKind",
    "TokenDirective",
    "build_plan",
]

RunKind = Literal["exact", "spliced", "chunk", "recompute"]
_KINDS: tuple[RunKind, ...] = ("exact", "spliced", "chunk", "recompute")
_EXACT, _SPLICED, _CHUNK, _RECOMPUTE = 0, 1, 2, 3


def _ids(x: np.ndarray | Sequence[int], what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D integer array, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True, slots=True)
class RepairWindow:
    """The server's default REPAIR window ``k`` for a suffix of ``n`` tokens: ``tokens``, or
    ``ceil(fraction * n)``; at most ``cap`` either way, and never more than ``n``.

    >>> RepairWindow(fraction=0.05, cap=256).size(2000), RepairWindow(tokens=64).size(40)
    (100, 40)
    """

    tokens: int | None = None
    fraction: float | None = None
    cap: int | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.fraction is None):
            raise ValueError("a repair window is given in tokens or as a fraction, not both")
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens < 0):
            raise ValueError(f"repair window tokens must be >= 0, got {self.tokens}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"repair window fraction must be in (0, 1], got {self.fraction}")
        if self.cap is not None and self.cap < 0:
            raise ValueError(f"repair window cap must be >= 0, got {self.cap}")

    def size(self, n: int) -> int:
        k = self.tokens if self.tokens is not None else math.ceil((self.fraction or 0.0) * n)
        if self.cap is not None:
            k = min(k, self.cap)
        return max(0, min(k, n))


#: The embedded engine's default window (docs/repair.md: the measured frontier behind it).
DEFAULT_REPAIR = RepairWindow(tokens=128)


@dataclass(frozen=True, slots=True, eq=False)
class TokenDirective:
    """Replace ``[start, end)`` of the base sequence with ``replacement`` (empty = delete);
    ``window``: a REPAIR directive's recompute window (``None``: the planner's default)."""

    start: int
    end: int
    replacement: np.ndarray
    mode: Mode = Mode.AMORTIZE
    window: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"directive span must satisfy 0 <= start <= end: {self.span}")
        object.__setattr__(self, "replacement", _ids(self.replacement, "replacement"))
        object.__setattr__(self, "mode", Mode(self.mode))
        validate_window(self.window, self.mode)

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def shift(self) -> int:
        """Δ = len(replacement) - (end - start): how far the suffix moves."""
        return int(self.replacement.shape[0]) - (self.end - self.start)


@dataclass(frozen=True, slots=True, eq=False)
class CachedSequence:
    """The session's last served sequence: token i sits at position i with KV in ``slots[i]``."""

    tokens: np.ndarray
    slots: np.ndarray

    def __post_init__(self) -> None:
        tok, sl = _ids(self.tokens, "tokens"), _ids(self.slots, "slots")
        if tok.shape != sl.shape:
            raise ValueError(f"tokens {tok.shape} and slots {sl.shape} must have equal length")
        object.__setattr__(self, "tokens", tok)
        object.__setattr__(self, "slots", sl)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """Request positions ``[start, end)`` served one way; copy sources for non-recompute runs."""

    kind: RunKind
    start: int
    end: int
    src_slots: np.ndarray | None = None
    src_positions: np.ndarray | None = None

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def delta(self) -> int:
        """Position shift ``new - old`` (one value per run; 0 for exact and recompute)."""
        if self.src_positions is None or self.kind == "exact":
            return 0
        return self.start - int(self.src_positions[0])


@dataclass(frozen=True, slots=True)
class Plan:
    """The runs covering the request, the fate of each directive, and the REPAIR windows
    (``[start, end)`` spans of tokens recomputed where they could have been copied)."""

    runs: tuple[Run, ...]
    outcomes: tuple[DirectiveOutcome, ...]
    windows: tuple[tuple[int, int], ...] = field(default=())

    def _count(self, kind: RunKind) -> int:
        return sum(len(r) for r in self.runs if r.kind == kind)

    @property
    def num_tokens(self) -> int:
        return self.runs[-1].end if self.runs else 0

    @property
    def exact_tokens(self) -> int:
        return self._count("exact")

    @property
    def spliced_tokens(self) -> int:
        return self._count("spliced")

    @property
    def chunk_tokens(self) -> int:
        return self._count("chunk")

    @property
    def recomputed_tokens(self) -> int:
        return self._count("recompute")

    @property
    def repaired_tokens(self) -> int:
        """Recomputed tokens of REPAIR windows (part of ``recomputed_tokens``)."""
        return sum(e - s for s, e in self.windows)

    @property
    def approximate(self) -> bool:
        """True if any KV is copied from another context (spliced or chunk-reused)."""
        return any(r.kind in ("spliced", "chunk") for r in self.runs)

    def recompute_runs(self) -> tuple[Run, ...]:
        return tuple(r for r in self.runs if r.kind == "recompute")

    def copy_runs(self) -> tuple[Run, ...]:
        """Spliced and chunk runs: the KV the adapter copies (and rotates by ``run.delta``)."""
        return tuple(r for r in self.runs if r.kind in ("spliced", "chunk"))


@dataclass(frozen=True, slots=True, eq=False)
class _Edit:
    tokens: np.ndarray  # E
    old: np.ndarray  # base position of each E token, -1 for replacement tokens
    spans: tuple[tuple[int, int], ...]  # new [start, end) of each replacement in E


def _apply(base: CachedSequence, directives: Sequence[TokenDirective]) -> _Edit:
    toks: list[np.ndarray] = []
    old: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    prev, pos = 0, 0

    def keep(lo: int, hi: int) -> None:
        toks.append(base.tokens[lo:hi])
        old.append(np.arange(lo, hi, dtype=np.int64))

    for j, d in enumerate(directives):
        if d.end > len(base):
            raise ValueError(f"directive {j} span {d.span} exceeds the base ({len(base)} tokens)")
        if d.start < prev:
            raise ValueError(f"directive {j} span {d.span} is unsorted or overlaps the previous")
        keep(prev, d.start)
        pos += d.start - prev
        r = d.replacement
        toks.append(r)
        old.append(np.full(r.shape[0], -1, dtype=np.int64))
        spans.append((pos, pos + r.shape[0]))
        pos += r.shape[0]
        prev = d.end
    keep(prev, len(base))
    return _Edit(np.concatenate(toks), np.concatenate(old), tuple(spans))


def build_plan(
    request: np.ndarray | Sequence[int],
    *,
    exact_len: int,
    exact_slots: np.ndarray | Sequence[int],
    base: CachedSequence | None = None,
    directives: Sequence[TokenDirective] = (),
    index: ContentIndex | None = None,
    salt: str = "",
    chunk_params: ChunkParams = DEFAULT_PARAMS,
    chunk_mode: Literal["cdc", "fixed"] = "cdc",
    min_reuse_position: int = 32,
    max_tokens_reusable: int | None = None,
    moved: Sequence[tuple[int, int, int]] = (),
    repair: RepairWindow = DEFAULT_REPAIR,
) -> Plan:
    """Plan one request (semantics in the module docstring)."""
    req = _ids(request, "request")
    n = req.shape[0]
    ex_slots = _ids(exact_slots, "exact_slots")
    if n == 0:
        raise ValueError("the request has no tokens")
    if not 0 <= exact_len <= n or ex_slots.shape != (exact_len,):
        raise ValueError(
            f"need 0 <= exact_len <= {n} and len(exact_slots) == exact_len, "
            f"got {exact_len} and {ex_slots.shape[0]}"
        )
    if min_reuse_position < 0 or (max_tokens_reusable is not None and max_tokens_reusable < 0):
        raise ValueError("min_reuse_position and max_tokens_reusable must be >= 0")
    if directives and base is None:
        raise ValueError("directives need the cached base sequence they refer to")

    kind = np.full(n, _RECOMPUTE, dtype=np.int8)
    src_slot = np.full(n, -1, dtype=np.int64)
    src_pos = np.full(n, -1, dtype=np.int64)
    kind[:exact_len] = _EXACT
    src_slot[:exact_len] = ex_slots
    src_pos[:exact_len] = np.arange(exact_len)

    barrier = n  # no reuse beyond the exact match from here on (FORGET)
    forbidden: np.ndarray | None = None
    edit: _Edit | None = None
    p = 0
    if base is not None:
        edit = _apply(base, directives)
        lim = min(edit.tokens.shape[0], n)
        diff = np.flatnonzero(edit.tokens[:lim] != req[:lim])
        p = int(diff[0]) if diff.size else lim
        for j, d in enumerate(directives):
            if d.mode is Mode.FORGET:
                barrier = min(edit.spans[j][0], p)
                forbidden = np.unique(base.slots[d.start :])  # sorted, for searchsorted
                break
        hi = min(p, barrier)
        if hi > exact_len:
            idx = np.flatnonzero(edit.old[exact_len:hi] >= 0) + exact_len
            kind[idx] = _SPLICED
            src_pos[idx] = edit.old[idx]
            src_slot[idx] = base.slots[edit.old[idx]]

    if moved and base is not None:
        _apply_moved(req, kind, src_slot, src_pos, base, moved, barrier, forbidden,
                     min_reuse_position)  # fmt: skip

    if index is not None and len(index) and barrier > min_reuse_position:
        eligible = kind == _RECOMPUTE
        eligible[:min_reuse_position] = False
        eligible[barrier:] = False
        at, slots, pos = _chunk_hits(
            req, eligible, index, salt, chunk_params, chunk_mode, min_reuse_position, forbidden
        )
        kind[at], src_slot[at], src_pos[at] = _CHUNK, slots, pos

    repaired = np.zeros(n, dtype=bool)
    if edit is not None and any(d.mode is Mode.REPAIR for d in directives):
        _repair(kind, src_pos, repaired, directives, edit, p, exact_len, repair)

    if max_tokens_reusable is not None:
        copied = (kind == _SPLICED) | (kind == _CHUNK)
        kind[copied & (np.cumsum(copied) > max_tokens_reusable)] = _RECOMPUTE
    if kind[n - 1] != _RECOMPUTE:
        repaired[n - 1] = False  # recomputed anyway, not for a window
    kind[n - 1] = _RECOMPUTE  # the engine needs the last token's logits

    runs = _runs(kind, src_slot, src_pos)
    _assert_cover(runs, n)
    outcomes = (
        _outcomes(directives, edit, kind, repaired, p, n, exact_len, repair)
        if edit is not None
        else ()
    )
    return Plan(runs, outcomes, _spans(repaired))


def _verified(new_end: int, p: int, lim: int) -> bool:
    """A directive is applied when the request equals the edited sequence through its
    replacement and one token past it (or up to the end of either)."""
    return p > new_end or p == new_end == lim


def _window_span(
    d: TokenDirective, new_end: int, edit: _Edit, n: int, repair: RepairWindow
) -> tuple[int, int]:
    """Request positions of a REPAIR directive's window: ``k`` tokens after its replacement,
    ``k`` its own ``window`` or the default for the edited sequence's tokens after it."""
    suffix = edit.tokens.shape[0] - new_end
    k = min(d.window, suffix) if d.window is not None else repair.size(suffix)
    return new_end, min(new_end + k, n)


def _repair(
    kind: np.ndarray,
    src_pos: np.ndarray,
    repaired: np.ndarray,
    directives: Sequence[TokenDirective],
    edit: _Edit,
    p: int,
    exact_len: int,
    repair: RepairWindow,
) -> None:
    """Recompute the REPAIR windows: after each applied REPAIR directive's replacement, and at
    the start of every chunk run (moved content) of a request that has one."""
    n = kind.shape[0]
    lim = min(edit.tokens.shape[0], n)
    copied = (kind == _SPLICED) | (kind == _CHUNK)
    asked, explicit = False, []
    for j, d in enumerate(directives):
        if d.mode is not Mode.REPAIR or not _verified(edit.spans[j][1], p, lim):
            continue
        asked = True
        if d.window is not None:
            explicit.append(d.window)
        lo, hi = _window_span(d, edit.spans[j][1], edit, n, repair)
        lo = max(lo, exact_len)
        repaired[lo:hi] |= copied[lo:hi]
    if asked:
        # chunk runs: a run starts where the donor context changes (no chunk token before it,
        # or one with another delta); found before the windows change ``kind``
        is_chunk = kind == _CHUNK
        delta = np.arange(n) - src_pos
        same = np.concatenate(([False], is_chunk[:-1] & (delta[1:] == delta[:-1])))
        first = is_chunk & ~same
        stops = np.flatnonzero(~is_chunk | first)
        for s in np.flatnonzero(first).tolist():
            at = int(np.searchsorted(stops, s, side="right"))
            e = int(stops[at]) if at < stops.shape[0] else n
            k = min(max(explicit), e - s) if explicit else repair.size(e - s)
            repaired[s : s + k] = True
    kind[repaired] = _RECOMPUTE


def _spans(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``[start, end)`` spans of the True runs of ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return tuple((int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True))


def _allowed(slots: np.ndarray, forbidden: np.ndarray | None) -> np.ndarray | bool:
    """Mask of ``slots`` outside the sorted ``forbidden`` slots (FORGET's edited-away KV)."""
    if forbidden is None or not forbidden.size:
        return True
    at = np.minimum(np.searchsorted(forbidden, slots), forbidden.size - 1)
    allowed: np.ndarray = forbidden[at] != slots  # numpy types array comparisons as Any
    return allowed


def _apply_moved(
    req: np.ndarray,
    kind: np.ndarray,
    src_slot: np.ndarray,
    src_pos: np.ndarray,
    base: CachedSequence,
    moved: Sequence[tuple[int, int, int]],
    barrier: int,
    forbidden: np.ndarray | None,
    lo: int,
) -> None:
    """Turn recomputed tokens of verified moved spans into chunk copies from ``base``."""
    n = req.shape[0]
    for r_pos, b_pos, length in moved:
        if length <= 0 or r_pos < 0 or b_pos < 0:
            raise ValueError(f"moved span {(r_pos, b_pos, length)} must be non-negative")
        r_end = min(r_pos + length, n, barrier)
        b_end = min(b_pos + (r_end - r_pos), len(base))
        r_end = r_pos + max(b_end - b_pos, 0)
        if r_end <= max(r_pos, lo):
            continue
        at = np.arange(r_pos, r_end)
        src = np.arange(b_pos, b_end)
        ok = (kind[at] == _RECOMPUTE) & (req[at] == base.tokens[src]) & (at >= lo)
        ok &= _allowed(base.slots[src], forbidden)
        at, src = at[ok], src[ok]
        kind[at], src_slot[at], src_pos[at] = _CHUNK, base.slots[src], src


def _chunk_hits(
    req: np.ndarray,
    eligible: np.ndarray,
    index: ContentIndex,
    salt: str,
    params: ChunkParams,
    mode: Literal["cdc", "fixed"],
    lo: int,
    forbidden: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(request positions, donor slots, donor positions) of eligible tokens found by chunk."""
    t = token_array(req)
    n = t.shape[0]
    ends = cdc_boundaries(t, params) if mode == "cdc" else fixed_boundaries(n, params.fixed_size)
    starts = np.concatenate(([0], ends[:-1]))
    csum = np.concatenate(([0], np.cumsum(eligible)))
    # The attention-sink carve-out is on the chunk start: a chunk straddling ``lo`` is skipped.
    sel = np.flatnonzero((starts >= lo) & (csum[ends] > csum[starts]))
    hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    keys = span_keys(t, starts[sel], ends[sel], salt)
    for j, key in zip(sel.tolist(), keys.tolist(), strict=True):
        s, e = int(starts[j]), int(ends[j])
        entry = index.lookup(key, t[s:e])
        if entry is None:
            continue
        use = eligible[s:e] & _allowed(entry.slots, forbidden)
        off = np.flatnonzero(use)
        hits.append((s + off, entry.slots[off], entry.positions[off]))
    if not hits:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    at, slots, pos = (np.concatenate(parts) for parts in zip(*hits, strict=True))
    return at, slots, pos


def _runs(kind: np.ndarray, src_slot: np.ndarray, src_pos: np.ndarray) -> tuple[Run, ...]:
    """Run-length encode per-token decisions into runs of one kind and one delta."""
    n = kind.shape[0]
    delta = np.where(kind == _RECOMPUTE, 0, np.arange(n) - src_pos)
    change = np.flatnonzero((kind[1:] != kind[:-1]) | (delta[1:] != delta[:-1])) + 1
    bounds = [0, *change.tolist(), n]
    runs: list[Run] = []
    for s, e in pairwise(bounds):
        k = _KINDS[int(kind[s])]
        if k == "recompute":
            runs.append(Run(k, s, e))
        else:
            runs.append(Run(k, s, e, src_slot[s:e].copy(), src_pos[s:e].copy()))
    return tuple(runs)


def _assert_cover(runs: tuple[Run, ...], n: int) -> None:
    assert runs and runs[0].start == 0 and runs[-1].end == n, "runs must cover the request"
    for a, b in pairwise(runs):
        assert a.end == b.start and a.start < a.end, "runs must be sorted and contiguous"
    for r in runs:
        if r.kind != "recompute":
            assert r.src_slots is not None and r.src_positions is not None
            assert r.src_slots.shape == r.src_positions.shape == (len(r),)
            assert np.all(np.arange(r.start, r.end) - r.src_positions == r.delta)
            assert np.all(r.src_slots >= 0)
    assert runs[-1].kind == "recompute", "the last token must be recomputed"


def _outcomes(
    directives: Sequence[TokenDirective],
    edit: _Edit,
    kind: np.ndarray,
    repaired: np.ndarray,
    p: int,
    n: int,
    exact_len: int,
    repair: RepairWindow,
) -> tuple[DirectiveOutcome, ...]:
    lim = min(edit.tokens.shape[0], n)
    # Spliced tokens per directive: those in the kept segment after its replacement.
    csum = np.concatenate(([0], np.cumsum(kind[:lim] == _SPLICED)))
    fixed = np.concatenate(([0], np.cumsum(repaired)))
    seg_ends = [start for start, _ in edit.spans[1:]] + [edit.tokens.shape[0]]
    out: list[DirectiveOutcome] = []
    for j, (_, new_end) in enumerate(edit.spans):
        if _verified(new_end, p, lim):
            kept_end = min(seg_ends[j], lim)
            if exact_len >= kept_end:  # e.g. a retry: the edited sequence is already cached
                why = "the edit and the tokens after it were already a cached-prefix hit"
                out.append(DirectiveOutcome(j, Status.NOT_NEEDED, why, 0))
                continue
            d = directives[j]
            seg = csum[kept_end] - csum[min(new_end, lim)]
            count = int(seg) if d.mode is not Mode.FORGET else 0
            window = 0
            if d.mode is Mode.REPAIR:
                lo, hi = _window_span(d, new_end, edit, n, repair)
                window = int(fixed[hi] - fixed[lo])
            out.append(DirectiveOutcome(j, Status.APPLIED, None, count, window))
        elif p < lim:
            out.append(DirectiveOutcome(j, Status.IGNORED, f"tokens differ at position {p}", 0))
        else:
            reason = f"request ends at position {n}, inside the edited span ending at {new_end}"
            out.append(DirectiveOutcome(j, Status.IGNORED, reason, 0))
    return tuple(out)
