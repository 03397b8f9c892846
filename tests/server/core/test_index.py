"""ContentIndex: verified lookups, slot-driven eviction, replacement policy, sequence indexing."""

from __future__ import annotations

import numpy as np
import pytest

from leyline.server.core.chunking import ChunkParams, chunk_spans
from leyline.server.core.index import ContentIndex


def _chunk(rng: np.random.Generator, n: int, first_slot: int) -> tuple[np.ndarray, ...]:
    tokens = rng.integers(0, 50_000, n)
    slots = np.arange(first_slot, first_slot + n)
    positions = rng.integers(0, 10_000) + np.arange(n)
    return tokens, slots, positions


def test_hit_requires_equal_tokens() -> None:
    rng = np.random.default_rng(0)
    idx = ContentIndex()
    tok, sl, pos = _chunk(rng, 37, 100)
    entry = idx.add(42, tok, sl, pos)
    assert len(idx) == 1 and 42 in idx and len(entry) == 37
    hit = idx.lookup(42, tok.astype(np.uint32))
    assert hit is entry
    assert np.array_equal(hit.slots, sl) and np.array_equal(hit.positions, pos)
    other = tok.copy()
    other[17] += 1
    assert idx.lookup(42, other) is None  # a key hit is only a candidate
    assert idx.lookup(42, tok[:-1]) is None
    assert idx.lookup(7, tok) is None
    s = idx.stats
    assert (s.entries, s.hits, s.misses, s.collisions_rejected) == (1, 1, 1, 2)


def test_entries_own_copies() -> None:
    rng = np.random.default_rng(1)
    idx = ContentIndex()
    tok, sl, pos = _chunk(rng, 40, 5)
    idx.add(1, tok, sl, pos)
    tok[:] = 0
    sl[:] = 0
    e = idx.lookup(1, rng.integers(0, 1, 40))
    assert e is None  # stored tokens did not change with the caller's array
    assert idx.entries()[0].slots[0] == 5


def test_drop_slots_removes_every_referencing_entry() -> None:
    rng = np.random.default_rng(2)
    idx = ContentIndex()
    chunks = {k: _chunk(rng, 50, 1000 + 50 * k) for k in range(6)}
    for k, (tok, sl, pos) in chunks.items():
        idx.add(k, tok, sl, pos)
    # A seventh entry shares slots with chunks 1 and 2 (e.g. a fixed-window key of the same KV).
    shared = np.concatenate([chunks[1][1][25:], chunks[2][1][:25]])
    idx.add(99, rng.integers(0, 9, 50), shared, np.arange(50))
    assert idx.drop_slots([1075]) == 2  # slot inside chunk 1 and the shared entry
    assert 1 not in idx and 99 not in idx and 2 in idx
    assert idx.drop_slots(np.array([1075, 1076, 5])) == 0  # already gone: nothing referenced
    assert idx.drop_slots(np.arange(1000, 1250)) == 4  # chunks 0, 2, 3, 4 (1 already gone)
    assert sorted(e.key for e in idx.entries()) == [5]
    assert idx.stats.dropped == 6
    # Freed slots can be reused by new entries without stale links.
    tok, sl, pos = _chunk(rng, 10, 1000)
    idx.add(7, tok, sl, pos)
    assert idx.drop_slots([1009]) == 1 and len(idx) == 1


def test_readd_keeps_newest_and_unlinks_old_slots() -> None:
    rng = np.random.default_rng(3)
    idx = ContentIndex()
    tok, sl, pos = _chunk(rng, 30, 10)
    old = idx.add(5, tok, sl, pos)
    new = idx.add(5, tok, sl + 500, pos + 3)
    assert new.generation > old.generation
    assert len(idx) == 1 and idx.lookup(5, tok) is new
    assert idx.drop_slots(sl) == 0  # the old slots no longer hold an entry
    assert idx.drop_slots(sl[:1] + 500) == 1 and len(idx) == 0


