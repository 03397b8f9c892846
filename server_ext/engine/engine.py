"""The embedded engine: one worker thread owns the model and the cache; HTTP handlers submit
:class:`~leyline.server.engine.request.Work` and wait on a future (streaming handlers also get
text through a callback). A request (`request.Request`) goes through five phases; the worker
admits one request at a time (phases 1-3 in :meth:`Engine._start`) and then interleaves the
decode steps of up to ``max_running`` requests round-robin (:meth:`Engine._step`), so a short
request is not starved by a long one:

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

A failing or cancelled request (the client went away) frees its private slots, releases its
locks and closes the session it opened, so it changes nothing. Everything lives in the
request's tenant's namespace (radix tree, content index, sessions; docs/security.md).
``self.lock`` is held for one phase or one decode step at a time; reads (``stats``,
``session_info``) take no lock. Refusals are :class:`~leyline.server.engine.request.EngineError`\\ s; the HTTP layer answers them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from leyline.errors import DirectiveError
from leyline.server.core.align import common_prefix_len
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
    Cancelled,
    EngineError,
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
from leyline.server.engine.sessions import SessionState, SessionTable, UnknownSession, session_key
from leyline.server.engine.store import KVStore, OutOfSlots

log = logging.getLogger("leyline.serve")

_Running = tuple[Request, Iterator[None]]


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
        max_session_ttl_s: float = float("inf"),
        max_sessions_per_tenant: int | None = None,
        max_running: int = 8,
        cache_block_tokens: int = 1,
        index_all_requests: bool = False,
    ) -> None:
        self.loaded = loaded
        self.store = store
        self.index = ContentIndex()
        self.tree = RadixTree(store, on_evict=self.index.drop_slots)
        self.sessions = SessionTable(self.tree, ttl_s=session_ttl_s, max_ttl_s=max_session_ttl_s)
        self.max_sessions_per_tenant = max_sessions_per_tenant or max_sessions
        self.max_running = max_running
        self.block = cache_block_tokens  # prefix reuse in whole blocks (docs/security.md)
        self.index_all_requests = index_all_requests
        self.inv_freq = inv_freq
        self.interleaved = interleaved
        self.rope_note = rope_note  # why splicing is off, when inv_freq is None
        self.content_reuse = content_reuse and inv_freq is not None
        self.max_sessions = max_sessions
        self.salt = loaded.name  # chunk keys: the model, then the tenant (see _salt)
        # the Triton splice reads layer addresses from a table built once per pool
        pointers = kv_pointers(store.k, store.v) if store.k[0].is_cuda else None
        self.materialize = Materializer(loaded, store, inv_freq, interleaved, pointers)
        self.seed = seed
        self.repair = repair  # the REPAIR window of directives that give none
        self.lock = threading.RLock()  # held by the worker per phase or step, and by session calls
        self._queue: queue.Queue[Work | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.running = 0  # requests admitted and decoding
        self._stopping = False
        self._others_running = False  # set while admitting next to running requests
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
        running: list[_Running] = []
        waiting: list[Work] = []  # their session has a request running: admitted after it
        deferred: list[Work] = []  # need room that only idle sessions' caches can give
        self._stopping = False
        while not self._stopping:
            if len(running) < self.max_running:
                work = deferred.pop(0) if deferred and not running else None
                work = work or self._take(waiting, block=not running and not deferred)
                if work is not None:
                    self._start(work, running, deferred)
            for item in list(running):
                self._step(item, running)
            self.running = len(running)
        for req, _ in running:  # stopping: fail what is left
            self._abort(req)
            req.work.future.set_exception(Overloaded("the engine stopped"))
        for work in waiting + deferred:
            work.future.set_exception(Overloaded("the engine stopped"))

    def _take(self, waiting: list[Work], *, block: bool) -> Work | None:
        """The next work to admit: a waiting one whose session is free, else the queue's next
        (parked in ``waiting`` while its session is busy). None: nothing now (or stop)."""
        for i, work in enumerate(waiting):
            if not self._session_busy(work):
                return waiting.pop(i)
        try:
            item = self._queue.get(block=block and not waiting)
        except queue.Empty:
            return None
        if item is None:  # stop()
            self._stopping = True
            return None
        if self._session_busy(item):
            waiting.append(item)
            return None
        return item

    def _session_busy(self, work: Work) -> bool:
        if work.leyline is None:
            return False
        key = session_key(work.leyline.session, work.tenant)
        return key in self.sessions and self.sessions.get(key).busy

    def _start(self, work: Work, running: list[_Running], deferred: list[Work]) -> None:
        """Phases 1-3 (open, plan, materialize), then the first decode step."""
        if not work.future.running() and not work.future.set_running_or_notify_cancel():
            return
        req = Request(work, work.leyline, marks={"start": time.perf_counter()})
        try:
            if work.cancelled.is_set():
                raise Cancelled("the client went away before the request started")
            with self.lock:
                self.sessions.expire()
                self._open(req)
                self._others_running = bool(running)
                try:
                    self._plan(req)
                    self.materialize(req)
                except BaseException:
                    self._abort(req)
                    raise
                finally:
                    self._others_running = False
            steps = decode(self.loaded, req, self._reserved(req), self.seed)
        except _Deferred:
            deferred.append(work)  # retried when nothing else runs
            return
        except BaseException as exc:  # the future carries it to the handler
            self._fail(work, exc)
            return
        item = (req, steps)
        running.append(item)
        self._step(item, running)

    def _step(self, item: _Running, running: list[_Running]) -> None:
        """One decode step of a running request; at its end, phase 5 (commit) and the answer."""
        req, steps = item
        try:
            with self.lock:
                try:
                    next(steps)
                    return  # more to decode
                except StopIteration:
                    pass
                except BaseException:
                    self._abort(req)
                    raise
                if req.finish_reason == "cancelled":
                    self._abort(req)
                    raise Cancelled("the client went away: the request was dropped")
                try:
                    self._commit(req)
                except BaseException:
                    self._abort(req)
                    raise
                self._release_locks(req.held)
                if req.session is not None:
                    req.session.busy = False
                result = self._finished(req)
        except BaseException as exc:
            _drop(running, item)
            self._fail(req.work, exc)
            return
        _drop(running, item)
        for observe in self.observers:
            observe(result)
        req.work.future.set_result(result)

    def _fail(self, work: Work, exc: BaseException) -> None:
        self.counters["failed"] += 1
        if not isinstance(exc, EngineError | DirectiveError | UnknownSession):
            log.error("request failed inside the engine", exc_info=exc)  # a bug: say where
        work.future.set_exception(exc)

    def _abort(self, req: Request) -> None:
        """Undo a request that will not complete: free its slots, release its locks, free its
        session, and close the session if this request opened it (nothing changes)."""
        self._release(req.held)
        if req.reserved.size:
            self.store.free(req.reserved)
            req.reserved = req.reserved[:0]
        if req.session is not None:
            req.session.busy = False
            if req.opened_session and req.session.key in self.sessions:
                self.sessions.close(req.session.key)

    def _reserved(self, req: Request) -> Callable[[int], np.ndarray]:
        """decode's slot source: the slots reserved for it in phase 2, one per fed token."""
        used = 0

        def take(n: int) -> np.ndarray:
            nonlocal used
            out = req.reserved[used : used + n]
            assert len(out) == n, "decode outgrew its reservation"
            used += n
            return out

        return take

    # ------------------------------------------------------------------ sessions
    def open_session(
        self, session_id: str, ttl_s: float | None = None, *, tenant: str = ""
    ) -> dict[str, Any]:
        with self.lock:
            self.sessions.expire()
            if not self._has_room(session_id, tenant):
                raise TooManySessions("too many open sessions")
            return self._session_info(self.sessions.open(session_id, ttl_s, tenant=tenant))

    def session_info(self, session_id: str, *, tenant: str = "") -> dict[str, Any]:
        # no lock: a read of one record, answered while requests decode
        return self._session_info(self.sessions.get(session_id, tenant))

    def close_session(self, session_id: str, *, tenant: str = "") -> dict[str, Any]:
        with self.lock:
            if self.sessions.get(session_id, tenant).busy:
                raise SessionBusy(f"session {session_id!r} has a request in flight")
            freed = self.sessions.close(session_id, tenant)
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
        # no lock: counters and sizes, answered while requests decode (may be one step stale)
        if True:
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
                "queue": self.queue_depth,
                "running": self.running,
                "counters": dict(self.counters),
                "splice": self.rope_note or "enabled",
            }

    # ------------------------------------------------------------------ request path
    def _open(self, req: Request) -> None:
        """Phase 1: the session, its version rules, and whether approximate KV may be used.
        The rules are checked before the session is opened: a refused first request leaves
        no session behind."""
        payload, tenant = req.payload, req.work.tenant
        if (
            payload is not None
            and payload.server_diff
            and not self._has_room(payload.session, tenant)
        ):
            req.notes.append("no room for another session: served without one")
            payload = req.payload = None
        if payload is None:
            return
        if not self._has_room(payload.session, tenant):
            raise TooManySessions("too many open sessions")
        key = session_key(payload.session, tenant)
        existing = self.sessions.get(key) if key in self.sessions else None
        current = existing.version if existing is not None else 0
        if existing is not None and existing.busy:
            raise SessionBusy(f"session {payload.session!r} has a request in flight")
        if payload.version is None:  # server-diff: the server is the source of truth
            req.version = current + 1
        elif payload.version <= current:
            raise StaleVersion(
                f"version {payload.version} is not newer than the session's {current}"
            )
        elif payload.base_version is not None and payload.base_version != current:
            raise StaleBaseVersion(
                f"base_version {payload.base_version} is stale: the session is at version {current}"
            )
        else:
            req.version = payload.version
        state = self.sessions.open(payload.session, tenant=tenant)
        req.opened_session = existing is None
        state.busy = True
        req.session = state
        req.approximate = payload.approximate and self.inv_freq is not None
        if payload.approximate and self.inv_freq is None:
            req.notes.append(f"approximate reuse is off: {self.rope_note}")

    def _has_room(self, session_id: str, tenant: str) -> bool:
        if session_key(session_id, tenant) in self.sessions:
            return True
        return (
            len(self.sessions) < self.max_sessions
            and self.sessions.count(tenant) < self.max_sessions_per_tenant
        )

    def _salt(self, tenant: str) -> str:
        """The content index's key salt: equal content of two tenants gets unrelated keys."""
        return f"{self.salt}\0{tenant}" if tenant else self.salt

    def _plan(self, req: Request) -> None:
        """Phase 2: directives, the cached prefix, fresh slots, the plan."""
        token_directives(self.tree, req)
        ids, payload, tenant = req.ids, req.payload, req.work.tenant
        owner = req.session.key if req.session is not None and req.approximate else None
        match = self.tree.match_prefix(ids, session=owner, tenant=tenant)
        if self.block > 1:  # reuse whole blocks only: cached_tokens says no more than that
            keep = min(match.length, len(ids) - 1)
            keep -= keep % self.block
            # ...except the prefix the session's own base shares with this prompt: the client
            # sent it before, and cutting it would only get it copied back through the
            # session's base (at shift 0) and reported approximate (demo: FORGET "spliced 10")
            if req.base is not None:
                own = common_prefix_len(ids, req.base[0].tokens)
                keep = max(keep, min(match.length, len(ids) - 1, own))
            if keep < match.length:
                match = self.tree.match_prefix(ids[:keep], session=owner, tenant=tenant)
        req.match = match
        self._lock(req.held, match.node)
        base = req.base if req.approximate else None
        if base is not None and base[1] is not None:
            self._lock(req.held, base[1])
        # FORGET: nothing at or after an edit is reused, moved content included
        use_index = (
            req.approximate and self.content_reuse
            and (payload is None or (payload.content_reuse and not payload.forgets))
        )  # fmt: skip
        # allocate before planning: eviction must not free a chunk the plan copies from; the
        # decode steps' slots too, so a request that starts also finishes (no 503 mid-stream)
        n_fresh = len(ids) - min(match.length, len(ids) - 1)
        n_decode = max(
            0, min(req.work.sampling.max_tokens, self.loaded.max_positions - len(ids)) - 1
        )
        slots = self._alloc(n_fresh + n_decode, req.held)  # n_fresh >= 1: the last token
        assert req.held.private[-1] is slots
        req.held.private[-1] = slots[:n_fresh]
        req.fresh, req.reserved = slots[:n_fresh], slots[n_fresh:]  # _abort frees reserved
        req.marks["match"] = time.perf_counter()
        req.plan = build_plan(
            ids,
            exact_len=match.length,
            exact_slots=match.slots,
            base=base[0] if base is not None else None,
            directives=req.directives if req.approximate else (),
            index=self.index if use_index else None,
            salt=self._salt(tenant),
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
        used = len(req.slots) - len(ids)
        fed = np.asarray(req.generated[:used], np.int64)
        served = np.concatenate([ids, fed])
        assert np.array_equal(req.slots[len(ids) :], req.reserved[:used])
        req.held.private.append(req.reserved[:used])
        self.store.free(req.reserved[used:])  # decode stopped early: the rest goes back
        req.reserved = req.reserved[:0]
        approx = approx_from(req.plan, req.match)
        owner = state.key if state is not None else None
        assert approx is None or owner is not None, "approximate KV needs a session"
        node = self.tree.insert(
            served, req.slots, approx_from=approx, session=owner, tenant=work.tenant
        )
        req.held.private.clear()  # the tree owns them now
        slots = self.tree.path_slots(node)  # insert may have freed duplicates of cached KV
        # only what opted in to approximate reuse is offered to it (unless the operator says)
        if self.content_reuse and (work.opted_in or self.index_all_requests):
            for chunk in chunk_spans(served, salt=self._salt(work.tenant)):
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
                tenant=state.tenant,
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
        (oldest first) so their cache becomes evictable too, but only when no other request
        is running: a request that would cost sessions their cache waits for the running ones
        (they free their slots) instead (:class:`_Deferred`)."""
        self.counters["evicted_tokens"] += self.tree.evict(n - self.store.num_free)
        if self.store.num_free >= n:
            return
        if self._others_running:
            raise _Deferred
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


class _Deferred(Exception):
    """Admission needs room only idle sessions' caches can give: wait for the running ones."""


def _drop(running: list[_Running], item: _Running) -> None:
    """Remove ``item`` by identity (a Request holds arrays: ``==`` is not defined on it)."""
    for i, other in enumerate(running):
        if other is item:
            del running[i]
            return


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
