"""Content index: chunk key -> where that chunk's KV lives in the pool.

An entry records the chunk's token ids, the donor pool slots holding its KV and the positions
the KV was computed at (so a splice can rotate by ``delta = new_position - old_position``).
A key hit is only a candidate: ``lookup`` compares token ids and rejects a collision.

Lifetime: entries die with their slots. Adapters must call ``drop_slots`` with every slot they
free (before the slot can be reallocated). The reverse map slot -> entry is a numpy array
indexed by slot (it grows to the largest slot seen) holding a small id per key, plus a dict
slot -> further keys for the rare slot held by two entries (two chunkings of the same KV, e.g.
a sequence's last chunk before and after the next turn extended it). Indexing a chunk and
dropping a batch of freed slots are array operations, not a Python loop per token: an
eviction of 35K slots on SGLang once cost ~10 ms of the next request's planning.

Re-adding a key keeps the newest entry (the old one is dropped with its reverse-map links):
newer KV was computed for the most recent context and its slots are the least likely to be
evicted next, and one key -> one entry keeps ``drop_slots`` simple. Re-adding an identical
entry (same tokens, slots and positions: a session's sequence indexed again after each turn)
only refreshes its generation.

The index stores whatever the adapter hands it; it does not know whether the donor KV is exact
or approximate (spliced/chunk-reused). Adapters decide what they index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from leyline.server.core.chunking import DEFAULT_PARAMS, ChunkParams, chunk_spans, token_array

__all__ = ["ContentIndex", "IndexEntry", "IndexStats"]


@dataclass(frozen=True, slots=True, eq=False)
class IndexEntry:
    """One indexed chunk: ``tokens[i]`` has KV in ``slots[i]``, computed at ``positions[i]``."""

    key: int
    tokens: np.ndarray  # uint32
    slots: np.ndarray  # int64
    positions: np.ndarray  # int64
    generation: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Counters since construction (``clear`` keeps them)."""

    entries: int
    hits: int
    misses: int  # key absent
    collisions_rejected: int  # key present, token ids differ
    dropped: int  # entries removed by drop_slots or replaced by a newer add


