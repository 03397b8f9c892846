"""Find a request's edits by diffing token sequences (the server-side diff).

In SGLang the request arrives already tokenized with SGLang's own chat template, so the plugin
cannot tokenize segment by segment; and a server-diff payload (docs/protocol.md) carries no
segments at all (both servers). Either way the session's previous token sequence (the base) is
aligned with the request's tokens: every edit region inside the base *prompt* is one edit;
regions closer than ``merge_gap`` tokens merge (a truncation that keeps a head shares tokens
with the original). The region at the prompt's end (the base's generation prompt and output
against the history the client rendered) is the turn boundary, not a client edit. Edits pair
with the client's directives in order when the counts agree; when they do not, every edit gets
the strictest of the directives' modes (FORGET, then REPAIR, then AMORTIZE). The prompt stays the source of
truth: each span is read off the two token sequences, so applying the edits to the base always
yields the request's tokens.

The diff is vectorised (numpy, no per-token Python loop; 16K tokens in well under a
millisecond of Python): k-grams (``k = merge_gap`` clamped to [2, 32]) that occur exactly once
in both sequences anchor matching blocks (patience-diff style); consecutive anchors on one
diagonal form a run, the heaviest chain of runs increasing in both sequences is kept, and each
kept block is extended token-exactly into its neighbouring gaps. Equal stretches shorter than
``k`` are never anchored, which changes nothing after merging (shorter gaps merge anyway).
Content repeated within a sequence has no unique k-gram; an edit inside a repeated stretch
that no unique anchor frames is reported as one larger edit (less reuse, never wrong KV).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "Alignment",
    "TokenEdit",
    "align_edits",
    "common_prefix_len",
    "edit_regions",
    "moved_spans",
]

_STRICTNESS = ("amortize", "repair", "forget")  # merged edits take the strictest mode
_MAX_RUNS = 256  # the chain search is O(runs^2) in Python: beyond this, the longest runs
_HASH_SEED = 0x5EED_1E71


@dataclass(frozen=True, slots=True)
class TokenEdit:
    """Base tokens ``[start, end)`` became request tokens ``[new_start, new_end)``."""

    start: int
    end: int
    new_start: int
    new_end: int
    mode: str


def _ids(x: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.int64, copy=False)
    if isinstance(x, array) and x.typecode == "q":
        return np.frombuffer(x, dtype=np.int64)  # array("q"): no per-token boxing
    return np.asarray(x, dtype=np.int64)


def _kgram_hashes(x: np.ndarray, k: int) -> np.ndarray:
    # NOTE: uint64 arithmetic wraps (a multiplicative hash); collisions are caught later.
    mult = np.random.default_rng(_HASH_SEED).integers(1, 2**63, size=k, dtype=np.uint64) | 1
    w = sliding_window_view(np.ascontiguousarray(x).view(np.uint64), k)
    h = w[:, 0] * mult[0]
    for c in range(1, k):  # k column passes (k <= 32), each vectorised over all windows
        h += w[:, c] * mult[c]
    out: np.ndarray = h
    return out


def _anchor_runs(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Runs ``(i, j, size)`` of tokens anchored by k-grams unique in both, sorted by j.

    Uniqueness is counted in a hash table of ~4x the k-gram count (bincount, no sort); a bucket
    shared by two k-grams only drops anchors (conservative). Runs are verified token-exactly
    once chained (`_matching_blocks`).
    """
    ha, hb = _kgram_hashes(a, k), _kgram_hashes(b, k)
    bits = max(10, int(4 * max(len(ha), len(hb))).bit_length())
    ba = (ha >> np.uint64(64 - bits)).astype(np.intp)
    bb = (hb >> np.uint64(64 - bits)).astype(np.intp)
    ca = np.bincount(ba, minlength=1 << bits)
    cb = np.bincount(bb, minlength=1 << bits)
    pos = np.zeros(1 << bits, np.int64)
    pos[ba] = np.arange(len(ba))
    j = np.flatnonzero((cb[bb] == 1) & (ca[bb] == 1))
    i = pos[bb[j]]
    same = ha[i] == hb[j]  # the full 64-bit hashes agree, not only the bucket
    i, j = i[same], j[same]
    if not len(i):
        return np.zeros((0, 3), np.int64)
    # One run per stretch of one diagonal whose anchor windows overlap or abut (gaps left by
    # dropped anchors are then covered by the neighbouring windows).
    dj = np.diff(j)
    cut = np.flatnonzero((np.diff(j - i) != 0) | (dj > k)) + 1
    starts = np.concatenate([[0], cut])
    last = np.concatenate([cut, [len(i)]]) - 1
    return np.stack([i[starts], j[starts], j[last] - j[starts] + k], axis=1)


