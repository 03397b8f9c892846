"""The embedded engine: one worker thread owns the model and the cache; HTTP handlers submit
:class:`~leyline.server.engine.request.Work` and wait on a future (streaming handlers also get
text through a callback). A request (`request.Request`) goes through five phases, in
:meth:`Engine._serve`:

1. ``_open``: the session's version rules (segment payloads) or the server's next version
   (server-diff payloads); the session is marked busy;
2. ``_plan``: the client's edits as token directives (`planning`), the longest cached prefix
   in the radix tree (approximate nodes only for the session that owns them), fresh slots for
   everything else (allocated before planning: eviction must not free a chunk the plan copies
   from), and the core planner's exact / spliced / chunk / recompute decision per token;
3. `materialize`: copy + rotate spliced/chunk KV with the core's splice kernel, prefill the
   recompute runs with the model's own attention;
4. `decode`: sample until a stop, streaming text;
5. ``_commit``: insert the served sequence into the tree (approximate from the first reused
   non-prefix token on, owned by the session), index its exact chunks, move the session.

A failing request frees its private slots and releases its locks, so it changes nothing.
Refusals are :class:`~leyline.server.engine.request.EngineError`\\ s; the HTTP layer answers them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from leyline.server.core.chunking import chunk_spans
from leyline.server.core.index import ContentIndex
from leyline.server.core.kernels.splice import kv_pointers
from leyline.server.core.planner import DEFAULT_REPAIR, RepairWindow, build_plan
from leyline.server.engine.decode import decode
from leyline.server.engine.materialize import Materializer
from leyline.server.engine.model import LoadedModel
from leyline.server.engine.planning import approx_from, served_tokens, token_directives
from leyline.server.engine.radix import Node, RadixTree
from leyline.server.engine.request import (
    Finished,
    Held,
    KVCacheFull,
    Overloaded,
    Request,
    SamplingParams,
    SessionBusy,
    StaleBaseVersion,
    StaleVersion,
    TooManySessions,
    Work,
)
from leyline.server.engine.sessions import SessionState, SessionTable, UnknownSession
from leyline.server.engine.store import KVStore, OutOfSlots


class Engine:
    """Single-worker engine over one model and one KV store."""

    def __init__(
        self,
        loaded: LoadedModel,
        store: KVStore,
        *,
        inv_freq: torch.Tensor | None,
        interleaved: bool,
        content_reuse: bool = True,
        session_ttl_s: float = 600.0,
        max_sessions: int = 1024,
        max_queue: int = 256,
        seed: int = 0,
        rope_note: str | None = None,
        repair: RepairWindow = DEFAULT_REPAIR,
    ) -> None:
        self.loaded = loaded
        self.store = store
        self.index = ContentIndex()
        self.tree = RadixTree(store, on_evict=self.index.drop_slots)
        self.sessions = SessionTable(self.tree, ttl_s=session_ttl_s)
        self.inv_freq = inv_freq
        self.interleaved = interleaved
        self.rope_note = rope_note  # why splicing is off, when inv_freq is None
        self.content_reuse = content_reuse and inv_freq is not None
        self.max_sessions = max_sessions
        self.salt = loaded.name
        # the Triton splice reads layer addresses from a table built once per pool
        pointers = kv_pointers(store.k, store.v) if store.k[0].is_cuda else None
        self.materialize = Materializer(loaded, store, inv_freq, interleaved, pointers)
        self.seed = seed
        self.repair = repair  # the REPAIR window of directives that give none
        self.lock = threading.RLock()  # held by the worker per request and by session calls
        self._queue: queue.Queue[Work | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.counters: dict[str, int] = {
            "requests": 0,
            "failed": 0,
            "evicted_tokens": 0,
            "exact": 0,
            "inherited": 0,
            "spliced": 0,
            "chunk_reused": 0,
            "recomputed": 0,
        }
        self.observers: list[Callable[[Finished], None]] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="leyline-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, work: Work) -> Future[Finished]:
        try:
            self._queue.put_nowait(work)
        except queue.Full as exc:
            raise Overloaded("the engine's queue is full; retry later") from exc
        return work.future

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            if not work.future.set_running_or_notify_cancel():
                continue
            try:
                with self.lock:
                    result = self._serve(work)
            except BaseException as exc:  # the future carries it to the handler
                self.counters["failed"] += 1
                work.future.set_exception(exc)
                continue
            for observe in self.observers:
                observe(result)
            work.future.set_result(result)

    # ------------------------------------------------------------------ sessions
    def open_session(self, session_id: str, ttl_s: float | None = None) -> dict[str, Any]:
        with self.lock:
            self.sessions.expire()
            if session_id not in self.sessions and len(self.sessions) >= self.max_sessions:
                raise TooManySessions("too many open sessions")
            return self._session_info(self.sessions.open(session_id, ttl_s))

    def session_info(self, session_id: str) -> dict[str, Any]:
        with self.lock:
            return self._session_info(self.sessions.get(session_id))

    def close_session(self, session_id: str) -> dict[str, Any]:
        with self.lock:
            freed = self.sessions.close(session_id)
            return {"id": session_id, "closed": True, "approximate_tokens_freed": freed}

    def _session_info(self, state: SessionState) -> dict[str, Any]:
        return {
            "id": state.id,
            "version": state.version,
            "cached_tokens": len(state.tokens),
            "segments": len(state.segment_hashes),
            "expires_in_s": round(max(0.0, state.expires_at - time.monotonic()), 1),
        }

    def reset_cache(self) -> None:
        """Close every session and drop all cached KV and index entries (an empty cache, as
        after a restart; counters are kept). Waits for the request in flight, if any."""
        with self.lock:
            for session_id in self.sessions.ids():
                self.sessions.close(session_id)
            self.tree.reset()
            self.index.clear()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "kv": {
                    "capacity_tokens": self.store.capacity,
                    "used_tokens": self.store.num_used,
                    "free_tokens": self.store.num_free,
                    "cached_tokens": self.tree.total_cached_tokens,
                    "evictable_tokens": self.tree.evictable_tokens,
                    "protected_tokens": self.tree.protected_tokens,
                },
                "index_entries": len(self.index),
                "sessions": len(self.sessions),
                "counters": dict(self.counters),
                "splice": self.rope_note or "enabled",
            }

    # ------------------------------------------------------------------ request path
    def _serve(self, work: Work) -> Finished:
        req = Request(work, work.leyline, marks={"start": time.perf_counter()})
        self.sessions.expire()
        self._open(req)
        try:
            self._plan(req)
            self.materialize(req)
            decode(self.loaded, req, lambda n: self._alloc(n, req.held), self.seed)
            self._commit(req)
        except BaseException:
            self._release(req.held)
            raise
        finally:
            if req.session is not None:
                req.session.busy = False
        self._release_locks(req.held)
        return self._finished(req)

    def _open(self, req: Request) -> None:
        """Phase 1: the session, its version rules, and whether approximate KV may be used."""
        payload = req.payload
        if payload is not None and payload.server_diff and not self._has_room(payload.session):
            req.notes.append("no room for another session: served without one")
            payload = req.payload = None
        if payload is None:
            return
        if not self._has_room(payload.session):
            raise TooManySessions("too many open sessions")
        state = self.sessions.open(payload.session)
        if state.busy:
            raise SessionBusy(f"session {payload.session!r} has a request in flight")
        if payload.version is None:  # server-diff: the server is the source of truth
            req.version = state.version + 1
        elif payload.version <= state.version:
            raise StaleVersion(
                f"version {payload.version} is not newer than the session's {state.version}"
            )
        elif payload.base_version is not None and payload.base_version != state.version:
            raise StaleBaseVersion(
                f"base_version {payload.base_version} is stale: the session is at "
                f"version {state.version}"
            )
        else:
            req.version = payload.version
        state.busy = True
        req.session = state
        req.approximate = payload.approximate and self.inv_freq is not None
        if payload.approximate and self.inv_freq is None:
            req.notes.append(f"approximate reuse is off: {self.rope_note}")

    def _has_room(self, session_id: str) -> bool:
        return session_id in self.sessions or len(self.sessions) < self.max_sessions

    def _plan(self, req: Request) -> None:
        """Phase 2: directives, the cached prefix, fresh slots, the plan."""
        token_directives(self.tree, req)
        ids, payload = req.ids, req.payload
        owner = req.session.id if req.session is not None and req.approximate else None
        match = req.match = self.tree.match_prefix(ids, session=owner)
        self._lock(req.held, match.node)
        base = req.base if req.approximate else None
        if base is not None and base[1] is not None:
            self._lock(req.held, base[1])
        # FORGET: nothing at or after an edit is reused, moved content included
        use_index = (
            req.approximate and self.content_reuse
            and (payload is None or (payload.content_reuse and not payload.forgets))
        )  # fmt: skip
        # allocate before planning: eviction must not free a chunk the plan copies from
        req.fresh = self._alloc(len(ids) - min(match.length, len(ids) - 1), req.held)
        req.marks["match"] = time.perf_counter()
        req.plan = build_plan(
            ids,
            exact_len=match.length,
            exact_slots=match.slots,
            base=base[0] if base is not None else None,
            directives=req.directives if req.approximate else (),
            index=self.index if use_index else None,
            salt=self.salt,
            repair=self.repair,
        )
        req.outcomes = req.outcomes or req.plan.outcomes
        assert len(req.fresh) == len(ids) - req.plan.exact_tokens
        req.marks["plan"] = time.perf_counter()

    def _commit(self, req: Request) -> None:
        """Phase 5: hand the request's KV to the tree, index it, and move the session."""
        assert req.plan is not None and req.match is not None
        ids, work, state = req.ids, req.work, req.session
        # every slot holds KV of the served sequence: the prompt plus the generated tokens that
        # were fed back (the last sampled token never was)
        fed = np.asarray(req.generated[: len(req.slots) - len(ids)], np.int64)
        served = np.concatenate([ids, fed])
        approx = approx_from(req.plan, req.match)
        session_id = state.id if state is not None else None
        assert approx is None or session_id is not None, "approximate KV needs a session"
        node = self.tree.insert(served, req.slots, approx_from=approx, session=session_id)
        req.held.private.clear()  # the tree owns them now
        slots = self.tree.path_slots(node)  # insert may have freed duplicates of cached KV
        if self.content_reuse:
            for chunk in chunk_spans(served, salt=self.salt):
                if approx is not None and chunk.end > approx:
                    break  # index exact KV only
                self.index.add(
                    chunk.key,
                    served[chunk.start : chunk.end],
                    slots[chunk.start : chunk.end],
                    np.arange(chunk.start, chunk.end),
                )
        if state is not None and req.version is not None:
            self.sessions.update(
                state.id,
                version=req.version,
                tokens=served,
                node=node,
                spans=work.segment_spans if work.aligned else (),
                hashes=work.segment_hashes if work.aligned else (),
                prompt_len=len(ids),
            )

    def _finished(self, req: Request) -> Finished:
        assert req.plan is not None and req.match is not None
        tokens = served_tokens(req.plan, req.match)
        self.counters["requests"] += 1
        for key, value in tokens.to_wire().items():
            if key in self.counters:
                self.counters[key] += value
        now = time.perf_counter()
        return Finished(
            text=req.text,
            token_ids=req.generated,
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.ids),
            tokens=tokens,
            directives=req.outcomes,
            notes=req.notes,
            ttft_s=(req.ttft_at or now) - req.work.submitted_at,
            timings_ms=_phases(req.marks, req.work.submitted_at, req.ttft_at),
            latency_s=now - req.marks["start"],
            session=req.session.id if req.session is not None else None,
            version=req.version,
        )

    def _alloc(self, n: int, held: Held) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        try:
            slots = self.store.alloc(n)
        except OutOfSlots:
            self._make_room(n)
            try:
                slots = self.store.alloc(n)
            except OutOfSlots as exc:
                raise KVCacheFull(
                    f"the KV cache is full ({self.store.capacity} tokens, "
                    f"{self.tree.protected_tokens} locked by live sessions)"
                ) from exc
        held.private.append(slots)
        return slots

    def _make_room(self, n: int) -> None:
        """Evict unlocked LRU leaves; if that is not enough, idle sessions lose their locks
        (oldest first) so their cache becomes evictable too."""
        self.counters["evicted_tokens"] += self.tree.evict(n - self.store.num_free)
        if self.store.num_free >= n:
            return
        idle = [
            st
            for st in (self.sessions.get(i) for i in self.sessions.ids())
            if not st.busy and st.node is not None
        ]
        for state in sorted(idle, key=lambda st: st.expires_at):
            assert state.node is not None  # filtered above
            self.tree.unlock(state.node)
            state.node = None
            self.counters["evicted_tokens"] += self.tree.evict(n - self.store.num_free)
            if self.store.num_free >= n:
                return

    # ------------------------------------------------------------------ resources
    def _lock(self, held: Held, node: Node) -> None:
        self.tree.lock(node)
        held.locked.append(node)

    def _release_locks(self, held: Held) -> None:
        for node in held.locked:
            self.tree.unlock(node)
        held.locked.clear()

    def _release(self, held: Held) -> None:
        for slots in held.private:
            self.store.free(slots)
        held.private.clear()
        self._release_locks(held)


def _phases(marks: dict[str, float], submitted: float, ttft_at: float | None) -> dict[str, float]:
    """Milliseconds spent queued, matching (sessions, directives, radix tree, slots), planning,
    copying KV, and prefilling up to the first sampled token."""
    out = {
        "queue": marks["start"] - submitted,
        "match": marks["match"] - marks["start"],
        "plan": marks["plan"] - marks["match"],
        "splice": marks["splice"] - marks["plan"],
    }
    if ttft_at is not None:
        out["prefill"] = ttft_at - marks["splice"]
    return {k: round(v * 1000, 3) for k, v in out.items()}


__all__ = ["Engine", "Finished", "SamplingParams", "UnknownSession", "Work"]
