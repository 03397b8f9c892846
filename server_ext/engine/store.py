"""The embedded engine's KV pool: per-layer tensors in SGLang's layout plus a slot allocator.

Slots index the first dim of every layer tensor. Slot 0 is reserved padding (attention
kernels gather it for masked positions), so the ``capacity`` usable slots are
``1..capacity`` and each tensor has ``capacity + 1`` rows. The allocator is a stack of free
slot ids backed by one numpy array: ``alloc`` pops a vectorised slice, ``free`` pushes one, both
O(n) in the number of slots moved. A boolean ``in use`` mask catches double frees.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from leyline.server.core.layout import KVLayout

__all__ = ["KVStore", "OutOfSlots"]


class OutOfSlots(RuntimeError):
    """Raised by :meth:`KVStore.alloc` when fewer slots are free than asked for.

    The store is unchanged; evict cached tokens (``RadixTree.evict``) and retry.
    """

    def __init__(self, requested: int, free: int) -> None:
        self.requested = requested
        self.free = free
        super().__init__(
            f"asked for {requested} KV slots but only {free} are free; "
            f"evict {requested - free} cached tokens or raise the pool capacity"
        )


class KVStore:
    """Per-layer KV tensors and the allocator of their slots.

    ``k[l]`` has shape ``(capacity + 1, kv_heads, head_dim)``; ``v[l]`` has shape
    ``(capacity + 1, kv_heads, v_head_dim)``, and ``v`` is ``None`` for MLA pools (the latent
    and rotary parts share the K row, see :class:`KVLayout`).
    """

    def __init__(
        self,
        layout: KVLayout,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer):
            raise ValueError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 slot, got {capacity}")
        self.layout = layout
        self.dtype = dtype
        self.device = torch.device(device)
        self._capacity = int(capacity)
        rows = self._capacity + 1  # + reserved padding slot 0
        self.k: list[torch.Tensor] = [
            torch.zeros(rows, layout.kv_heads, layout.head_dim, dtype=dtype, device=self.device)
            for _ in range(layout.num_layers)
        ]
        self.v: list[torch.Tensor] | None = (
            [
                torch.zeros(
                    rows, layout.kv_heads, layout.v_head_dim, dtype=dtype, device=self.device
                )
                for _ in range(layout.num_layers)
            ]
            if layout.has_values
            else None
        )
        # Stack of free slots; the top is _stack[_top - 1]. Filled high-to-low so a fresh store
        # hands out 1, 2, 3, ... (contiguous slots make debugging dumps readable).
        self._stack = np.arange(self._capacity, 0, -1, dtype=np.int64)
        self._top = self._capacity
        self._in_use: npt.NDArray[np.bool_] = np.zeros(rows, dtype=np.bool_)

    @property
    def capacity(self) -> int:
        """Number of allocatable slots (slot 0 excluded)."""
        return self._capacity

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self._capacity - self._top

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one slot occupies across all layers (K and V)."""
        return self.layout.bytes_per_token(self.dtype.itemsize)

    def occupancy(self) -> float:
        """Fraction of slots in use, in ``[0, 1]``."""
        return self.num_used / self._capacity

    def alloc(self, n: int) -> npt.NDArray[np.int64]:
        """Take ``n`` free slots; returns them as an int64 array (length ``n``).

        Raises :class:`OutOfSlots` (store unchanged) when fewer than ``n`` are free.
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"alloc needs a non-negative int, got {n!r}")
        n = int(n)
        if n > self._top:
            raise OutOfSlots(n, self._top)
        out = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._in_use[out] = True
        return out

    def free(self, slots: np.ndarray | list[int] | torch.Tensor) -> None:
        """Return slots to the pool.

        Raises ValueError (store unchanged) for slot 0, out-of-range ids, a slot given twice,
        or a slot that is not allocated (double free).
        """
        arr = self._check_slots(slots)
        if arr.size == 0:
            return
        not_used = arr[~self._in_use[arr]]
        if not_used.size:
            raise ValueError(
                f"double free: {not_used.size} slot(s) are not allocated, e.g. {not_used[:8].tolist()}"
            )
        self._in_use[arr] = False
        self._stack[self._top : self._top + arr.size] = arr[::-1]
        self._top += arr.size

    def is_allocated(self, slots: np.ndarray | list[int] | torch.Tensor) -> npt.NDArray[np.bool_]:
        """Boolean mask: which of ``slots`` are currently allocated (ids must be in range)."""
        arr = _as_slot_array(slots)
        if arr.size and (arr.min() < 0 or arr.max() > self._capacity):
            raise ValueError(f"slot ids must lie in [0, {self._capacity}]")
        return self._in_use[arr].copy()

    def _check_slots(self, slots: np.ndarray | list[int] | torch.Tensor) -> npt.NDArray[np.int64]:
        arr = _as_slot_array(slots)
        if arr.size == 0:
            return arr
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 1 or hi > self._capacity:
            raise ValueError(
                f"slot ids must lie in [1, {self._capacity}] (slot 0 is reserved padding), "
                f"got min {lo}, max {hi}"
            )
        if np.unique(arr).size != arr.size:
            raise ValueError("the same slot appears more than once in one free() call")
        return arr

    def __repr__(self) -> str:
        return (
            f"KVStore({self.layout.kind}, layers={self.layout.num_layers}, "
            f"capacity={self._capacity}, used={self.num_used}, dtype={self.dtype})"
        )


def _as_slot_array(slots: np.ndarray | list[int] | torch.Tensor) -> npt.NDArray[np.int64]:
    if isinstance(slots, torch.Tensor):
        slots = slots.detach().cpu().numpy()
    arr = np.asarray(slots)
    if arr.ndim != 1:
        raise ValueError(f"slots must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"slots must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)