def test_clear_and_validation() -> None:
    rng = np.random.default_rng(4)
    idx = ContentIndex()
    tok, sl, pos = _chunk(rng, 8, 1)
    idx.add(1, tok, sl, pos)
    idx.lookup(1, tok)
    idx.clear()
    assert len(idx) == 0 and idx.stats.hits == 1 and idx.drop_slots(sl) == 0
    with pytest.raises(ValueError, match="equal length"):
        idx.add(2, tok, sl[:-1], pos)
    with pytest.raises(ValueError, match="equal length"):
        idx.add(2, [], [], [])
    with pytest.raises(ValueError, match=">= 0"):
        idx.add(2, tok, sl - 5, pos)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        idx.add(2, tok - 10**6, sl, pos)


def test_add_sequence_indexes_cdc_chunks_with_positions() -> None:
    rng = np.random.default_rng(5)
    idx = ContentIndex()
    seq = rng.integers(0, 100_000, 3000)
    slots = rng.permutation(10_000)[:3000] + 1
    spans = chunk_spans(seq, salt="t")
    assert idx.add_sequence(seq, slots, salt="t") == len(spans) == len(idx)
    for c in spans:
        e = idx.lookup(c.key, seq[c.start : c.end])
        assert e is not None
        assert np.array_equal(e.positions, np.arange(c.start, c.end))
        assert np.array_equal(e.slots, slots[c.start : c.end])
    # ``start`` skips chunks that end at or before it; fixed mode uses fixed windows.
    idx2 = ContentIndex()
    n = idx2.add_sequence(seq, slots, mode="fixed", params=ChunkParams(fixed_size=100), start=450)
    assert n == 26 and min(len(e) for e in idx2.entries()) == 100
    with pytest.raises(ValueError, match="match tokens"):
        idx2.add_sequence(seq, slots[:-1])


def test_reverse_map_matches_brute_force_under_random_ops() -> None:
    """Random adds (overlapping slots, re-added keys) and drops against a plain model."""
    rng = np.random.default_rng(6)
    idx = ContentIndex()
    model: dict[int, set[int]] = {}  # key -> slots
    for _ in range(400):
        if rng.random() < 0.7:
            key = int(rng.integers(0, 60))
            n = int(rng.integers(1, 12))
            slots = rng.choice(200, n, replace=False) + 1
            idx.add(key, rng.integers(0, 9, n), slots, np.arange(n))
            model[key] = set(slots.tolist())
        else:
            drop = set((rng.choice(200, int(rng.integers(1, 20)), replace=False) + 1).tolist())
            gone = {k for k, sl in model.items() if sl & drop}
            assert idx.drop_slots(sorted(drop)) == len(gone)
            for k in gone:
                del model[k]
        assert {e.key for e in idx.entries()} == set(model)
    for key, slots in model.items():
        if key in idx:
            assert idx.drop_slots([min(slots)]) >= 1
    assert len(idx) == 0


def test_reindexing_a_sequence_refreshes_without_relinking() -> None:
    rng = np.random.default_rng(7)
    idx = ContentIndex()
    seq = rng.integers(0, 100_000, 2000)
    slots = np.arange(1, 2001)
    n = idx.add_sequence(seq, slots)
    gens = {e.key: e.generation for e in idx.entries()}
    # The next turn appends tokens: the old tail chunk's slots now also sit in a new chunk.
    longer = np.concatenate([seq, rng.integers(0, 100_000, 700)])
    idx.add_sequence(longer, np.arange(1, 2701))
    assert idx.stats.dropped == 0 and len(idx) > n
    assert all(idx.entries()[-1].generation > g for g in gens.values())
    # Freeing the old tail slots drops both the stale tail entry and the new chunk over it.
    tail = max(gens, key=gens.__getitem__)
    removed = idx.drop_slots([1999])
    assert removed >= 2 and tail not in idx