def _chain(runs: np.ndarray) -> list[tuple[int, int, int]]:
    """Heaviest chain of runs increasing in both sequences (runs sorted by j).

    Neighbouring runs may overlap by a few tokens (an anchor window reaches over a boundary
    whose tokens happen to agree, e.g. a chat template's end-of-message marker): the later run
    is then trimmed to start after the earlier one, rather than the pair being refused.
    """
    if len(runs) > _MAX_RUNS:  # pathological input: keep the longest runs, in j order
        keep = np.sort(np.argsort(-runs[:, 2], kind="stable")[:_MAX_RUNS])
        runs = runs[keep]
    rs = [(int(i), int(j), int(s)) for i, j, s in runs]
    best: list[int] = []
    prev: list[int] = []
    for n, (i, j, s) in enumerate(rs):
        score, back = s, -1
        for m in range(n):
            pi, pj, ps = rs[m]
            if pi >= i or pj >= j:
                continue
            cut = max(pi + ps - i, pj + ps - j, 0)  # tokens of run n the chain must drop
            if cut < s and best[m] + s - cut > score:
                score, back = best[m] + s - cut, m
        best.append(score)
        prev.append(back)
    chain: list[tuple[int, int, int]] = []
    n = int(np.argmax(best)) if best else -1
    while n >= 0:
        chain.append(rs[n])
        n = prev[n]
    chain.reverse()
    out: list[tuple[int, int, int]] = []
    for i, j, s in chain:
        if out:
            pi, pj, ps = out[-1]
            cut = max(pi + ps - i, pj + ps - j, 0)
            i, j, s = i + cut, j + cut, s - cut
        out.append((i, j, s))
    return out


def common_prefix_len(x: np.ndarray, y: np.ndarray) -> int:
    """How many leading tokens ``x`` and ``y`` share.

    >>> common_prefix_len(np.array([1, 2, 3]), np.array([1, 2, 4, 5]))
    2
    """
    m = min(len(x), len(y))
    neq = np.flatnonzero(x[:m] != y[:m])
    return int(neq[0]) if len(neq) else m


