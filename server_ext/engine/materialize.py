"""Phase 3 of a request: give every prompt token KV in a slot, as the plan says.

Exact runs keep their cached slots; spliced and chunk runs are copied into fresh slots and
their keys' rotary part turned by the position shift (the core's splice kernel, one launch for
all of them); recompute runs are prefilled with the model's own attention over the slots before
them. The last run ends the prompt (the planner always recomputes the last token), and its
:class:`Generation` keeps the model's cache so decoding never re-gathers the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from leyline.server.core.kernels.splice import KVPointers, splice_kv
from leyline.server.core.planner import Run
from leyline.server.engine.forward import Generation
from leyline.server.engine.model import LoadedModel
from leyline.server.engine.request import Request
from leyline.server.engine.store import KVStore

__all__ = ["Materializer"]


@dataclass(frozen=True)
class Materializer:
    """The model, the pool and how its keys rotate (``inv_freq`` None: splicing is off)."""

    loaded: LoadedModel
    store: KVStore
    inv_freq: torch.Tensor | None
    interleaved: bool
    pointers: KVPointers | None  # the Triton kernel's layer table, built once per pool

    def __call__(self, req: Request) -> None:
        """Fill ``req.slots``, ``logits`` (the last prompt token's) and ``generation``."""
        plan, ids, fresh = req.plan, req.ids, req.fresh
        assert plan is not None, "plan runs first"
        n = len(ids)
        slots = np.zeros(n, dtype=np.int64)
        cursor = 0
        for run in plan.runs:
            if run.kind == "exact":
                slots[run.start : run.end] = _sources(run)[0]
                continue
            slots[run.start : run.end] = fresh[cursor : cursor + len(run)]
            cursor += len(run)
        self._copy(plan.copy_runs(), slots)
        req.marks["splice"] = time.perf_counter()
        recompute = plan.recompute_runs()
        for run in recompute[:-1]:
            self._generation(slots[: run.start]).extend(
                *self._tensors(
                    ids[run.start : run.end], np.arange(run.start, run.end),
                    slots[run.start : run.end],
                ),
                logits_to_keep=1,
            )  # fmt: skip
        last = recompute[-1]
        assert last.end == n, "the planner always recomputes the last token"
        generation = self._generation(slots[: last.start])
        logits = generation.extend(
            *self._tensors(ids[last.start :], np.arange(last.start, n), slots[last.start :]),
            logits_to_keep=1,
        )
        req.slots, req.logits, req.generation = slots, logits[-1], generation

    def _copy(self, copies: tuple[Run, ...], slots: np.ndarray) -> None:
        if not copies:
            return
        assert self.inv_freq is not None, "the planner copies only when splicing is on"
        src = np.concatenate([_sources(r)[0] for r in copies])
        dst = np.concatenate([slots[r.start : r.end] for r in copies])
        delta = np.concatenate([np.arange(r.start, r.end) - _sources(r)[1] for r in copies])
        dev = self.store.k[0].device
        splice_kv(
            self.store.k, self.store.v,
            torch.from_numpy(src).to(dev), torch.from_numpy(dst).to(dev),
            torch.from_numpy(delta).to(dev),
            layout=self.store.layout, inv_freq=self.inv_freq, interleaved=self.interleaved,
            pointers=self.pointers,
        )  # fmt: skip
        if dev.type == "cuda":  # NOTE: only to time the phase; the forward is on-stream
            torch.cuda.synchronize(dev)

    def _generation(self, cached: np.ndarray) -> Generation:
        (cached_t,) = self._tensors(cached)
        return Generation(self.loaded, self.store, cached_slots=cached_t)

    def _tensors(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        dev = self.loaded.device
        return tuple(torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(dev) for a in arrays)


def _sources(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Donor slots and positions of an exact or copy run (the planner always sets both)."""
    assert run.src_slots is not None and run.src_positions is not None
    return run.src_slots, run.src_positions
