"""KVStore: pool shapes in SGLang's layout and the slot allocator's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leyline.server.core.layout import KVLayout
from leyline.server.engine.store import KVStore, OutOfSlots

MHA = KVLayout(
    "mha", num_layers=3, kv_heads=5, head_dim=12, v_head_dim=7, rope_offset=2, rope_dim=6
)
MLA = KVLayout(
    "mla", num_layers=2, kv_heads=1, head_dim=40, v_head_dim=0, rope_offset=24, rope_dim=16
)


def test_mha_shapes_dtype_and_bytes_per_token() -> None:
    store = KVStore(MHA, 37, dtype=torch.bfloat16)
    assert len(store.k) == 3 and store.v is not None and len(store.v) == 3
    assert all(t.shape == (38, 5, 12) and t.dtype == torch.bfloat16 for t in store.k)
    assert all(t.shape == (38, 5, 7) and t.dtype == torch.bfloat16 for t in store.v)
    row_bytes = sum(t[0].numel() * t.element_size() for t in store.k + store.v)
    assert store.bytes_per_token == row_bytes == 3 * 5 * (12 + 7) * 2


def test_mla_has_no_value_buffer() -> None:
    store = KVStore(MLA, 11)
    assert store.v is None
    assert [tuple(t.shape) for t in store.k] == [(12, 1, 40)] * 2
    assert store.bytes_per_token == 2 * 40 * 4


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_capacity_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="capacity"):
        KVStore(MHA, bad)  # type: ignore[arg-type]


def test_alloc_hands_out_every_slot_but_zero() -> None:
    store = KVStore(MHA, 29)
    first = store.alloc(10)
    rest = store.alloc(19)
    assert first.dtype == np.int64 and rest.dtype == np.int64
    got = np.concatenate([first, rest])
    assert sorted(got.tolist()) == list(range(1, 30))
    assert store.num_free == 0 and store.num_used == 29 and store.occupancy() == 1.0
    assert store.alloc(0).shape == (0,)


def test_out_of_slots_leaves_state_unchanged() -> None:
    store = KVStore(MHA, 13)
    held = store.alloc(9)
    with pytest.raises(OutOfSlots, match=r"asked for 5 .* only 4 are free") as info:
        store.alloc(5)
    assert info.value.requested == 5 and info.value.free == 4
    assert isinstance(info.value, RuntimeError)
    assert store.num_free == 4 and store.is_allocated(held).all()
    rest = store.alloc(4)
    assert set(rest.tolist()).isdisjoint(held.tolist())


@pytest.mark.parametrize("bad", [-1, 1.0, None])
def test_alloc_rejects_bad_counts(bad: object) -> None:
    store = KVStore(MHA, 5)
    with pytest.raises(ValueError, match="non-negative int"):
        store.alloc(bad)  # type: ignore[arg-type]
    assert store.num_free == 5


def _snapshot(store: KVStore) -> tuple[int, list[bool]]:
    return store.num_free, store.is_allocated(np.arange(1, store.capacity + 1)).tolist()


@pytest.mark.parametrize(
    ("slots", "msg"),
    [
        ([0], "reserved padding"),
        ([18], "lie in"),
        ([-2], "lie in"),
        ([3, 3], "more than once"),
        ([[1, 2]], "1-D"),
        ([1.0], "integers"),
    ],
)
def test_free_rejects_bad_slots_and_changes_nothing(slots: list, msg: str) -> None:
    store = KVStore(MHA, 17)
    store.alloc(6)  # slots 1..6
    before = _snapshot(store)
    with pytest.raises(ValueError, match=msg):
        store.free(np.array(slots))
    assert _snapshot(store) == before


def test_double_free_is_an_error_and_changes_nothing() -> None:
    store = KVStore(MHA, 17)
    a = store.alloc(6)
    store.free(a[:2])
    before = _snapshot(store)
    with pytest.raises(ValueError, match="double free"):
        store.free(a[1:4])  # a[1] already free, a[2:4] still allocated
    assert _snapshot(store) == before
    assert store.is_allocated(a[2:4]).all()


def test_free_accepts_lists_and_tensors_and_recycles() -> None:
    store = KVStore(MHA, 8)
    a = store.alloc(8)
    store.free(torch.from_numpy(a[:3].copy()))
    store.free(a[3:5].tolist())
    store.free([])
    assert store.num_free == 5
    again = store.alloc(5)
    assert sorted(again.tolist()) == sorted(a[:5].tolist())


def test_random_alloc_free_keeps_invariants() -> None:
    rng = np.random.default_rng(1234)
    store = KVStore(MLA, 257)
    owned: set[int] = set()
    for _ in range(400):
        if rng.random() < 0.55:
            n = int(rng.integers(0, 40))
            if n > store.num_free:
                with pytest.raises(OutOfSlots):
                    store.alloc(n)
            else:
                got = store.alloc(n)
                assert np.unique(got).size == n and got.min(initial=1) >= 1
                assert owned.isdisjoint(got.tolist())
                owned.update(got.tolist())
        elif owned:
            pool = np.array(sorted(owned))
            pick = rng.choice(pool, size=int(rng.integers(1, len(pool) + 1)), replace=False)
            store.free(pick)
            owned.difference_update(pick.tolist())
        assert store.num_free + store.num_used == store.capacity
        assert store.num_used == len(owned)
        mask = store.is_allocated(np.arange(0, store.capacity + 1))
        assert not mask[0]
        assert set(np.flatnonzero(mask).tolist()) == owned