def _matching_blocks(a: np.ndarray, b: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """Equal blocks ``(i, j, size)``, increasing and disjoint, each extended exactly."""
    head = common_prefix_len(a, b)
    tail = common_prefix_len(a[head:][::-1], b[head:][::-1])
    ma, mb = a[head : len(a) - tail], b[head : len(b) - tail]
    out = [(0, 0, head)]
    runs = _chain(_anchor_runs(ma, mb, k)) if min(len(ma), len(mb)) >= k else []
    pi = pj = 0
    for n, (i, j, s) in enumerate(runs):
        if not np.array_equal(ma[i : i + s], mb[j : j + s]):
            continue  # NOTE: a 64-bit hash collision; dropping the run only widens an edit
        ni, nj = runs[n + 1][:2] if n + 1 < len(runs) else (len(ma), len(mb))
        ni, nj = max(ni, i + s), max(nj, j + s)
        left = common_prefix_len(ma[pi:i][::-1], mb[pj:j][::-1])
        right = common_prefix_len(ma[i + s : ni], mb[j + s : nj])
        i, j, s = i - left, j - left, s + left + right
        out.append((head + i, head + j, s))
        pi, pj = i + s, j + s
    out.append((len(a) - tail, len(b) - tail, tail))
    return [blk for blk in out if blk[2] > 0]


def edit_regions(
    base: Sequence[int] | np.ndarray, new: Sequence[int] | np.ndarray, merge_gap: int = 16
) -> list[tuple[int, int, int, int]]:
    """Edit regions ``(start, end, new_start, new_end)`` of ``base`` -> ``new``, merged when
    the equal stretch between two is shorter than ``merge_gap``."""
    a, b = _ids(base), _ids(new)
    k = min(max(merge_gap, 2), 32)
    regions: list[list[int]] = []
    pi = pj = 0
    for i, j, s in [*_matching_blocks(a, b, k), (len(a), len(b), 0)]:
        if i > pi or j > pj:
            if regions and pi - regions[-1][1] < merge_gap and pj - regions[-1][3] < merge_gap:
                regions[-1][1], regions[-1][3] = i, j
            else:
                regions.append([pi, i, pj, j])
        pi, pj = i + s, j + s
    return [(r[0], r[1], r[2], r[3]) for r in regions]


@dataclass(frozen=True, slots=True)
class Alignment:
    """The client's directives as token edits.

    ``paired``: one edit per client directive, in order (outcomes are reported per directive);
    otherwise the edits are served together and reported once for all directives. ``reason``
    explains an empty or merged result.
    """

    edits: tuple[TokenEdit, ...]
    paired: bool
    reason: str | None


def align_edits(
    base: Sequence[int] | np.ndarray,
    base_prompt_len: int,
    new: Sequence[int] | np.ndarray,
    modes: Sequence[str],
    *,
    merge_gap: int = 16,
    default: str | None = None,
) -> Alignment:
    """Token edits of ``base`` -> ``new`` carrying the client's modes, or every edit carrying
    ``default`` when there are no client directives (a server-diff payload).

    Regions that end within ``merge_gap`` tokens of the base prompt's end, or later, are the
    turn boundary (the base's generation prompt and output against the history the client
    rendered), never a client edit: they are served by ordinary matching and carry no mode.
    When the region count differs from the directive count, every region is served in the
    strictest of the modes (FORGET, then REPAIR, then AMORTIZE: it costs speed, never
    exactness the client asked for, nor leaks edited-away content).
    """
    if not modes and default is None:
        return Alignment((), True, None)
    last = base_prompt_len - merge_gap  # regions ending later are the turn boundary
    regions = [r for r in edit_regions(base, new, merge_gap) if r[1] <= last]
    if default is not None and not modes:
        return Alignment(tuple(TokenEdit(*r, default) for r in regions), True, None)
    if not regions:
        return Alignment(
            (), False, "the request's tokens show no edit inside the base prompt before its end"
        )
    if len(regions) == len(modes):
        return Alignment(tuple(TokenEdit(*r, m) for r, m in zip(regions, modes, strict=True)),
                         True, None)  # fmt: skip
    mode = max(modes, key=_STRICTNESS.index)
    why = (
        f"the token diff finds {len(regions)} edits for {len(modes)} directives (edits closer "
        f"than {merge_gap} tokens merge); served together as {mode}"
    )
    return Alignment(tuple(TokenEdit(*r, mode) for r in regions), False, why)


def moved_spans(
    base: Sequence[int] | np.ndarray,
    new: Sequence[int] | np.ndarray,
    lo: int,
    hi: int,
    min_len: int = 32,
) -> list[tuple[int, int, int]]:
    """Blocks of ``new[lo:hi]`` (an edit's replacement) found verbatim in ``base``, as
    ``(request_pos, base_pos, length)`` with ``length >= min_len``: content the edit moved.

    Anchored like the diff (k-grams unique in both), so a moved message is found whole; the
    planner verifies every token again before copying.
    """
    a, b = _ids(base), _ids(new)[lo:hi]
    k = min(max(min_len // 2, 2), 32)
    if min(len(a), len(b)) < max(k, min_len):
        return []
    return [(lo + j, i, s) for i, j, s in _matching_blocks(a, b, k) if s >= min_len]
