"""The vectorised token diff (`align.edit_regions`) against difflib's opcodes, the reference it
replaced, on random sequences with awkward edits; and its speed on a 16K-token request."""

from __future__ import annotations

import difflib
from array import array

import numpy as np
import pytest

from leyline.server.core.align import align_edits, edit_regions, moved_spans


def _difflib_regions(base, new, merge_gap: int = 16) -> list[tuple[int, int, int, int]]:
    sm = difflib.SequenceMatcher(None, list(base), list(new), autojunk=len(base) > 2000)
    out: list[list[int]] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        if out and i1 - out[-1][1] < merge_gap and j1 - out[-1][3] < merge_gap:
            out[-1][1], out[-1][3] = i2, j2
        else:
            out.append([i1, i2, j1, j2])
    return [tuple(r) for r in out]


def _edited(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    new = base.copy()
    for _ in range(int(rng.integers(0, 4))):
        s = int(rng.integers(0, len(new) + 1))
        e = min(len(new), s + int(rng.integers(0, 300)))
        repl = rng.integers(0, 50_000, int(rng.integers(0, 90)))
        new = np.concatenate([new[:s], repl, new[e:]])
    if rng.random() < 0.5:  # the next turn appended after the base
        new = np.concatenate([new, rng.integers(0, 50_000, 37)])
    return new


@pytest.mark.parametrize("seed", range(4))
def test_regions_equal_difflibs_on_random_edits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        base = rng.integers(0, 50_000, int(rng.integers(1, 2500)))
        new = _edited(rng, base)
        assert edit_regions(base, new) == _difflib_regions(base, new)


def test_regions_rebuild_the_request_even_with_repeated_content() -> None:
    # A repeated block has no unique k-gram: the diff may report a wider edit, never a wrong one.
    rng = np.random.default_rng(7)
    block = rng.integers(0, 500, 61)
    base = np.concatenate([block, rng.integers(0, 500, 45), block, block, rng.integers(0, 9, 33)])
    new = np.concatenate([base[:70], base[95:150], [3, 1, 4], base[150:], base[:20]])
    regions = edit_regions(base, new, merge_gap=5)
    rebuilt, i = [], 0
    for s, e, ns, ne in regions:
        assert base[i:s].tolist() == new[len(rebuilt) : len(rebuilt) + s - i].tolist()
        rebuilt += base[i:s].tolist() + new[ns:ne].tolist()
        i = e
    rebuilt += base[i:].tolist()
    assert rebuilt == new.tolist()


def test_align_edits_accepts_sglang_arrays_and_pairs_modes() -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(5, 90_000, 1333)
    new = np.concatenate([base[:100], base[140:700], rng.integers(5, 90_000, 9), base[760:]])
    al = align_edits(array("q", base.tolist()), 1333, array("q", new.tolist()),
                     ["amortize", "forget"])  # fmt: skip
    assert al.reason is None and al.paired
    assert [(e.start, e.end, e.new_start, e.new_end, e.mode) for e in al.edits] == [
        (100, 140, 100, 100, "amortize"),
        (700, 760, 660, 669, "forget"),
    ]
    al = align_edits(base, 1333, base, ["amortize"])
    assert not al.edits and "no edit" in al.reason


def test_the_turn_boundary_is_not_a_client_edit() -> None:
    """The base ends with a generation prompt and its output; the next request renders that
    turn as history and appends a new one. That region is no client edit: one directive sent,
    one edit found (it was reported as two or three, and mixed modes were then all ignored)."""
    rng = np.random.default_rng(5)
    prompt = rng.integers(5, 90_000, 900)
    gen_prompt, output = [11, 12, 13], [77]
    base = np.concatenate([prompt, gen_prompt, output])
    history = np.concatenate([prompt[:200], prompt[260:], [11, 12, 14, 15], [77, 78, 2]])
    new = np.concatenate([history, rng.integers(5, 90_000, 50)])
    for modes in (["amortize"], ["forget"]):
        al = align_edits(base, len(prompt) + 3, new, modes)
        assert al.paired and [(e.start, e.end, e.mode) for e in al.edits] == [(200, 260, modes[0])]
    # Two directives in order, mixed modes: paired one to one.
    new2 = np.concatenate([history[:500], rng.integers(5, 90_000, 7), history[520:]])
    al = align_edits(base, len(prompt) + 3, new2, ["amortize", "forget"])
    assert al.paired and [e.mode for e in al.edits] == ["amortize", "forget"]


def test_mixed_modes_that_do_not_pair_are_served_as_forget() -> None:
    rng = np.random.default_rng(6)
    base = rng.integers(5, 90_000, 1000)
    new = np.concatenate([base[:100], base[110:115], base[120:]])  # 5 kept tokens: one edit
    al = align_edits(base, 1000, new, ["amortize", "forget"])
    assert not al.paired and [e.mode for e in al.edits] == ["forget"]
    assert "1 edits for 2 directives" in al.reason
    al = align_edits(base, 1000, new, ["amortize", "amortize"])
    assert [e.mode for e in al.edits] == ["amortize"]
    # Without FORGET the strictest is REPAIR: the merged edit is not served less exact.
    al = align_edits(base, 1000, new, ["amortize", "repair"])
    assert [e.mode for e in al.edits] == ["repair"] and "served together as repair" in al.reason


def test_moved_spans_find_a_moved_block_whole() -> None:
    rng = np.random.default_rng(8)
    p, a, b, c = (rng.integers(5, 90_000, n) for n in (100, 300, 250, 200))
    base = np.concatenate([p, a, b, c])
    new = np.concatenate([p, b, a, c, rng.integers(5, 90_000, 30)])
    regions = edit_regions(base, new)
    spans = [s for r in regions for s in moved_spans(base, new, r[2], r[3])]
    covered = sum(length for _, _, length in spans)
    for r_pos, b_pos, length in spans:
        assert new[r_pos : r_pos + length].tolist() == base[b_pos : b_pos + length].tolist()
    inserted = sum(r[3] - r[2] for r in regions) - 30
    assert covered >= inserted - 2 * 16  # all of the moved block, up to a merge-gap edge


def test_sixteen_k_token_edit_regions() -> None:
    """A 256-token deletion ahead of a 16K-token suffix plus an appended turn (the benchmark's
    case; its speed is reported by benchmarks/sglang_splice_gpu.py, not asserted here)."""
    rng = np.random.default_rng(0)
    base = rng.integers(10, 100_000, 16_384 + 320)
    new = np.concatenate([base[:64], base[320:], np.full(64, 7)])
    assert edit_regions(base, new) == [(64, 320, 64, 64), (16_704, 16_704, 16_448, 16_512)]
