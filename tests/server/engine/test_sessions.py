"""SessionTable: TTLs, node locking across versions, close/expire freeing approximate KV."""

from __future__ import annotations

import numpy as np
import pytest

from leyline.server.core.layout import KVLayout
from leyline.server.engine.radix import Node, RadixTree
from leyline.server.engine.sessions import SessionTable, UnknownSession
from leyline.server.engine.store import KVStore

LAYOUT = KVLayout(
    "mla", num_layers=2, kv_heads=1, head_dim=20, v_head_dim=0, rope_offset=12, rope_dim=8
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(ttl_s: float = 60.0) -> tuple[KVStore, RadixTree, SessionTable, FakeClock]:
    store = KVStore(LAYOUT, 200)
    tree = RadixTree(store)
    clock = FakeClock()
    return store, tree, SessionTable(tree, ttl_s=ttl_s, clock=clock), clock


def serve(
    store: KVStore, tree: RadixTree, toks: np.ndarray, session: str | None = None, approx=None
) -> Node:
    """What the engine does per request: match, allocate the rest, insert."""
    m = tree.match_prefix(toks, session=session)
    new = store.alloc(len(toks) - m.length)
    if m.approximate_length:
        approx = m.exact_length
    return tree.insert(toks, np.concatenate([m.slots, new]), approx_from=approx, session=session)


def ints(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 50_000, size=n)


def test_open_is_idempotent_and_refreshes_ttl() -> None:
    _, _, table, clock = make(ttl_s=30)
    s = table.open("s1")
    assert (s.id, s.version, s.node, s.busy, s.tokens.shape) == ("s1", 0, None, False, (0,))
    assert s.expires_at == 1030.0
    s.version = 4  # state the engine set
    clock.now = 1010.0
    again = table.open("s1")
    assert again is s and again.version == 4 and again.expires_at == 1040.0
    assert table.open("s1", ttl_s=5).expires_at == 1015.0
    assert table.open("s2", ttl_s=7).expires_at == 1017.0
    assert len(table) == 2 and table.ids() == ["s1", "s2"] and "s2" in table


@pytest.mark.parametrize(("sid", "ttl"), [("", None), (None, None), ("x", 0), ("x", -1.0)])
def test_open_rejects_bad_ids_and_ttls(sid: object, ttl: float | None) -> None:
    _, _, table, _ = make()
    with pytest.raises(ValueError):
        table.open(sid, ttl_s=ttl)  # type: ignore[arg-type]
    assert len(table) == 0


def test_table_rejects_bad_default_ttl() -> None:
    store = KVStore(LAYOUT, 4)
    with pytest.raises(ValueError, match="ttl_s"):
        SessionTable(RadixTree(store), ttl_s=0)


def test_unknown_session_is_a_keyerror_naming_the_id() -> None:
    _, _, table, _ = make()
    with pytest.raises(UnknownSession, match="nope") as info:
        table.get("nope")
    assert isinstance(info.value, KeyError) and info.value.session_id == "nope"
    assert "unknown session 'nope'" in str(info.value)
    for call in (lambda: table.close("nope"), lambda: table.update("nope", **_upd())):
        with pytest.raises(UnknownSession):
            call()


def _upd(**kw) -> dict:
    base = {"version": 1, "tokens": np.zeros(0, np.int64), "node": None, "spans": (), "hashes": ()}
    base.update(kw)
    return base


def test_update_locks_new_node_and_unlocks_old() -> None:
    rng = np.random.default_rng(7)
    store, tree, table, clock = make()
    table.open("s")
    t1 = ints(rng, 23)
    n1 = serve(store, tree, t1)
    table.update("s", version=1, tokens=t1, node=n1, spans=[(0, 10), (10, 23)], hashes=["a", "b"])
    assert tree.protected_tokens == 23 and tree.evict(1000) == 0
    t2 = np.concatenate([t1, ints(rng, 9)])
    n2 = serve(store, tree, t2)
    clock.now += 20
    st = table.update("s", version=2, tokens=t2, node=n2, spans=[(0, 32)], hashes=["c"])
    assert st.node is n2 and st.version == 2 and np.array_equal(st.tokens, t2)
    assert st.segment_spans == ((0, 32),) and st.segment_hashes == ("c",)
    assert st.expires_at == clock.now + 60
    assert tree.protected_tokens == 32 and n1.lock_ref == 1  # only via n2's path
    # an unrelated branch is evictable, the session's path is not
    other = serve(store, tree, ints(rng, 5))
    assert tree.evict(1000) == 5 and other.detached
    assert tree.match_prefix(t2).length == 32


def test_update_copies_tokens() -> None:
    store, tree, table, _ = make()
    table.open("s")
    toks = np.arange(5, 17)
    node = serve(store, tree, toks)
    table.update("s", version=3, tokens=toks, node=node, spans=(), hashes=())
    toks[:] = 0
    assert table.get("s").tokens[0] == 5


def test_update_accepts_a_node_ending_before_the_last_token() -> None:
    store, tree, table, _ = make()
    table.open("s")
    toks = np.arange(100, 140)
    node = serve(store, tree, toks[:-1])  # the last generated token has no KV yet
    table.update("s", version=1, tokens=toks, node=node, spans=(), hashes=())
    assert table.get("s").node is node and node.lock_ref == 1


def test_update_errors_leave_state_unchanged() -> None:
    rng = np.random.default_rng(11)
    store, tree, table, _ = make()
    table.open("s")
    t1 = ints(rng, 12)
    n1 = serve(store, tree, t1)
    table.update("s", version=5, tokens=t1, node=n1, spans=[(0, 12)], hashes=["h"])
    t2 = np.concatenate([t1, ints(rng, 4)])
    n2 = serve(store, tree, t2)
    unrelated = serve(store, tree, ints(rng, 6))
    bad = [
        ({"version": 5}, "newer"),
        ({"version": True}, "int"),
        ({"spans": [(0, 3)], "hashes": []}, "hashes"),
        ({"spans": [(0, 17)], "hashes": ["x"]}, "inside"),
        ({"spans": [(4, 8), (6, 9)], "hashes": ["x", "y"]}, "overlapping"),
        ({"spans": [(5, 3)], "hashes": ["x"]}, "ordered"),
        ({"node": unrelated}, "prefix"),
        ({"tokens": t2[:10], "spans": [(0, 10)]}, "prefix"),  # node deeper than tokens
        ({"tokens": t2.astype(np.float64)}, "integer"),
    ]
    for kw, msg in bad:
        args = {"version": 6, "tokens": t2, "node": n2, "spans": [(0, 16)], "hashes": ["z"]}
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            table.update("s", **args)
        st = table.get("s")
        assert st.version == 5 and st.node is n1 and np.array_equal(st.tokens, t1)
        assert st.segment_spans == ((0, 12),) and st.segment_hashes == ("h",)
        assert (n1.lock_ref, n2.lock_ref, tree.protected_tokens) == (1, 0, 12)


def test_close_unlocks_and_frees_only_its_approximate_kv() -> None:
    rng = np.random.default_rng(3)
    store, tree, table, _ = make()
    prefix = ints(rng, 16)
    serve(store, tree, prefix)
    seqs = {}
    for sid in ("a", "b"):
        table.open(sid)
        toks = np.concatenate([prefix, ints(rng, 7)])
        node = serve(store, tree, toks, session=sid, approx=16)  # spliced after the prefix
        assert node.approximate
        table.update(sid, version=1, tokens=toks, node=node, spans=(), hashes=())
        seqs[sid] = toks
    # approximate KV is invisible to others and to session=None
    assert tree.match_prefix(seqs["a"], session="b").length == 16
    assert tree.match_prefix(seqs["a"]).length == 16
    assert tree.match_prefix(seqs["a"], session="a").length == 23
    free_before = store.num_free
    assert table.close("a") == 7
    assert store.num_free == free_before + 7 and "a" not in table
    assert tree.match_prefix(seqs["a"], session="a").length == 16
    assert tree.match_prefix(seqs["b"], session="b").length == 23
    assert tree.protected_tokens == 16 + 7  # b's path still locked
    assert table.close("b") == 7
    assert tree.protected_tokens == 0 and tree.total_cached_tokens == 16
    assert store.num_free + tree.total_cached_tokens == store.capacity


def test_expire_closes_idle_sessions_but_not_busy_ones() -> None:
    store, tree, table, clock = make(ttl_s=10)
    table.open("old")
    table.open("busy").busy = True
    clock.now += 5
    table.open("new")
    node = serve(store, tree, np.arange(1, 9))
    table.update("old", version=1, tokens=np.arange(1, 9), node=node, spans=(), hashes=())
    assert table.expire() == []  # update refreshed "old"
    clock.now += 10.5
    assert sorted(table.expire()) == ["new", "old"]
    assert table.ids() == ["busy"] and tree.protected_tokens == 0
    table.get("busy").busy = False
    assert table.expire(now=clock.now + 100) == ["busy"] and len(table) == 0


def test_random_session_traffic_keeps_memory_invariant() -> None:
    rng = np.random.default_rng(99)
    store, tree, table, clock = make(ttl_s=50)
    system = ints(rng, 12)
    for _ in range(300):
        sid = f"s{int(rng.integers(5))}"
        op = rng.random()
        if op < 0.6:
            st = table.open(sid)
            base = st.tokens if st.tokens.size and rng.random() < 0.7 else system
            cut = int(rng.integers(0, len(base) + 1))
            toks = np.concatenate([base[:cut], ints(rng, int(rng.integers(1, 8)))])
            m = tree.match_prefix(toks, session=sid)
            need = len(toks) - m.length
            if need > store.num_free:
                tree.evict(need - store.num_free)
            if need > store.num_free:
                continue
            approx = m.exact_length if m.approximate_length else None
            if approx is None and rng.random() < 0.4:
                approx = int(rng.integers(m.length, len(toks) + 1))
            node = tree.insert(
                toks,
                np.concatenate([m.slots, store.alloc(need)]),
                approx_from=approx,
                session=sid,
            )
            table.update(
                sid,
                version=st.version + 1,
                tokens=toks,
                node=node,
                spans=[(0, len(toks))],
                hashes=["h"],
            )
        elif op < 0.75 and sid in table:
            table.close(sid)
        elif op < 0.9:
            clock.now += float(rng.uniform(0, 30))
            table.expire()
        else:
            tree.evict(int(rng.integers(1, 40)))
        assert store.num_free + tree.total_cached_tokens == store.capacity
        locked = {id(s.node) for s in map(table.get, table.ids()) if s.node is not None}
        for s in map(table.get, table.ids()):
            if s.node is not None:
                assert not s.node.detached and s.node.lock_ref >= 1
                assert np.array_equal(tree.path_tokens(s.node), s.tokens[: s.node.depth])
        # nothing but the live sessions' paths is protected
        on_paths = set()
        for s in map(table.get, table.ids()):
            nd = s.node
            while nd is not None and nd is not tree.root:
                on_paths.add(id(nd))
                nd = nd.parent
        assert {id(nd) for nd in tree.nodes() if nd.lock_ref} == on_paths
        assert locked <= on_paths
    for sid in table.ids():
        table.close(sid)
    assert tree.protected_tokens == 0
    assert not any(nd.approximate for nd in tree.nodes())
