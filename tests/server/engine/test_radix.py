"""RadixTree: prefix matching, splitting, slot ownership, approximate isolation, locks, LRU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leyline.server.core.layout import KVLayout
from leyline.server.engine.radix import RadixTree
from leyline.server.engine.store import KVStore

LAYOUT = KVLayout(
    "mha", num_layers=2, kv_heads=3, head_dim=10, v_head_dim=6, rope_offset=0, rope_dim=4
)


def make(capacity: int = 300, on_evict=None) -> tuple[KVStore, RadixTree]:
    store = KVStore(LAYOUT, capacity)
    return store, RadixTree(store, on_evict=on_evict)


def seq(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def put(store: KVStore, tree: RadixTree, toks: np.ndarray, **kw) -> np.ndarray:
    """Allocate fresh slots for ``toks``, write a per-token tag into layer 0, insert."""
    slots = store.alloc(len(toks))
    store.k[0][slots, 0, 0] = torch.as_tensor(np.asarray(toks, dtype=np.float32) + 0.5)
    tree.insert(toks, slots, **kw)
    return slots


def check(store: KVStore, tree: RadixTree) -> None:
    """Structural and memory invariants (no request holds private slots)."""
    nodes = tree.nodes()
    held = tree.held_slots()
    assert store.num_free + held.size == store.capacity
    assert store.is_allocated(held).all()
    all_slots = np.concatenate([nd.slots for nd in nodes]) if nodes else np.zeros(0, np.int64)
    assert np.array_equal(np.sort(all_slots), held)  # each held slot on exactly one node
    ev = sum(len(nd.tokens) for nd in nodes if nd.lock_ref == 0)
    pr = sum(len(nd.tokens) for nd in nodes if nd.lock_ref > 0)
    assert (tree.evictable_tokens, tree.protected_tokens) == (ev, pr)
    assert tree.total_cached_tokens == held.size
    for nd in nodes:
        assert len(nd.tokens) == len(nd.slots) > 0 and not nd.detached
        assert nd.parent is not None and nd.parent.children[nd.key] is nd
        assert nd.depth == nd.parent.depth + len(nd.tokens)
        assert nd.lock_ref >= sum(c.lock_ref for c in nd.children.values())
        if nd.parent.owner is not None:
            assert nd.owner == nd.parent.owner  # below approximate is approximate, same owner
    # slots still carry the tag written for the token they cache
    tags = store.k[0][held, 0, 0].numpy() if held.size else np.zeros(0)
    toks = np.concatenate([nd.tokens for nd in nodes]) if nodes else np.zeros(0)
    order = np.argsort(all_slots)
    assert np.array_equal(tags, toks[order].astype(np.float32) + 0.5)


def test_empty_tree_and_empty_query() -> None:
    store, tree = make()
    m = tree.match_prefix(seq(4, 5))
    assert m.length == 0 and m.node is tree.root and m.slots.shape == (0,)
    assert tree.match_prefix(seq()).length == 0
    check(store, tree)


def test_insert_then_match_and_split_on_partial_edge() -> None:
    store, tree = make()
    a = seq(7, 3, 9, 11, 2, 8)
    slots = put(store, tree, a)
    assert len(tree.nodes()) == 1
    m = tree.match_prefix(seq(7, 3, 9, 40, 41))
    assert m.length == 3 and m.exact_length == 3
    assert np.array_equal(m.slots, slots[:3])
    assert m.node.depth == 3 and len(tree.nodes()) == 2  # edge split at 3
    assert np.array_equal(tree.path_tokens(m.node), a[:3])
    full = tree.match_prefix(np.concatenate([a, seq(99)]))
    assert full.length == 6 and np.array_equal(full.slots, slots)
    assert np.array_equal(tree.path_slots(full.node), slots)
    check(store, tree)


def test_branching_insert_splits_and_both_branches_match() -> None:
    store, tree = make()
    s1 = put(store, tree, seq(1, 2, 3, 4, 5))
    s2 = put(store, tree, seq(1, 2, 3, 8, 9, 10, 11))
    assert sorted(len(nd.tokens) for nd in tree.nodes()) == [2, 3, 4]
    m = tree.match_prefix(seq(1, 2, 3, 8, 9, 10, 11))
    assert np.array_equal(m.slots, np.concatenate([s1[:3], s2[3:]]))
    assert not store.is_allocated(s2[:3]).any()  # caller's duplicates of the cached prefix freed
    assert tree.match_prefix(seq(1, 2, 3, 4, 5)).length == 5
    check(store, tree)


def test_insert_with_the_trees_own_slots_frees_nothing() -> None:
    freed: list[np.ndarray] = []
    store, tree = make(on_evict=lambda s: freed.append(s.copy()))
    base = put(store, tree, seq(5, 6, 7, 8))
    m = tree.match_prefix(seq(5, 6, 7, 8, 1, 2))
    extra = store.alloc(2)
    store.k[0][extra, 0, 0] = 1.5
    store.k[0][extra[1], 0, 0] = 2.5
    node = tree.insert(seq(5, 6, 7, 8, 1, 2), np.concatenate([m.slots, extra]))
    assert freed == [] and node.depth == 6
    assert np.array_equal(tree.path_slots(node), np.concatenate([base, extra]))
    check(store, tree)


def test_duplicate_slots_are_freed_through_on_evict() -> None:
    seen: list[np.ndarray] = []
    store, tree = make()
    tree.on_evict = lambda s: (seen.append(s.copy()), store.is_allocated(s).all())
    put(store, tree, seq(1, 2, 3))
    dup = put(store, tree, seq(1, 2, 3))  # fully cached: all three caller slots are freed
    assert len(seen) == 1 and np.array_equal(seen[0], dup)
    assert not store.is_allocated(dup).any()
    check(store, tree)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"approx_from": 1}, "owner session"),
        ({"approx_from": 9, "session": "s"}, "approx_from"),
        ({"approx_from": -1, "session": "s"}, "approx_from"),
    ],
)
def test_insert_argument_errors_change_nothing(kw: dict, msg: str) -> None:
    store, tree = make()
    put(store, tree, seq(1, 2))
    slots = store.alloc(3)
    free_before = store.num_free
    with pytest.raises(ValueError, match=msg):
        tree.insert(seq(1, 2, 3), slots, **kw)
    assert store.num_free == free_before and store.is_allocated(slots).all()
    assert tree.total_cached_tokens == 2


def test_insert_rejects_bad_slots_and_changes_nothing() -> None:
    store, tree = make(capacity=20)
    cached = put(store, tree, seq(1, 2, 3, 4))
    fresh = store.alloc(3)
    nodes_before = [(nd.depth, len(nd.tokens)) for nd in tree.nodes()]
    cases = [
        (seq(1, 2, 3), fresh[:2], "slots"),  # length mismatch
        (seq(9, 8), np.array([fresh[0], cached[0]]), "other positions"),  # owned elsewhere
        (seq(1, 9), np.array([cached[1], fresh[0]]), "other positions"),  # shifted tree slot
        (seq(9, 8), np.array([fresh[0], fresh[0]]), "twice"),
        (seq(9, 8), np.array([fresh[0], 19]), "not allocated"),
        (seq(9, 8), np.array([0, fresh[0]]), "lie in"),
        (seq(9, 8), np.array([1.0, 2.0]), "integers"),
    ]
    for toks, slots, msg in cases:
        with pytest.raises(ValueError, match=msg):
            tree.insert(toks, slots)
    assert [(nd.depth, len(nd.tokens)) for nd in tree.nodes()] == nodes_before
    assert store.is_allocated(fresh).all() and store.num_used == 7


def test_approximate_nodes_only_match_their_session() -> None:
    store, tree = make()
    p = seq(10, 11, 12, 13)
    full = np.concatenate([p, seq(20, 21, 22)])
    put(store, tree, p)
    m = tree.match_prefix(full)
    extra = store.alloc(3)
    store.k[0][extra, 0, 0] = torch.tensor([20.5, 21.5, 22.5])
    node = tree.insert(full, np.concatenate([m.slots, extra]), approx_from=4, session="a")
    assert node.approximate and node.owner == "a" and not node.parent.approximate
    for who in (None, "b"):
        other = tree.match_prefix(full, session=who)
        assert other.length == 4 and not other.node.approximate
    mine = tree.match_prefix(full, session="a")
    assert (mine.length, mine.exact_length, mine.approximate_length) == (7, 4, 3)
    assert mine.node is node
    check(store, tree)


def test_same_tokens_cached_exact_and_approximate_side_by_side() -> None:
    store, tree = make()
    toks = seq(3, 1, 4, 1, 5, 9, 2, 6)
    exact = put(store, tree, toks)
    approx = put(store, tree, toks, approx_from=3, session="s")  # copies, not merged
    assert store.is_allocated(approx[3:]).all()  # kept: a separate approximate node
    assert not store.is_allocated(approx[:3]).any()  # exact prefix was cached: freed
    assert tree.total_cached_tokens == 8 + 5
    m = tree.match_prefix(toks, session="s")  # tie: the exact copy wins
    assert m.exact_length == 8 and np.array_equal(m.slots, exact)
    # when the approximate branch goes further, it wins
    longer = np.concatenate([toks, seq(7, 7)])
    put(store, tree, longer[:3], approx_from=3, session="s")  # no-op: nothing approximate
    tail = store.alloc(2)
    store.k[0][tail, 0, 0] = 7.5
    s_path = tree.match_prefix(toks, session="s")
    assert s_path.exact_length == 8
    node = tree.insert(
        longer, np.concatenate([exact[:3], approx[3:], tail]), approx_from=3, session="s"
    )
    m2 = tree.match_prefix(longer, session="s")
    assert (m2.length, m2.exact_length) == (10, 3) and m2.node is node
    assert tree.match_prefix(longer).length == 8
    check(store, tree)


def test_approximate_tail_chooses_latest_branch_on_tie() -> None:
    store, tree = make()
    toks = seq(1, 2, 3, 4, 5, 6)
    put(store, tree, toks[:4])
    put(store, tree, toks, approx_from=2, session="s")
    put(store, tree, toks, approx_from=4, session="s")
    m = tree.match_prefix(toks, session="s")
    assert (m.length, m.exact_length) == (6, 4)
    check(store, tree)


def test_lock_protects_from_eviction_and_counts_follow() -> None:
    store, tree = make()
    put(store, tree, seq(1, 2, 3, 4))
    put(store, tree, seq(1, 2, 7, 8, 9))
    m = tree.match_prefix(seq(1, 2, 7, 8, 9))
    tree.lock(m.node)
    tree.lock(m.node)
    assert tree.protected_tokens == 5 and tree.evictable_tokens == 2
    assert tree.evict(100) == 2  # only the unlocked [3, 4] branch
    assert tree.match_prefix(seq(1, 2, 3)).length == 2
    tree.unlock(m.node)
    assert tree.evict(100) == 0
    tree.unlock(m.node)
    with pytest.raises(ValueError, match="not locked"):
        tree.unlock(m.node)
    assert tree.evictable_tokens == 5 and tree.protected_tokens == 0
    assert tree.evict(1) == 3  # the whole [7, 8, 9] leaf goes
    assert tree.evict(1) == 2  # its parent became a leaf
    with pytest.raises(ValueError, match="evicted"):
        tree.lock(m.node)
    check(store, tree)
    assert store.num_free == store.capacity


def test_split_keeps_locks_and_node_identity() -> None:
    store, tree = make()
    put(store, tree, seq(*range(10, 20)))
    node = tree.match_prefix(seq(*range(10, 20))).node
    tree.lock(node)
    mid = tree.match_prefix(seq(10, 11, 12, 13, 99)).node  # splits the locked edge
    assert node.depth == 10 and mid.depth == 4 and node.parent is mid
    assert mid.lock_ref == 1 and tree.protected_tokens == 10
    assert tree.evict(10) == 0
    tree.unlock(node)
    assert tree.evictable_tokens == 10
    check(store, tree)


def test_evict_is_lru_and_cascades() -> None:
    order: list[int] = []
    store, tree = make()
    tree.on_evict = lambda s: order.append(int(store.k[0][s[0], 0, 0]))
    put(store, tree, seq(100, 1, 1))
    put(store, tree, seq(200, 2, 2))
    put(store, tree, seq(300, 3, 3))
    put(store, tree, seq(300, 3, 3, 4, 4))
    assert order == [300]  # the 4th insert freed its duplicate copy of [300, 3, 3]
    order.clear()
    tree.match_prefix(seq(100, 1, 1, 5))  # 100 becomes most recent
    assert tree.evict(3) == 3 and order == [200]
    assert tree.evict(1) == 2 and order == [200, 4]  # leaf of the 300 branch
    assert tree.evict(4) == 6 and order == [200, 4, 300, 100]  # cascade then the touched one
    assert tree.total_cached_tokens == 0 and store.num_free == store.capacity
    with pytest.raises(ValueError, match=">= 0"):
        tree.evict(-1)


def test_insert_touches_and_partial_match_leaves_the_unused_tail_old() -> None:
    store, tree = make()
    put(store, tree, seq(1, 1, 1, 1))
    put(store, tree, seq(2, 2))
    put(store, tree, seq(1, 1, 1, 1))  # re-insert touches [1 x4]: [2, 2] is now the oldest
    assert tree.evict(1) == 2 and tree.match_prefix(seq(2, 2)).length == 0
    put(store, tree, seq(3, 3, 3))
    tree.match_prefix(seq(1, 1, 9))  # splits [1 x4]; only the matched [1, 1] is touched
    assert tree.evict(1) == 2  # the untouched lower half [1, 1] goes before [3, 3, 3]
    assert tree.match_prefix(seq(1, 1, 1)).length == 2
    assert tree.match_prefix(seq(3, 3, 3)).length == 3
    check(store, tree)


def test_on_evict_runs_before_slots_are_freed() -> None:
    store, tree = make()
    seen: list[bool] = []
    tree.on_evict = lambda s: seen.append(bool(store.is_allocated(s).all()))
    put(store, tree, seq(1, 2, 3))
    tree.evict(3)
    assert seen == [True]


def test_drop_session_frees_only_its_unlocked_approximate_nodes() -> None:
    store, tree = make()
    base = seq(1, 2, 3)
    put(store, tree, base)
    put(store, tree, np.concatenate([base, seq(4, 5)]), approx_from=3, session="a")
    put(store, tree, np.concatenate([base, seq(4, 5, 6)]), approx_from=3, session="b")
    put(store, tree, np.concatenate([base, seq(7, 8)]), approx_from=3, session="a")
    locked = tree.match_prefix(np.concatenate([base, seq(7, 8, 9)]), session="a").node
    tree.lock(locked)
    assert tree.drop_session("a") == 2  # [4, 5]; the locked [7, 8] stays
    assert tree.match_prefix(np.concatenate([base, seq(4, 5)]), session="a").length == 3
    assert tree.match_prefix(np.concatenate([base, seq(4, 5, 6)]), session="b").length == 6
    assert tree.match_prefix(np.concatenate([base, seq(7, 8)]), session="a").length == 5
    tree.unlock(locked)
    assert tree.drop_session("a") == 2 and tree.drop_session("zzz") == 0
    assert tree.total_cached_tokens == 6
    check(store, tree)


def test_reset_frees_everything_but_refuses_while_locked() -> None:
    store, tree = make()
    put(store, tree, seq(1, 2, 3))
    put(store, tree, seq(1, 2, 3, 4), approx_from=3, session="x")
    node = tree.match_prefix(seq(1, 2)).node
    tree.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        tree.reset()
    assert tree.total_cached_tokens == 4
    tree.unlock(node)
    tree.reset()
    assert tree.total_cached_tokens == 0 and store.num_free == store.capacity
    assert tree.match_prefix(seq(1, 2, 3)).length == 0
    with pytest.raises(ValueError, match="evicted or dropped"):
        tree.lock(node)
    check(store, tree)


def _visible_best(tree: RadixTree, q: np.ndarray, session: str | None) -> int:
    best = 0
    for nd in tree.nodes():
        owners, cur = set(), nd
        while cur is not tree.root:
            owners.add(cur.owner)
            cur = cur.parent
        if owners <= {None, session}:
            path = tree.path_tokens(nd)
            m = min(len(path), len(q))
            diff = np.flatnonzero(path[:m] != q[:m])
            best = max(best, int(diff[0]) if diff.size else m)
    return best


def test_random_operations_keep_invariants() -> None:
    rng = np.random.default_rng(20240607)
    store, tree = make(capacity=160)
    sessions = [None, "a", "b"]
    locks: list = []
    stems = [rng.integers(0, 5, size=int(rng.integers(1, 12))) for _ in range(6)]
    recent: list[tuple[str | None, np.ndarray]] = []
    for _ in range(500):
        tail = rng.integers(0, 3, size=int(rng.integers(0, 7)))
        if recent and rng.random() < 0.5:  # a session comes back to its own sequence
            who, stem = recent[int(rng.integers(len(recent)))]
            q = np.concatenate([stem[: int(rng.integers(1, len(stem) + 1))], tail])
        else:
            who = sessions[int(rng.integers(3))]
            q = np.concatenate([stems[int(rng.integers(len(stems)))], tail])
        op = rng.random()
        if op < 0.45:
            m = tree.match_prefix(q, session=who)
            assert m.length == _visible_best(tree, q, who)
            assert np.array_equal(tree.path_tokens(m.node), q[: m.length])
            assert np.array_equal(m.slots, tree.path_slots(m.node))
            assert all(nd.owner in (None, who) for nd in _path(tree, m.node))
            need = len(q) - m.length
            if need > store.num_free:
                tree.evict(need - store.num_free)
            if need <= store.num_free:
                new = store.alloc(need)
                store.k[0][new, 0, 0] = torch.as_tensor(q[m.length :].astype(np.float32) + 0.5)
                approx = None  # approximate KV starts where the match's approximate part does
                if who is not None and m.approximate_length:
                    approx = m.exact_length
                elif who is not None and rng.random() < 0.7:
                    approx = int(rng.integers(m.length, len(q) + 1))
                node = tree.insert(
                    q, np.concatenate([m.slots, new]), approx_from=approx, session=who
                )
                assert np.array_equal(tree.path_tokens(node), q)
                recent = [*recent[-7:], (who, q)]
                if rng.random() < 0.3:
                    tree.lock(node)
                    locks.append(node)
        elif op < 0.52 and who is None and len(q) <= store.num_free:  # recomputed: dups freed
            fresh = store.alloc(len(q))
            store.k[0][fresh, 0, 0] = torch.as_tensor(q.astype(np.float32) + 0.5)
            node = tree.insert(q, fresh)
            assert np.array_equal(tree.path_tokens(node), q)
            assert np.array_equal(store.is_allocated(fresh), tree.path_slots(node) == fresh)
        elif op < 0.6 and locks:
            tree.unlock(locks.pop(int(rng.integers(len(locks)))))
        elif op < 0.8:
            tree.evict(int(rng.integers(0, 30)))
        elif op < 0.85:
            tree.drop_session(["a", "b"][int(rng.integers(2))])
        elif not locks and rng.random() < 0.1:
            tree.reset()
        check(store, tree)
    for node in locks:
        tree.unlock(node)
    tree.evict(10**6)
    assert tree.total_cached_tokens == 0 and store.num_free == store.capacity


def _path(tree: RadixTree, node) -> list:
    out = []
    while node is not tree.root:
        out.append(node)
        node = node.parent
    return out
