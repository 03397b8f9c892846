"""Radix prefix tree over token ids: the embedded engine's exact and approximate KV cache.

Each edge holds a run of token ids (np.int64) and the KV slots of those tokens. A node's
children are keyed by ``(first token, tenant, owner)``. ``tenant`` (docs/security.md) splits
the tree into one namespace per tenant below the root: a match never leaves the caller's
tenant, so nothing one tenant computed is reused by another. ``owner`` is ``None`` for exact
KV and a session key for approximate KV (spliced or chunk-reused, or computed after such KV). So the
same tokens can be cached twice under one parent, once exact and once per session, and
approximate nodes never merge with exact ones. Everything below an approximate node is
approximate with the same owner. :meth:`RadixTree.match_prefix` only walks into approximate
nodes for their owner session: approximate KV never leaks into another request.

Ownership: the tree owns every slot it holds and frees them in the store when it evicts,
drops a session, resets, or finds that an inserted exact prefix was already cached. Nodes
carry SGLang-style lock counts (a lock on a node counts on its whole path to the root) and an
LRU stamp from a monotonic counter; :meth:`RadixTree.evict` frees unlocked leaves oldest first,
cascading to parents that become leaves.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from leyline.server.core.align import common_prefix_len
from leyline.server.engine.store import KVStore

__all__ = ["Match", "Node", "RadixTree"]

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(eq=False, repr=False, slots=True)
class Node:
    """One edge of the tree: ``tokens[i]`` is cached in ``slots[i]``.

    ``depth`` is the number of tokens from the root to the end of this node. ``owner`` is
    ``None`` for exact KV, else the key of the session whose approximate KV this is;
    ``tenant`` is the namespace the whole path belongs to.
    ``detached`` is set once the node is evicted or dropped (it may no longer be locked).
    """

    parent: Node | None
    tokens: np.ndarray
    slots: np.ndarray
    owner: str | None
    depth: int
    tenant: str = ""
    children: dict[tuple[int, str, str | None], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    detached: bool = False

    @property
    def approximate(self) -> bool:
        return self.owner is not None

    @property
    def key(self) -> tuple[int, str, str | None]:
        return (int(self.tokens[0]), self.tenant, self.owner)

    def __repr__(self) -> str:
        kind = f"approx[{self.owner}]" if self.owner is not None else "exact"
        return f"Node({kind}, len={len(self.tokens)}, depth={self.depth}, locks={self.lock_ref})"


@dataclass(frozen=True, slots=True)
class Match:
    """Result of :meth:`RadixTree.match_prefix`.

    ``slots`` hold the KV of ``tokens[:length]``; ``node`` ends exactly at ``length`` (lock it
    to keep the slots alive); ``exact_length <= length`` tokens are exact, the rest approximate.
    """

    length: int
    slots: np.ndarray
    node: Node
    exact_length: int

    @property
    def approximate_length(self) -> int:
        return self.length - self.exact_length


# A traced path: (node, how many of its leading tokens matched).
_Path = list[tuple[Node, int]]


class RadixTree:
    """Prefix cache over one :class:`KVStore`.

    ``on_evict(slots)`` is called right before the tree returns any slots to the store, so
    the engine can drop content-index entries that point at them.
    """

    def __init__(
        self, store: KVStore, *, on_evict: Callable[[np.ndarray], object] | None = None
    ) -> None:
        self.store = store
        self.on_evict = on_evict
        self._clock = 0
        self._init_state()

    def _init_state(self) -> None:
        self.root = Node(None, _EMPTY, _EMPTY, None, 0)
        self.root.lock_ref = 1  # the root is never evictable
        self._held = np.zeros(self.store.capacity + 1, dtype=bool)  # slots the tree owns
        self._evictable = 0
        self._protected = 0

    # ------------------------------------------------------------------ sizes
    @property
    def evictable_tokens(self) -> int:
        """Cached tokens on unlocked nodes (all of them can be evicted)."""
        return self._evictable

    @property
    def protected_tokens(self) -> int:
        """Cached tokens on locked nodes."""
        return self._protected

    @property
    def total_cached_tokens(self) -> int:
        return self._evictable + self._protected

    def held_slots(self) -> np.ndarray:
        """Sorted slots the tree owns."""
        return np.flatnonzero(self._held).astype(np.int64)

    # ------------------------------------------------------------------ match
    def match_prefix(
        self, tokens: np.ndarray, *, session: str | None = None, tenant: str = ""
    ) -> Match:
        """Longest cached prefix of ``tokens`` visible to ``session`` in ``tenant``'s namespace.

        Exact nodes are visible to everyone; approximate nodes only to their owner session
        (``session=None`` sees exact KV only). On a tie the match with more exact tokens wins.
        A match ending inside an edge splits that edge so ``Match.node`` ends at ``length``.
        Touches the matched path (LRU).
        """
        toks = _as_ids(tokens, "tokens")
        n = len(toks)
        epath, length = self._trace(self.root, toks, 0, n, None, tenant)
        path, exact_len = epath, length
        if session is not None:
            # An approximate branch may hang off the root or any fully matched exact node.
            for i in range(len(epath) + 1):
                if i and epath[i - 1][1] < len(epath[i - 1][0].tokens):
                    break  # the exact match ends inside this edge: no children there
                base = epath[i - 1][0] if i else self.root
                apath, apos = self._trace(base, toks, base.depth, n, session, tenant)
                if (apos, base.depth) > (length, exact_len):
                    path, length, exact_len = epath[:i] + apath, apos, base.depth
        slots = np.concatenate([nd.slots[:k] for nd, k in path]) if path else _EMPTY.copy()
        end = self.root
        if path:
            last, k = path[-1]
            end = self._split(last, k) if k < len(last.tokens) else last
        self._touch(end)
        return Match(length=length, slots=slots, node=end, exact_length=exact_len)

    def _trace(
        self, node: Node, toks: np.ndarray, pos: int, end: int, owner: str | None, tenant: str
    ) -> tuple[_Path, int]:
        """Follow children owned by ``owner`` from ``node`` over ``toks[pos:end]``; no mutation."""
        path: _Path = []
        while pos < end:
            child = node.children.get((int(toks[pos]), tenant, owner))
            if child is None:
                break
            k = common_prefix_len(child.tokens, toks[pos:end])
            path.append((child, k))
            pos += k
            if k < len(child.tokens):
                break
            node = child
        return path, pos

    # ------------------------------------------------------------------ insert
    def insert(
        self,
        tokens: np.ndarray,
        slots: np.ndarray,
        *,
        approx_from: int | None = None,
        session: str | None = None,
        tenant: str = "",
    ) -> Node:
        """Cache ``tokens`` whose KV sits in ``slots``; returns the node ending at ``len(tokens)``.

        Positions ``>= approx_from`` are approximate and owned by ``session`` (required then);
        everything goes into ``tenant``'s namespace.
        Ownership: after ``insert`` the tree owns *all* slots of the sequence. Where a part is
        already cached (exact part in exact nodes, approximate part in ``session``'s nodes), the
        tree keeps its own slots and **frees the caller's differing slots** (passing the tree's
        own slots, e.g. from :meth:`match_prefix`, is fine). Read the sequence's slots back with
        :meth:`path_slots`. The caller's slots must be allocated and not held by the tree at any
        other position; otherwise ValueError and nothing changes. Touches the path (LRU).
        """
        toks = _as_ids(tokens, "tokens")
        sl = _as_ids(slots, "slots")
        n = len(toks)
        if len(sl) != n:
            raise ValueError(f"got {n} tokens but {len(sl)} slots")
        a = n if approx_from is None else int(approx_from)
        if not 0 <= a <= n:
            raise ValueError(f"approx_from must lie in [0, {n}], got {approx_from}")
        if a < n and session is None:
            raise ValueError("approximate KV (approx_from < len(tokens)) needs an owner session")
        self._check_insert_slots(toks, sl, a, session, tenant)

        freed: list[np.ndarray] = []
        node = self._insert_run(self.root, toks, sl, 0, a, None, tenant, freed)
        if a < n:
            node = self._insert_run(node, toks, sl, a, n, session, tenant, freed)
        self._touch(node)
        dups = np.concatenate(freed) if freed else _EMPTY
        if dups.size:
            self._release(dups)
        return node

    def _check_insert_slots(
        self, toks: np.ndarray, sl: np.ndarray, a: int, session: str | None, tenant: str
    ) -> None:
        if sl.size == 0:
            return
        if sl.min() < 1 or sl.max() > self.store.capacity:
            raise ValueError(f"slots must lie in [1, {self.store.capacity}]")
        if np.unique(sl).size != sl.size:
            raise ValueError("the same slot appears twice in one inserted sequence")
        if not self.store.is_allocated(sl).all():
            raise ValueError("insert got slots that are not allocated in the store")
        # Where the sequence is already cached the tree's slot wins; any other caller slot the
        # tree already holds would end up owned twice (and freed under a live node).
        epath, epos = self._trace(self.root, toks, 0, a, None, tenant)
        tree = [nd.slots[:k] for nd, k in epath]
        if epos == a and a < len(toks) and (not epath or epath[-1][1] == len(epath[-1][0].tokens)):
            start = epath[-1][0] if epath else self.root
            apath, _ = self._trace(start, toks, a, len(toks), session, tenant)
            tree += [nd.slots[:k] for nd, k in apath]
        cached = np.concatenate(tree) if tree else _EMPTY
        own = np.ones(len(sl), dtype=bool)
        if epos:
            own[:epos] = sl[:epos] != cached[:epos]
        if len(cached) > epos:
            own[a : a + len(cached) - epos] = sl[a : a + len(cached) - epos] != cached[epos:]
        clash = sl[own & self._held[sl]]
        if clash.size:
            raise ValueError(
                f"{clash.size} slot(s) are already cached at other positions, "
                f"e.g. {clash[:8].tolist()}"
            )

    def _insert_run(
        self,
        node: Node,
        toks: np.ndarray,
        sl: np.ndarray,
        pos: int,
        end: int,
        owner: str | None,
        tenant: str,
        freed: list[np.ndarray],
    ) -> Node:
        while pos < end:
            child = node.children.get((int(toks[pos]), tenant, owner))
            if child is None:
                depth = node.depth + end - pos
                leaf = Node(node, toks[pos:end].copy(), sl[pos:end].copy(), owner, depth, tenant)
                node.children[leaf.key] = leaf
                self._held[leaf.slots] = True
                self._evictable += end - pos
                return leaf
            k = common_prefix_len(child.tokens, toks[pos:end])
            if k < len(child.tokens):
                child = self._split(child, k)
            mine = sl[pos : pos + k]
            freed.append(mine[mine != child.slots])
            node, pos = child, pos + k
        return node

    def _split(self, node: Node, k: int) -> Node:
        """Cut ``node`` after its first ``k`` tokens; returns the new upper half.

        The original object keeps the lower half (same depth), so references held elsewhere
        (sessions, requests) stay valid; the upper half inherits its lock count.
        """
        assert 0 < k < len(node.tokens)
        parent = node.parent
        assert parent is not None
        upper = Node(
            parent,
            node.tokens[:k],
            node.slots[:k],
            node.owner,
            node.depth - len(node.tokens) + k,
            node.tenant,
        )
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        node.tokens, node.slots = node.tokens[k:], node.slots[k:]
        node.parent = upper
        upper.children[node.key] = node
        parent.children[upper.key] = upper
        return upper

    # ------------------------------------------------------------------ locks
    def lock(self, node: Node) -> None:
        """Protect ``node`` and its path to the root from eviction (counted, see unlock)."""
        self._check_live(node)
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.tokens)
                self._protected += len(node.tokens)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        """Undo one :meth:`lock`; ValueError (nothing changed) if ``node`` is not locked."""
        self._check_live(node)
        if node is not self.root and node.lock_ref < 1:
            raise ValueError(f"unlock of a node that is not locked: {node!r}")
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.tokens)
                self._protected -= len(node.tokens)
            node = node.parent  # type: ignore[assignment]

    def _check_live(self, node: Node) -> None:
        if node.detached:
            raise ValueError(f"{node!r} was evicted or dropped; match the prefix again")

    # ------------------------------------------------------------------ eviction
    def evict(self, n_tokens: int) -> int:
        """Free at least ``n_tokens`` cached tokens if possible, least recently used leaves
        first (a parent whose last child goes becomes a candidate). Returns tokens freed.
        """
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        heap = [(nd.last_access, id(nd), nd) for nd in self._nodes() if self._evictable_leaf(nd)]
        heapq.heapify(heap)
        freed = 0
        while freed < n_tokens and heap:
            _, _, nd = heapq.heappop(heap)
            parent = nd.parent
            freed += self._remove_leaf(nd)
            if parent is not None and self._evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def drop_session(self, session: str) -> int:
        """Free ``session``'s unlocked approximate nodes (locked ones stay until unlocked and
        evicted). Returns tokens freed."""
        freed = 0
        stack = [self.root]
        while stack:
            nd = stack.pop()
            for child in list(nd.children.values()):
                if child.owner == session and child.lock_ref == 0:
                    freed += self._remove_subtree(child)
                elif child.owner is None or child.owner == session:
                    stack.append(child)
        return freed

    def reset(self) -> None:
        """Drop the whole cache and free its slots; RuntimeError (nothing changed) if any node
        is locked (close sessions and finish requests first)."""
        if self._protected:
            raise RuntimeError(f"cannot reset: {self._protected} cached tokens are locked")
        for nd in self._nodes():
            nd.detached = True
        held = self.held_slots()
        if held.size:
            self._release(held)
        self._init_state()

    def _evictable_leaf(self, nd: Node) -> bool:
        return nd is not self.root and not nd.children and nd.lock_ref == 0

    def _remove_subtree(self, top: Node) -> int:
        freed = 0
        order = [top]
        for nd in order:  # breadth-first listing; removed leaves-first below
            order.extend(nd.children.values())
        for nd in reversed(order):
            freed += self._remove_leaf(nd)
        return freed

    def _remove_leaf(self, nd: Node) -> int:
        assert not nd.children and nd.lock_ref == 0 and nd.parent is not None
        del nd.parent.children[nd.key]
        nd.parent = None
        nd.detached = True
        self._evictable -= len(nd.tokens)
        self._release(nd.slots)
        return len(nd.tokens)

    def _release(self, slots: np.ndarray) -> None:
        if self.on_evict is not None:
            self.on_evict(slots)
        self._held[slots] = False
        self.store.free(slots)

    # ------------------------------------------------------------------ helpers
    def _touch(self, node: Node | None) -> None:
        self._clock += 1
        while node is not None:
            node.last_access = self._clock
            node = node.parent

    def _nodes(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            nd = stack.pop()
            yield nd
            stack.extend(nd.children.values())

    def _path(self, node: Node) -> list[Node]:
        self._check_live(node)
        out = []
        while node is not self.root:
            out.append(node)
            node = node.parent  # type: ignore[assignment]
        return out[::-1]

    def path_tokens(self, node: Node) -> np.ndarray:
        """Token ids from the root to the end of ``node``."""
        path = self._path(node)
        return np.concatenate([nd.tokens for nd in path]) if path else _EMPTY.copy()

    def path_slots(self, node: Node) -> np.ndarray:
        """KV slots of :meth:`path_tokens`, in order."""
        path = self._path(node)
        return np.concatenate([nd.slots for nd in path]) if path else _EMPTY.copy()

    def nodes(self) -> list[Node]:
        """All nodes except the root (for inspection and tests)."""
        return [nd for nd in self._nodes() if nd is not self.root]


def _as_ids(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)