class ContentIndex:
    """Key -> ``IndexEntry`` map whose entries are removed when their slots are freed."""

    def __init__(self) -> None:
        self._entries: dict[int, IndexEntry] = {}
        self._id_of: dict[int, int] = {}  # key -> small id (stable while the key is present)
        self._key_of: dict[int, int] = {}  # id -> key
        self._next_id = 0
        self._owner = np.full(0, -1, dtype=np.int64)  # slot -> id of one entry using it
        self._shared = np.zeros(0, dtype=bool)  # slot -> has further entries in ``_more``
        self._more: dict[int, set[int]] = {}  # slot -> further keys referencing it
        self._generation = 0
        self._hits = 0
        self._misses = 0
        self._collisions = 0
        self._dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        return int(key) in self._entries

    def add(
        self,
        key: int,
        tokens: np.ndarray | Sequence[int],
        slots: np.ndarray | Sequence[int],
        positions: np.ndarray | Sequence[int],
    ) -> IndexEntry:
        """Index one chunk (replacing any entry under ``key``); returns the new entry."""
        tok = token_array(tokens).copy()
        sl = np.array(slots, dtype=np.int64)
        pos = np.array(positions, dtype=np.int64)
        n = tok.shape[0]
        if n == 0 or sl.shape != (n,) or pos.shape != (n,):
            raise ValueError(
                "tokens, slots and positions must be non-empty 1-D arrays of equal length, "
                f"got {tok.shape}, {sl.shape}, {pos.shape}"
            )
        if sl.min() < 0 or pos.min() < 0:
            raise ValueError("slots and positions must be >= 0")
        return self._insert(int(key), tok, sl, pos)

    def _insert(self, key: int, tok: np.ndarray, sl: np.ndarray, pos: np.ndarray) -> IndexEntry:
        self._generation += 1
        entry = IndexEntry(key, tok, sl, pos, self._generation)
        old = self._entries.get(key)
        if old is not None:
            if _same(old, entry):  # same KV indexed again: links are already right
                self._entries[key] = entry
                return entry
            self._remove({key})
            self._dropped += 1
        self._entries[key] = entry
        eid = self._next_id
        self._next_id += 1
        self._id_of[key], self._key_of[eid] = eid, key
        self._grow(int(sl.max()) + 1)
        free = self._owner[sl] < 0
        self._owner[sl[free]] = eid
        if not free.all():
            clash = sl[~free]
            self._shared[clash] = True
            for s in clash.tolist():
                self._more.setdefault(s, set()).add(key)
        return entry

    def add_sequence(
        self,
        tokens: np.ndarray | Sequence[int],
        slots: np.ndarray | Sequence[int],
        *,
        salt: str = "",
        params: ChunkParams = DEFAULT_PARAMS,
        mode: Literal["cdc", "fixed"] = "cdc",
        start: int = 0,
    ) -> int:
        """Chunk a served sequence (token i at position i, KV in ``slots[i]``) and index every
        chunk that ends after ``start``; returns the number of chunks added.

        Chunking always runs over the whole sequence so boundaries match ``build_plan``'s.
        """
        tok = token_array(tokens)
        sl = np.asarray(slots, dtype=np.int64)
        if sl.shape != tok.shape:
            raise ValueError(f"slots {sl.shape} must match tokens {tok.shape}")
        if sl.size and sl.min() < 0:
            raise ValueError("slots must be >= 0")
        added = 0
        for c in chunk_spans(tok, params, salt, mode):
            if c.end <= start:
                continue
            span = slice(c.start, c.end)
            self._insert(c.key, tok[span].copy(), sl[span].copy(), np.arange(c.start, c.end))
            added += 1
        return added

    def lookup(self, key: int, tokens: np.ndarray | Sequence[int]) -> IndexEntry | None:
        """The entry under ``key`` if its token ids equal ``tokens``, else None."""
        entry = self._entries.get(int(key))
        if entry is None:
            self._misses += 1
            return None
        tok = np.asarray(tokens)
        if tok.shape != entry.tokens.shape or not np.array_equal(tok, entry.tokens):
            self._collisions += 1
            return None
        self._hits += 1
        return entry

    def drop_slots(self, slots: Iterable[int] | np.ndarray) -> int:
        """Remove every entry that references any of ``slots``; returns how many were removed."""
        arr = np.asarray(slots if isinstance(slots, np.ndarray) else list(slots), dtype=np.int64)
        arr = arr[(arr >= 0) & (arr < self._owner.shape[0])]
        ids = self._owner[arr]
        keys = {self._key_of[i] for i in np.unique(ids[ids >= 0]).tolist()}
        for s in np.unique(arr[self._shared[arr]]).tolist():
            keys.update(self._more.get(s, ()))
        self._remove(keys)
        self._dropped += len(keys)
        return len(keys)

    def clear(self) -> None:
        """Remove all entries (counters are kept)."""
        self._entries.clear()
        self._id_of.clear()
        self._key_of.clear()
        self._owner[:] = -1
        self._shared[:] = False
        self._more.clear()

    def entries(self) -> list[IndexEntry]:
        """All live entries, oldest first."""
        return sorted(self._entries.values(), key=lambda e: e.generation)

    @property
    def stats(self) -> IndexStats:
        return IndexStats(
            len(self._entries), self._hits, self._misses, self._collisions, self._dropped
        )

    def _grow(self, size: int) -> None:
        n = self._owner.shape[0]
        if size > n:
            cap = max(size, 2 * n, 1024)
            self._owner = np.concatenate([self._owner, np.full(cap - n, -1, np.int64)])
            self._shared = np.concatenate([self._shared, np.zeros(cap - n, bool)])

    def _remove(self, keys: set[int]) -> None:
        """Remove the entries of ``keys`` and their reverse-map links, in one batch."""
        if not keys:
            return
        entries = [self._entries.pop(k) for k in keys]
        eids = [self._id_of.pop(k) for k in keys]
        for eid in eids:
            del self._key_of[eid]
        sl = np.concatenate([e.slots for e in entries])
        ids = np.repeat(np.asarray(eids, np.int64), [len(e) for e in entries])
        shared = self._shared[sl]
        self._owner[sl[(self._owner[sl] == ids) & ~shared]] = -1
        gone = set(eids)
        for s in np.unique(sl[shared]).tolist():  # slots other entries may still hold
            extra = self._more[s]
            extra -= keys
            if int(self._owner[s]) in gone:
                self._owner[s] = self._id_of[extra.pop()] if extra else -1
            if not extra:
                del self._more[s]
                self._shared[s] = False


def _same(a: IndexEntry, b: IndexEntry) -> bool:
    return (
        np.array_equal(a.tokens, b.tokens)
        and np.array_equal(a.slots, b.slots)
        and np.array_equal(a.positions, b.positions)
    )
