"""The embedded engine's request path: plan, move KV, prefill, decode, cache.

One worker thread owns the model and the cache; HTTP handlers submit :class:`Work` and wait on
a future (streaming handlers also get tokens through a callback). Per request:

1. map the client's segment directives to token directives over the session's last served
   sequence (only when the client's segments match the server's own segmentation);
2. match the longest cached prefix in the radix tree (approximate nodes only for the owner);
3. ask the core planner which tokens are exact, spliced, chunk-reused or recomputed;
4. copy + rotate spliced/chunk KV with the core's splice kernel into fresh slots, prefill the
   recompute runs with the model's own attention, decode;
5. insert the served sequence into the tree (approximate from the first reused non-prefix
   token on, owned by the session), index its chunks, and move the session to it.

A failing request frees its private slots and releases its locks, so it changes nothing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leyline.directives import Mode, validate_directives
from leyline.errors import DirectiveError
from leyline.protocol import DirectiveOutcome, Payload, TokenCounts, ignored_all
from leyline.server.core.align import align_edits
from leyline.server.core.chunking import chunk_spans
from leyline.server.core.index import ContentIndex
from leyline.server.core.kernels.splice import kv_pointers, splice_kv
from leyline.server.core.planner import CachedSequence, Plan, Run, TokenDirective, build_plan
from leyline.server.engine.forward import Generation, sample_next
from leyline.server.engine.model import LoadedModel
from leyline.server.engine.protocol import APIError
from leyline.server.engine.radix import Match, RadixTree
from leyline.server.engine.sessions import SessionTable, UnknownSession
from leyline.server.engine.store import KVStore, OutOfSlots


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Work:
    """One request, already tokenized and validated by the HTTP layer."""

    ids: np.ndarray
    sampling: SamplingParams
    segment_spans: tuple[tuple[int, int], ...] = ()
    segment_hashes: tuple[str, ...] = ()
    aligned: bool = False
    leyline: Payload | None = None
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future[Finished] = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    tokens: TokenCounts
    directives: tuple[DirectiveOutcome, ...]
    notes: list[str]
    ttft_s: float
    latency_s: float
    session: str | None = None
    version: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        return self.tokens.cached


@dataclass
class _Held:
    """Resources a request holds until it finishes or fails."""

    private: list[np.ndarray] = field(default_factory=list)  # slots not yet owned by the tree
    locked: list[Any] = field(default_factory=list)  # radix nodes


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
        self.pointers = kv_pointers(store.k, store.v) if store.k[0].is_cuda else None
        self.seed = seed
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
            raise APIError(
                503,
                "the engine's queue is full; retry later",
                code="overloaded",
                type="server_error",
            ) from exc
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
                raise APIError(429, "too many open sessions", code="too_many_sessions")
            return self._session_info(self.sessions.open(session_id, ttl_s))

    def session_info(self, session_id: str) -> dict[str, Any]:
        with self.lock:
            return self._session_info(self.sessions.get(session_id))

    def close_session(self, session_id: str) -> dict[str, Any]:
        with self.lock:
            freed = self.sessions.close(session_id)
            return {"id": session_id, "closed": True, "approximate_tokens_freed": freed}

    def _session_info(self, state: Any) -> dict[str, Any]:
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
        t0 = time.perf_counter()
        marks = {"start": t0}
        self.sessions.expire()
        ids = work.ids
        payload = work.leyline
        notes: list[str] = []
        state = None
        approx_ok = False
        if payload is not None and payload.server_diff and not self._has_room(payload):
            notes.append("no room for another session: served without one")
            payload = work.leyline = None
        version = None
        if payload is not None:
            state = self._begin_session(payload)
            # a server-diff payload leaves the versions to the server
            version = payload.version if payload.version is not None else state.version + 1
            approx_ok = payload.approximate and self.inv_freq is not None
            if payload.approximate and self.inv_freq is None:
                notes.append(f"approximate reuse is off: {self.rope_note}")
        held = _Held()
        try:
            token_directives, outcomes, base = self._token_directives(work, state, notes)
            session_id = state.id if state is not None else None
            match = self.tree.match_prefix(ids, session=session_id if approx_ok else None)
            self._lock(held, match.node)
            base_seq = None
            if base is not None and approx_ok:
                base_seq = base
                self._lock(held, base[1])
            # FORGET: nothing at or after an edit is reused, moved content included
            use_index = (
                approx_ok and self.content_reuse
                and (payload is None or (payload.content_reuse and not payload.forgets))
            )  # fmt: skip
            # allocate before planning: eviction must not free a chunk the plan copies from
            fresh = self._alloc(len(ids) - min(match.length, len(ids) - 1), held)
            marks["match"] = time.perf_counter()
            plan = build_plan(
                ids,
                exact_len=match.length,
                exact_slots=match.slots,
                base=base_seq[0] if base_seq else None,
                directives=token_directives if approx_ok else (),
                index=self.index if use_index else None,
                salt=self.salt,
            )
            outcomes = outcomes or plan.outcomes
            assert len(fresh) == len(ids) - plan.exact_tokens
            marks["plan"] = time.perf_counter()
            slots, logits, generation = self._materialize(plan, ids, fresh, marks)
            ttft_holder: list[float] = []
            gen_ids, text, reason, slots = self._decode(
                work, logits, generation, ids, slots, held, ttft_holder
            )
            approx_from = _approx_from(plan, match)
            self._commit(work, state, version, ids, gen_ids, slots, approx_from, held)
        except BaseException:
            self._release(held)
            raise
        finally:
            if state is not None:
                state.busy = False
        self._release_locks(held)
        # A matched prefix is exact only up to the tree's first approximate node (KV that
        # descends from a splice or a chunk reuse); the rest of it is inherited.
        exact = min(plan.exact_tokens, match.exact_length)
        tokens = TokenCounts(
            exact=exact,
            inherited=plan.exact_tokens - exact,
            spliced=plan.spliced_tokens,
            chunk_reused=plan.chunk_tokens,
            recomputed=plan.recomputed_tokens,
        )
        self.counters["requests"] += 1
        for key, value in tokens.to_wire().items():
            if key in self.counters:
                self.counters[key] += value
        now = time.perf_counter()
        return Finished(
            text=text,
            token_ids=gen_ids,
            finish_reason=reason,
            prompt_tokens=len(ids),
            tokens=tokens,
            directives=outcomes,
            notes=notes,
            ttft_s=(ttft_holder[0] if ttft_holder else now) - work.submitted_at,
            timings_ms=_phases(marks, work.submitted_at, ttft_holder),
            latency_s=now - t0,
            session=state.id if state is not None else None,
            version=version,
        )

    def _has_room(self, payload: Payload) -> bool:
        return payload.session in self.sessions or len(self.sessions) < self.max_sessions

    def _begin_session(self, payload: Payload) -> Any:
        if not self._has_room(payload):
            raise APIError(429, "too many open sessions", code="too_many_sessions")
        state = self.sessions.open(payload.session)
        if state.busy:
            raise APIError(
                409, f"session {payload.session!r} has a request in flight", code="session_busy"
            )
        if payload.version is None:  # server-diff: the server is the source of truth
            state.busy = True
            return state
        if payload.version <= state.version:
            raise APIError(
                400,
                f"version {payload.version} is not newer than the session's {state.version}",
                code="stale_version",
                param="leyline.version",
            )
        if payload.base_version is not None and payload.base_version != state.version:
            raise APIError(
                400,
                f"base_version {payload.base_version} is stale: the session is at "
                f"version {state.version}",
                code="stale_base_version",
                param="leyline.base_version",
            )
        state.busy = True
        return state

    def _token_directives(
        self, work: Work, state: Any, notes: list[str]
    ) -> tuple[
        list[TokenDirective], tuple[DirectiveOutcome, ...], tuple[CachedSequence, Any] | None
    ]:
        """Segment directives -> token directives over the session's last served sequence (or,
        for a server-diff payload, the token diff of that sequence against the request)."""
        payload = work.leyline
        if payload is None or state is None or state.node is None:
            if payload is not None and payload.directives:
                notes.append("directives ignored: the session has no cached base on this server")
                return [], ignored_all(len(payload.directives), "no cached base"), None
            return [], (), None
        base_match = self.tree.match_prefix(state.tokens, session=state.id)
        base = (
            CachedSequence(tokens=state.tokens[: base_match.length], slots=base_match.slots),
            base_match.node,
        )
        if payload.mode is not None:
            return (
                self._diff_directives(work, state, payload.mode, base_match.length, notes),
                (),
                base,
            )
        if not payload.directives:
            return [], (), base
        client_hashes = tuple(h for h, _ in payload.segments)
        if not work.aligned or client_hashes != work.segment_hashes:
            notes.append("directives ignored: the client's segments differ from the server's")
            return [], ignored_all(len(payload.directives), "segment hash mismatch"), base
        parsed = validate_directives(
            payload.directives, base_len=len(state.segment_spans), new_len=len(work.segment_spans)
        )
        out: list[TokenDirective] = []
        base_spans, new_spans = state.segment_spans, work.segment_spans
        base_prompt_end = base_spans[-1][1] if base_spans else 0
        for d in parsed:
            start = base_spans[d.start][0] if d.start < len(base_spans) else base_prompt_end
            end = base_spans[d.end - 1][1] if d.end > d.start else start
            k, length = d.replacement
            if length > k:
                replacement = work.ids[new_spans[k][0] : new_spans[length - 1][1]]
            else:
                replacement = work.ids[:0]
            if end > base_match.length:
                raise DirectiveError("span is beyond the cached base sequence")
            out.append(TokenDirective(start, end, np.asarray(replacement), d.mode))
        if base_match.length < len(state.tokens):
            notes.append("part of the session's base was evicted; directives cover what remains")
        return out, (), base

    def _diff_directives(
        self, work: Work, state: Any, mode: Mode, cached: int, notes: list[str]
    ) -> list[TokenDirective]:
        """Every edit the token diff finds inside the base prompt, in ``mode``."""
        al = align_edits(state.tokens, state.prompt_len, work.ids, (), default=mode.value)
        edits = [e for e in al.edits if e.end <= cached]
        if len(edits) < len(al.edits):
            notes.append("part of the session's base was evicted; edits cover what remains")
        return [
            TokenDirective(e.start, e.end, work.ids[e.new_start : e.new_end].copy(), mode)
            for e in edits
        ]

    def _alloc(self, n: int, held: _Held) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        try:
            slots = self.store.alloc(n)
        except OutOfSlots:
            self._make_room(n)
            try:
                slots = self.store.alloc(n)
            except OutOfSlots as exc:
                raise APIError(
                    503,
                    f"the KV cache is full ({self.store.capacity} tokens, "
                    f"{self.tree.protected_tokens} locked by live sessions)",
                    code="kv_cache_full",
                    type="server_error",
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

    def _materialize(
        self, plan: Plan, ids: np.ndarray, fresh: np.ndarray, marks: dict[str, float]
    ) -> tuple[np.ndarray, torch.Tensor, Generation]:
        """Slots for every prompt token, with spliced/chunk KV copied and recompute runs
        prefilled; returns the slots, the last token's logits and the generation state."""
        n = len(ids)
        slots = np.zeros(n, dtype=np.int64)
        cursor = 0
        for run in plan.runs:
            if run.kind == "exact":
                assert run.src_slots is not None  # the planner gives every copy run sources
                slots[run.start : run.end] = run.src_slots
                continue
            width = run.end - run.start
            slots[run.start : run.end] = fresh[cursor : cursor + width]
            cursor += width
        copies = plan.copy_runs()
        if copies:
            assert self.inv_freq is not None
            src = np.concatenate([_sources(r)[0] for r in copies])
            dst = np.concatenate([slots[r.start : r.end] for r in copies])
            delta = np.concatenate([np.arange(r.start, r.end) - _sources(r)[1] for r in copies])
            dev = self.store.k[0].device
            splice_kv(
                self.store.k,
                self.store.v,
                torch.from_numpy(src).to(dev),
                torch.from_numpy(dst).to(dev),
                torch.from_numpy(delta).to(dev),
                layout=self.store.layout,
                inv_freq=self.inv_freq,
                interleaved=self.interleaved,
                pointers=self.pointers,
            )
            if dev.type == "cuda":  # NOTE: only to time the phase; the forward is on-stream
                torch.cuda.synchronize(dev)
        marks["splice"] = time.perf_counter()
        recompute = plan.recompute_runs()
        for run in recompute[:-1]:
            self._generation(slots[: run.start]).extend(
                *self._tensors(
                    ids[run.start : run.end],
                    np.arange(run.start, run.end),
                    slots[run.start : run.end],
                ),
                logits_to_keep=1,
            )
        # the last run ends the prompt (the planner always recomputes the last token); its
        # Generation keeps the model's cache so decoding never re-gathers the pool
        last = recompute[-1]
        assert last.end == n, "the planner always recomputes the last token"
        generation = self._generation(slots[: last.start])
        logits = generation.extend(
            *self._tensors(ids[last.start :], np.arange(last.start, n), slots[last.start :]),
            logits_to_keep=1,
        )
        return slots, logits[-1], generation

    def _generation(self, cached: np.ndarray) -> Generation:
        (cached_t,) = self._tensors(cached)
        return Generation(self.loaded, self.store, cached_slots=cached_t)

    def _tensors(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        dev = self.loaded.device
        return tuple(torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(dev) for a in arrays)

    def _decode(
        self,
        work: Work,
        logits: torch.Tensor,
        generation: Generation,
        ids: np.ndarray,
        slots: np.ndarray,
        held: _Held,
        ttft: list[float],
    ) -> tuple[list[int], str, str, np.ndarray]:
        sp = work.sampling
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else self.seed)
        tokenizer = self.loaded.tokenizer
        out: list[int] = []
        emitted = ""
        reason = "length"
        all_slots = [slots]
        max_new = min(sp.max_tokens, self.loaded.max_positions - len(ids))
        if max_new < 1:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) leaves no room to generate within the "
                f"model's {self.loaded.max_positions} positions",
                code="context_length_exceeded",
            )
        for step in range(max_new):
            token = sample_next(logits, sp.temperature, sp.top_p, gen)
            if step == 0:
                ttft.append(time.perf_counter())
            if token in self.loaded.eos_ids:
                reason = "stop"
                break
            out.append(token)
            text = _decode(tokenizer, out)
            stop_at = _find_stop(text, sp.stop)
            if stop_at is not None:
                text = text[:stop_at]
                reason = "stop"
            if work.on_text is not None and not text.endswith("\ufffd"):
                hold = _stop_prefix_len(text, sp.stop) if stop_at is None else 0
                visible = text[: len(text) - hold]
                if len(visible) > len(emitted):
                    work.on_text(visible[len(emitted) :])
                    emitted = visible
            if stop_at is not None or work.cancelled.is_set():
                if work.cancelled.is_set():
                    reason = "cancelled"
                break
            if step == max_new - 1:
                break
            # feed the sampled token: its KV goes to a fresh slot
            position = len(ids) + len(out) - 1
            new_slot = self._alloc(1, held)
            logits = generation.decode(token, position, int(new_slot[0]))
            all_slots.append(new_slot)
        text = _decode(tokenizer, out)
        stop_at = _find_stop(text, sp.stop)
        if stop_at is not None:
            text = text[:stop_at]
        if work.on_text is not None and len(text) > len(emitted):
            work.on_text(text[len(emitted) :])
        return out, text, reason, np.concatenate(all_slots)

    def _commit(
        self,
        work: Work,
        state: Any,
        version: int | None,
        ids: np.ndarray,
        gen_ids: list[int],
        slots: np.ndarray,
        approx_from: int | None,
        held: _Held,
    ) -> None:
        """Hand the request's KV to the tree, index it, and move the session forward."""
        # every slot holds KV of the served sequence: the prompt plus the generated tokens that
        # were fed back (the last sampled token never was)
        served = np.concatenate([ids, np.asarray(gen_ids[: len(slots) - len(ids)], np.int64)])
        session_id = state.id if state is not None else None
        assert approx_from is None or session_id is not None, "approximate KV needs a session"
        node = self.tree.insert(served, slots, approx_from=approx_from, session=session_id)
        held.private.clear()  # the tree owns them now
        slots = self.tree.path_slots(node)  # insert may have freed duplicates of cached KV
        if self.content_reuse:
            for chunk in chunk_spans(served, salt=self.salt):
                if approx_from is not None and chunk.end > approx_from:
                    break  # index exact KV only
                self.index.add(
                    chunk.key,
                    served[chunk.start : chunk.end],
                    slots[chunk.start : chunk.end],
                    np.arange(chunk.start, chunk.end),
                )
        if state is not None and version is not None:
            self.sessions.update(
                state.id,
                version=version,
                tokens=served,
                node=node,
                spans=work.segment_spans if work.aligned else (),
                hashes=work.segment_hashes if work.aligned else (),
                prompt_len=len(ids),
            )

    # ------------------------------------------------------------------ resources
    def _lock(self, held: _Held, node: Any) -> None:
        self.tree.lock(node)
        held.locked.append(node)

    def _release_locks(self, held: _Held) -> None:
        for node in held.locked:
            self.tree.unlock(node)
        held.locked.clear()

    def _release(self, held: _Held) -> None:
        for slots in held.private:
            self.store.free(slots)
        held.private.clear()
        self._release_locks(held)


def _phases(marks: dict[str, float], submitted: float, ttft: list[float]) -> dict[str, float]:
    """Milliseconds spent queued, matching (sessions, directives, radix tree, slots), planning,
    copying KV, and prefilling up to the first sampled token."""
    out = {
        "queue": marks["start"] - submitted,
        "match": marks["match"] - marks["start"],
        "plan": marks["plan"] - marks["match"],
        "splice": marks["splice"] - marks["plan"],
    }
    if ttft:
        out["prefill"] = ttft[0] - marks["splice"]
    return {k: round(v * 1000, 3) for k, v in out.items()}


def _approx_from(plan: Plan, match: Match) -> int | None:
    """First position whose KV is approximate (reused from elsewhere, or after such a token)."""
    if match.exact_length < match.length:
        return match.exact_length
    for run in plan.runs:
        if run.kind in ("spliced", "chunk"):
            return run.start
    return None


def _sources(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Donor slots and positions of a copy run (the planner always sets both)."""
    assert run.src_slots is not None and run.src_positions is not None
    return run.src_slots, run.src_positions


def _decode(tokenizer: Any, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one string out
    return text


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could start a stop string (held back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


__all__ = ["Engine", "Finished", "SamplingParams", "UnknownSession", "Work"]
