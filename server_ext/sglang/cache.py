"""`LeylineRadixCache`: SGLang's RadixCache extended with directive splices and chunk reuse.

Approximate KV (spliced, chunk-reused, or computed after either) lives in its own namespace
of the tree (``extra_key + APPROX_SUFFIX``): SGLang never shares nodes across extra keys, so it
can never be matched by a request that did not opt in, and the plain namespace holds only KV
equal to a fresh prefill. On the first ``match_prefix`` of a request that opts in
(``approximate``), the plain and the approximate match are both taken:

1. plan: the core planner places the session's base sequence (AMORTIZE directives, moved
   spans) and the content index's chunks after the longer match;
2. a request that inherits approximate KV (its approximate match is longer) or whose plan
   copies moves to the approximate namespace; any other is served by SGLang's own path in the
   plain namespace, and its KV stays exact for the requests after it. A FORGET request whose
   approximate match runs past its edit is served exact too;
3. seed: in the approximate namespace, a longer plain match is copied in (delta 0) and its
   node marked exact: the request's ``exact`` tokens are those, the rest it matched there
   is ``inherited``;
4. the match extends through the plan's copy runs at its end and stops at the first recompute
   window, whose end is recorded for the prefill adder hooks
   (:mod:`leyline.server.sglang.windows`); the extension is allocated (evicting when the pool
   is full, donors locked), filled by the core splice kernel (copy + rotate the rotary part by
   per-token delta) and inserted, so the next ``match_prefix`` call (SGLang makes several per
   request) finds it as a cached prefix.

After SGLang cached a prefilled window (0.5.16 ``cache_unfinished_req``, 0.5.23
``checkpoint``; see :mod:`leyline.server.sglang.compat`), the cache plans again from the
window's end (steps 1 and 4) and appends the copy run to the request's prefix. Per-request
state and the accounting live in :mod:`leyline.server.sglang.request_state`.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from leyline.directives import MAX_WINDOW, Mode
from leyline.errors import PayloadError
from leyline.protocol import Payload
from leyline.server.core.align import Alignment, align_edits, moved_spans
from leyline.server.core.index import ContentIndex
from leyline.server.sglang import compat
from leyline.server.sglang.pool import PoolBinding, PoolSplicer
from leyline.server.sglang.request_state import RequestState
from leyline.server.sglang.windows import WINDOW_ATTR, Step, next_step

__all__ = ["APPROX_SUFFIX", "LeylineCacheConfig", "LeylineRadixCache", "tenant_of"]

compat.require()  # an unsupported SGLang is refused here, naming the supported versions

logger = logging.getLogger(__name__)

APPROX_SUFFIX = "\x1eleyline:approx"
_STATE_ATTR = "_leyline_state"
_PAYLOAD_ATTR = "_leyline_payload"
_SEEDED_ATTR = "_leyline_seeded"  # on approximate-namespace nodes copied from the plain one


@dataclass(frozen=True, slots=True)
class LeylineCacheConfig:
    """Knobs of the Leyline cache (defaults are the published parameters)."""

    content_reuse: bool = True
    max_sessions: int = 4096
    merge_gap: int = 16
    kernel_impl: str = "auto"
    min_copy_run: int = 256  # shorter copy runs behind a window are recomputed
    max_windows: int = 8  # recompute windows (extra prefill rounds) per request
    min_moved_run: int = 32  # moved spans shorter than this are left to the content index
    verify_splices: bool = False  # check each splice against the core's torch rotate (slow)
    repair_window: int | None = None  # REPAIR's default window (tokens); None: DEFAULT_REPAIR
    # Donation to content reuse: False (default) indexes only requests that opted in (a payload
    # with approximate and content_reuse true); True indexes every request, within its tenant.
    index_all_requests: bool = False

    def __post_init__(self) -> None:
        if self.min_copy_run < 1 or self.max_windows < 0 or self.min_moved_run < 8:
            raise ValueError(
                "need min_copy_run >= 1, max_windows >= 0 and min_moved_run >= 8, got "
                f"{self.min_copy_run}, {self.max_windows}, {self.min_moved_run}"
            )
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.merge_gap < 0:
            raise ValueError(f"merge_gap must be >= 0, got {self.merge_gap}")
        if self.kernel_impl not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_impl must be auto|torch|triton, got {self.kernel_impl!r}")
        if self.repair_window is not None and not 0 <= self.repair_window <= MAX_WINDOW:
            raise ValueError(
                f"repair_window must be 0..{MAX_WINDOW} tokens, got {self.repair_window}"
            )

    @property
    def repair(self) -> Any:
        """The planner's default REPAIR window (a core `RepairWindow`)."""
        from leyline.server.core.planner import DEFAULT_REPAIR, RepairWindow

        return DEFAULT_REPAIR if self.repair_window is None else RepairWindow(self.repair_window)


@dataclass(frozen=True, slots=True)
class _Planned:
    """A plan's next step from ``exact_len`` and the base it copies from (a `_base` triple):
    valid while the match length and the eviction count are unchanged."""

    exact_len: int
    evictions: int
    step: Step
    base: tuple[Any, TreeNode | None, Any]

    @property
    def copies(self) -> bool:
        """Whether the request will be served approximate KV (copies now or behind a window)."""
        return len(self.step) > 0 or self.step.window_end is not None


class _Sessions:
    """Per-session token sequences by version (the base a later request's directives edit),
    keyed by (tenant, session id): a session id of another tenant names an unrelated session,
    so nothing of it (tokens, versions) is reachable from there."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_id: OrderedDict[tuple[str, str], dict[int, tuple[np.ndarray, int]]] = OrderedDict()

    def record(
        self, tenant: str, session: str, version: int, tokens: Sequence[int], prompt_len: int
    ) -> None:
        versions = self._by_id.setdefault((tenant, session), {})
        self._by_id.move_to_end((tenant, session))
        versions[version] = (_ids(tokens).copy(), prompt_len)
        for old in sorted(versions)[:-2]:  # a request edits the latest committed version
            del versions[old]
        while len(self._by_id) > self._capacity:
            self._by_id.popitem(last=False)

    def get(self, tenant: str, session: str, version: int) -> tuple[np.ndarray, int] | None:
        return self._by_id.get((tenant, session), {}).get(version)

    def latest(self, tenant: str, session: str) -> int | None:
        """The session's newest recorded version (a server-diff payload edits it)."""
        versions = self._by_id.get((tenant, session))
        return max(versions) if versions else None

    def drop(self, tenant: str, session: str) -> bool:
        return self._by_id.pop((tenant, session), None) is not None

    def clear(self) -> None:
        self._by_id.clear()

    def __len__(self) -> int:
        return len(self._by_id)


class LeylineRadixCache(compat.Lifecycle, RadixCache):
    """SGLang's `RadixCache` plus AMORTIZE/FORGET directives and content-addressed reuse.

    Requests without a Leyline payload (or with ``approximate: false``) take exactly
    SGLang's code path; so do the lookups of a request that uses no approximate KV, which
    only adds its accounting and its session version.
    """

    def __init__(
        self,
        params: CacheInitParams,
        binding: PoolBinding | None = None,
        config: LeylineCacheConfig = LeylineCacheConfig(),
    ) -> None:
        # Set before super().__init__, which calls reset().
        self.leyline_config = config
        self.binding = binding
        self.index = ContentIndex()
        self.sessions = _Sessions(config.max_sessions)
        self.splicer = (
            None if binding is None
            else PoolSplicer(binding, config.kernel_impl, verify=config.verify_splices)
        )  # fmt: skip
        self._evictions = 0
        self._evicted: list[torch.Tensor] = []  # values of evicted leaves, see `_index`
        self._staged: list[tuple[torch.Tensor, Any]] = []  # their host copies in flight
        super().__init__(params)

    @classmethod
    def create_simulated(  # type: ignore[override]
        cls,
        disable: bool = False,
        mock_allocator: Any | None = None,
        page_size: int = 1,
        enable_kv_cache_events: bool = False,
        **event_options: Any,  # 0.5.23: dynamo_kv_event_format, kv_event_lora_names
    ) -> LeylineRadixCache:
        """A pool-less cache (no splices) like `RadixCache.create_simulated`, of this class."""
        params = CacheInitParams(
            disable=disable,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=mock_allocator,
            page_size=page_size,
            enable_kv_cache_events=enable_kv_cache_events,
            **event_options,
        )
        return cls(params)

    # ----- SGLang hooks -----

    def reset(self) -> None:
        super().reset()
        self._evicted, self._staged = [], []
        self.index.clear()
        self.sessions.clear()
        self._evictions = getattr(self, "_evictions", 0) + 1

    def _delete_leaf(self, node: TreeNode) -> None:
        # Evicted slots are freed and may be reallocated: their index entries must die before
        # the index is read or written again (`_index`). Collected here, copied to the host
        # once per eviction (`evict`), dropped in one batch when the index is next used.
        if node.value is not None and len(node.value):
            self._evicted.append(node.value)
        self._evictions += 1  # cached copies of slot lists (RequestState.base) may be stale
        super()._delete_leaf(node)

    def _split_node(self, key: RadixKey, child: TreeNode, split_len: int) -> TreeNode:
        # NOTE: SGLang's _split_node (0.5.16, 0.5.23) moves the first split_len tokens of
        # ``child`` into a new parent node; both halves of a seeded node are exact.
        # tests/server/sglang/test_sgl_windows.py fails if the split stops passing through here.
        new_node = super()._split_node(key, child, split_len)
        if getattr(child, _SEEDED_ATTR, False):
            setattr(new_node, _SEEDED_ATTR, True)
        return new_node

    def evict(self, params: EvictParams) -> Any:
        result = super().evict(params)
        self._stage_evicted()
        return result

    def _stage_evicted(self) -> None:
        """Start the host copy of the evicted slots now. SGLang evicts while it admits a batch,
        before launching its forward; the next read of the index (often in the next round,
        behind that forward) then finds the copy done instead of waiting for the forward."""
        if not self._evicted:
            return
        dev = torch.cat([v.to(torch.int64) for v in self._evicted])
        self._evicted.clear()
        if dev.is_cuda:
            host = torch.empty(dev.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._staged.append((host, done))
        else:
            self._staged.append((dev.cpu(), None))

    def _index(self) -> ContentIndex:
        """The content index, with the entries of every evicted slot removed."""
        self._stage_evicted()
        for host, done in self._staged:
            if done is not None:
                done.synchronize()
            self.index.drop_slots(host.numpy())
        self._staged.clear()
        return self.index

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        req = params.req
        payload = self._payload(req)
        if self.disable or payload is None or not payload.approximate:
            return super().match_prefix(params)
        state: RequestState | None = getattr(req, _STATE_ATTR, None)
        if state is None:
            return self._first_match(req, payload, params)
        if not state.approx:  # served exact: SGLang's own path in the plain namespace
            res = super().match_prefix(params)
            if compat.match_len(res) < state.exact:
                state.rematch(compat.match_len(res))
                state.publish(req)
            return res
        key = compat.radix_key(params.key.token_ids, req.extra_key, state.salt, params.key.limit)
        res = super().match_prefix(MatchPrefixParams(key=key, cow_mamba=params.cow_mamba))
        raw = key.raw_token_ids()
        tokens = _ids(raw) if len(key) else np.zeros(0, np.int64)
        if state.settled == (len(tokens), compat.match_len(res), self._evictions):
            return res  # SGLang matches several times per request: nothing changed since
        t0 = time.perf_counter()
        if self.binding is not None and len(tokens) > compat.match_len(res):
            res = self._seed(state, raw, res, req.extra_key)
            state.rematch(compat.match_len(res))
            res = self._advance(req, state, tokens, raw, res, req.extra_key)
        state.settled = (len(tokens), compat.match_len(res), self._evictions)
        state.time("match", t0)
        return res

    def _first_match(self, req: Any, payload: Payload, params: MatchPrefixParams) -> MatchResult:
        """Plan the request once, pick its namespace, record its accounting and its version."""
        t0 = time.perf_counter()
        plain = super().match_prefix(params)
        ns = _namespace(params.key.extra_key)
        salt = compat.key_salt(params.key)
        key = compat.radix_key(params.key.token_ids, ns, salt, params.key.limit)
        res = super().match_prefix(MatchPrefixParams(key=key, cow_mamba=params.cow_mamba))
        raw = key.raw_token_ids()
        tokens = _ids(raw) if len(key) else np.zeros(0, np.int64)
        state = RequestState(payload, prompt_len=len(req.origin_input_ids), salt=salt, t0=t0)
        state.version, state.base_version = self._versions(payload, _tenant(ns, salt))
        setattr(req, _STATE_ATTR, state)
        n_plain, n_ns = compat.match_len(plain), compat.match_len(res)
        if self.binding is not None and len(tokens):
            self._prepare(state, tokens, _tenant(ns, salt))
        # FORGET: nothing approximate after the edit. An approximate match running past it
        # could not be used, nor could this request's own KV be (SGLang deduplicates equal
        # keys of one namespace on insert): the request is served exact.
        ns_ok = not payload.forgets or n_ns <= state.forget_start(n_plain)
        start = max(n_plain, n_ns if ns_ok else 0)
        planned = None
        # Edits are planned even when every token is cached (a retry): the plan says whether
        # they were needed. A server-diff payload's edits are the session's diff, not directives.
        edits = payload.directives or payload.server_diff
        if self.binding is not None and len(tokens) and (len(tokens) > start or edits):
            planned = self._plan(state, tokens, start, ns)
        copies = planned is not None and planned.copies
        if copies and not ns_ok:
            state.shortfall("the cache holds approximate KV past the FORGET edit: served exact")
        approx = ns_ok and (n_ns > n_plain or copies)
        if approx and n_plain > n_ns:  # only a plan that copies gets here: a binding exists
            res = self._seed(state, raw, res, ns, plain)
            if compat.match_len(res) < n_plain:
                approx = False  # the exact prefix alone beats the copies without it
                state.shortfall("no free KV slots for the copy")
                state.note(f"no free KV slots to seed {n_plain - n_ns} exact tokens: recomputed")
        if approx:
            state.approx = True
            req.extra_key = ns  # every later lookup and insert of this request stays there
            state.indexed_from = n_ns
            state.exact = min(n_plain, self._exact_len(res.last_device_node))
            state.inherited = compat.match_len(res) - state.exact
            if planned is not None:
                res = self._advance(req, state, tokens, raw, res, ns, planned)
            state.settled = (len(tokens), compat.match_len(res), self._evictions)
        else:
            res = plain
            state.exact = state.indexed_from = n_plain
        state.time("match", t0)
        state.publish(req)
        # The session's version is recorded when the request is done (`_request_done`), not
        # here: an aborted request must leave its session as it found it.
        return res

    # SGLang's lifecycle calls reach these two through `compat.Lifecycle` (0.5.16:
    # cache_unfinished_req / cache_finished_req; 0.5.23: checkpoint / on_release).

    def _chunk_cached(self, req: Any, cached_len: int) -> None:
        """SGLang cached a chunk of ``req`` (its row now holds ``cached_len`` tokens)."""
        state: RequestState | None = getattr(req, _STATE_ATTR, None)
        if state is None or self.disable or self.binding is None:
            return
        if state.window_end is None or cached_len != state.window_end:
            return  # no window, or SGLang's own chunk budget ended this chunk inside it
        # The window is prefilled: continue the plan behind it (see windows.py).
        # NOTE: `compat.extend_prefix` writes the fields SGLang's own chunk caching maintains
        # (0.5.16 and 0.5.23 differ); tests/server/sglang/test_sgl_windows.py drives them
        # through SGLang's Req and PrefillAdder and fails if their meaning moves.
        t0 = time.perf_counter()
        state.mark_time(f"window{state.windows}_cached")
        _set_window(req, state, None)
        fill = req.full_untruncated_fill_ids
        # SGLang keeps the last token out of the cached prefix (it prefills it for logits).
        key = compat.radix_key(fill, req.extra_key, state.salt, len(fill) - 1)
        res = super().match_prefix(MatchPrefixParams(key=key))
        raw = key.raw_token_ids()
        out = self._advance(req, state, _ids(raw), raw, res, req.extra_key)
        if compat.match_len(out) > cached_len:
            new = compat.match_slots(self, out)
            compat.extend_prefix(self, req, cached_len, new, out.last_device_node)
        state.time("windows", t0)
        state.publish(req)

    def _request_done(self, req: Any, inserted: bool, kv_len: int) -> None:
        """SGLang is done with ``req`` (finished, or aborted without ``inserted``): its first
        ``kv_len`` tokens had KV, cached in the tree when ``inserted``."""
        if getattr(req, WINDOW_ATTR, None) is not None:
            setattr(req, WINDOW_ATTR, None)  # finished or aborted mid-plan: no more windows
        if self.disable:
            return
        state = getattr(req, _STATE_ATTR, None)
        if state is not None:
            state.mark_time("finished")
            state.publish(req)  # SGLang streams the first output after this call
        payload = self._payload(req)
        tokens = (req.origin_input_ids + req.output_ids)[:kv_len]
        salt, tenant = compat.req_salt(req), tenant_of(req)
        # An abort (0.5.16: released without insert, or finished with FINISH_ABORT after its
        # last forward; 0.5.23: on_release without checkpoint) records no session version. So
        # does a retraction (released without insert): the request is served again later.
        completed = inserted and not _aborted(req)
        if payload is not None and completed:
            version = state.version if state is not None else self._versions(payload, tenant)[0]
            assert version is not None
            self.sessions.record(
                tenant, payload.session, version, tokens, len(req.origin_input_ids)
            )
        cfg = self.leyline_config
        donates = cfg.index_all_requests or (
            payload is not None and payload.approximate and payload.content_reuse
        )
        if cfg.content_reuse and donates and inserted and self.binding is not None:
            res = super().match_prefix(
                MatchPrefixParams(key=compat.radix_key(tokens, req.extra_key, salt))
            )
            n = compat.match_len(res)
            # The prefix the request matched was indexed when it was served; its chunks
            # would only be indexed again (this runs before SGLang sends the response).
            start = state.indexed_from if state is not None else 0
            if n > start:
                slots = compat.match_slots(self, res)
                self._index().add_sequence(
                    np.asarray(tokens[:n], dtype=np.int64), slots.cpu().numpy(),
                    salt=tenant, start=start,
                )  # fmt: skip

    # ----- the extension -----

    def _payload(self, req: Any) -> Payload | None:
        """The request's payload, parsed once (cached on the `Req`)."""
        if req is None:
            return None
        if hasattr(req, _PAYLOAD_ATTR):
            cached: Payload | None = getattr(req, _PAYLOAD_ATTR)
            return cached
        sp = getattr(req, "sampling_params", None)
        try:
            payload = Payload.from_custom_params(getattr(sp, "custom_params", None))
        except PayloadError as exc:
            # The OpenAI routes answer these 400 (response.validate_payload); /generate does not.
            logger.warning(
                "leyline: ignoring request %s payload: %s", getattr(req, "rid", "?"), exc
            )
            payload = None
        setattr(req, _PAYLOAD_ATTR, payload)
        return payload

    def _versions(self, payload: Payload, tenant: str) -> tuple[int | None, int | None]:
        """(version, base version) of a request: the payload's, or for a server-diff payload
        the tenant's session's next version and its latest recorded one."""
        if not payload.server_diff:
            return payload.version, payload.base_version
        latest = self.sessions.latest(tenant, payload.session)
        return (latest or 0) + 1, latest

    def _seed(
        self,
        state: RequestState,
        raw: Any,
        res: MatchResult,
        ns: str,
        plain: MatchResult | None = None,
    ) -> MatchResult:
        """Copy a longer match of the plain namespace (``plain``, matched here when not given)
        into the request's approximate one (delta 0: the copy stays exact). The base is
        locked with the donor: evicting to make room must not take what the plan copies."""
        if plain is None:
            key = compat.radix_key(raw, _tenant_key(ns), state.salt)
            plain = super().match_prefix(MatchPrefixParams(key=key))
        lo, hi = compat.match_len(res), compat.match_len(plain)
        if hi <= lo:
            return res
        src = compat.match_slots(self, plain)[lo:hi]
        ns_key = compat.radix_key(raw, ns, state.salt)
        zeros = np.zeros(hi - lo, np.int64)
        donors = [plain.last_device_node, self._base(state, ns)[1]]
        # The donor path is locked while evicting, so the second try needs no re-plan.
        if self._fill(res, src, zeros, donors, ns_key) or self._fill(
            res, src, zeros, donors, ns_key, evict=False
        ):
            seeded = super().match_prefix(MatchPrefixParams(key=ns_key))
            setattr(seeded.last_device_node, _SEEDED_ATTR, True)  # the new leaf: [lo, hi)
            return seeded
        return res

    def _exact_len(self, node: TreeNode) -> int:
        """Leading tokens of the approximate-namespace path to ``node`` that were seeded from
        the plain one: the only KV there known to equal a fresh prefill. (The same tokens may
        also be cached exact in the plain namespace after an approximate request put them
        here, e.g. replayed with ``approximate: false``; the KV this path serves is its own.)"""
        path = []
        while node is not None and node is not self.root_node:
            path.append(node)
            node = node.parent
        exact = 0
        for n in reversed(path):
            if not getattr(n, _SEEDED_ATTR, False):
                break
            exact += len(n.key)
        return exact

    def _base(self, state: RequestState, ns: str) -> tuple[Any, TreeNode | None, Any]:
        """The session's base version as a planner `CachedSequence` (its still cached part, in
        whichever namespace holds more of it: an exact base lives in the plain one), its last
        node and its slots on the device. The host copy of the slot list is reused while the
        base still ends at the same radix node with the same length (evictions remove leaves
        and splits keep slots, so the slots are unchanged): a copy to the host waits for the
        forward in flight, ~10 ms between a window and the rest of the plan."""
        from leyline.server.core.planner import CachedSequence

        if state.base_tokens is None:
            return None, None, None
        cached = state.base_cache
        if cached is not None and cached[0] == self._evictions:
            return cached[1], cached[2], cached[3]
        b_tokens = state.base_tokens
        b_key = _arr(b_tokens)
        b_res = super().match_prefix(
            MatchPrefixParams(key=compat.radix_key(b_key, _tenant_key(ns), state.salt))
        )
        in_ns = super().match_prefix(MatchPrefixParams(key=compat.radix_key(b_key, ns, state.salt)))
        if compat.match_len(in_ns) > compat.match_len(b_res):
            b_res = in_ns
        b_slots, b_node = compat.match_slots(self, b_res), b_res.last_device_node
        if cached is not None and cached[2] is b_node and len(cached[1]) == len(b_slots):
            seq = cached[1]
        else:
            seq = CachedSequence(tokens=b_tokens[: len(b_slots)], slots=b_slots.cpu().numpy())
        state.base_cache = (self._evictions, seq, b_node, b_slots)
        return seq, b_node, b_slots

    def _prepare(self, state: RequestState, tokens: np.ndarray, tenant: str) -> None:
        """Once per request: map the client's directives onto the base (token diff) of the
        tenant's session."""
        from leyline.server.core.planner import Mode, TokenDirective

        payload = state.payload
        if state.base_version is None:
            return
        base = self.sessions.get(tenant, payload.session, state.base_version)
        if base is None:
            why = f"session {payload.session!r} has no cached base version {state.base_version}"
            state.base_missing = why
            if payload.directives:
                state.note(f"{why} (evicted or never served here): directives ignored")
            return
        b_tokens, b_prompt = base
        state.base_tokens = b_tokens  # kept: the session may record newer versions meanwhile
        cfg = self.leyline_config
        default = payload.mode.value if payload.mode is not None else None
        al = align_edits(
            b_tokens, b_prompt, tokens, payload.modes, merge_gap=cfg.merge_gap, default=default
        )
        state.alignment = al
        if al.reason is not None:
            state.note(al.reason)
        windows = _edit_windows(payload, al, cfg.repair.tokens)
        state.directives = [
            TokenDirective(e.start, e.end, tokens[e.new_start : e.new_end].copy(), Mode(e.mode), w)
            for e, w in zip(al.edits, windows, strict=True)
        ]
        if payload.forgets:
            return  # exact after the edit: no moved spans (nor chunks, see `_plan`)
        for e in al.edits:  # AMORTIZE or REPAIR (whose planner windows moved content too)
            if e.new_end - e.new_start >= cfg.min_moved_run:
                state.moved.extend(
                    moved_spans(b_tokens, tokens, e.new_start, e.new_end, cfg.min_moved_run)
                )

    def _plan(self, state: RequestState, tokens: np.ndarray, exact_len: int, ns: str) -> _Planned:
        """Plan the request after its first ``exact_len`` tokens (cached) and split off the
        next step: the copy runs at ``exact_len`` and the next window end."""
        from leyline.server.core.planner import build_plan

        cfg = self.leyline_config
        t0 = time.perf_counter()
        base = self._base(state, ns)
        base_seq = base[0]
        state.time("base", t0)
        directives = state.directives if base_seq is not None else []
        if base_seq is not None and directives and directives[-1].end > len(base_seq):
            # Part of the base version's KV was evicted: only edits inside what is left apply.
            keep = [d for d in directives if d.end <= len(base_seq)]
            directives = directives[: len(keep)]
            state.shortfall("the base version's KV was partly evicted")
        # FORGET asks for exact KV after its edit: no chunk from elsewhere may stand in.
        use_index = state.payload.content_reuse and cfg.content_reuse and not state.payload.forgets
        t0 = time.perf_counter()
        index = self._index() if use_index else None
        state.time("index", t0)
        t0 = time.perf_counter()
        plan = build_plan(
            tokens,
            exact_len=exact_len,
            exact_slots=np.zeros(exact_len, np.int64),  # exact runs are used in place
            base=base_seq,
            directives=directives,
            index=index,
            salt=_tenant(ns, state.salt),
            moved=state.moved if base_seq is not None else (),
            repair=cfg.repair,
        )
        if not state.outcomes and directives and base_seq is not None:
            state.outcomes, state.base_len = plan.outcomes, len(base_seq)
        state.plan_windows(plan.windows)
        step = next_step(plan, exact_len, min_copy_run=cfg.min_copy_run,
                         windows_left=cfg.max_windows - state.windows)  # fmt: skip
        state.time("plan", t0)
        if step.skipped:
            state.shortfall(
                f"{step.skipped} copy tokens behind a window recomputed (runs under "
                f"{cfg.min_copy_run} tokens, or over {cfg.max_windows} windows)"
            )
        return _Planned(exact_len, self._evictions, step, base)

    def _advance(
        self,
        req: Any,
        state: RequestState,
        tokens: np.ndarray,
        raw: Any,
        res: MatchResult,
        ns: str,
        planned: _Planned | None = None,
    ) -> MatchResult:
        """Fill the copy runs at the current match end, record the next window. ``planned``:
        the step already planned, used when the match and the tree are still as it found them."""
        ns_key = compat.radix_key(raw, ns, state.salt)
        for attempt in range(2):
            exact_len = compat.match_len(res)
            if planned is None or (planned.exact_len, planned.evictions) != (
                exact_len,
                self._evictions,
            ):
                planned = self._plan(state, tokens, exact_len, ns)
            step, (base_seq, base_node, base_dev) = planned.step, planned.base
            planned = None
            if len(step):
                t0 = time.perf_counter()
                donors = [res.last_device_node, base_node]
                assert self.splicer is not None
                src, delta = self.splicer.sources(step.runs, base_seq, base_dev)
                if not self._fill(res, src, delta, donors, ns_key, evict=attempt == 0):
                    if attempt == 0:
                        continue  # eviction may have dropped chunk donors: re-plan once
                    state.shortfall("no free KV slots for the copy")
                    state.note(f"no free KV slots for a {len(step)}-token copy: recomputed")
                    _set_window(req, state, None)
                    return res
                res = super().match_prefix(MatchPrefixParams(key=ns_key))
                state.time("splice", t0)
                state.mark(step.runs)
                if self.splicer is not None and self.splicer.verify:
                    state.checks = dict(self.splicer.checks)
            if step.window_end is not None and step.window_end > compat.match_len(res):
                state.windows += 1
                _set_window(req, state, step.window_end)
            else:
                _set_window(req, state, None)
            return res
        return res

    def _fill(
        self,
        res: MatchResult,
        src: torch.Tensor,
        delta: np.ndarray | torch.Tensor,
        donors: list[TreeNode | None],
        ns_key: RadixKey,
        *,
        evict: bool = True,
    ) -> bool:
        """Allocate ``len(src)`` slots after the match, splice into them, insert. False when the
        pool is full (after evicting, with ``evict``: the caller re-plans and tries again)."""
        n = len(src)
        locked = [d for d in donors if d is not None]
        for d in locked:
            self.inc_lock_ref(d)
        try:
            alloc = self.token_to_kv_pool_allocator
            dst = alloc.alloc(n)
            if dst is None:
                if evict:
                    # The eviction may free a chunk donor (only the match and the base are
                    # locked): the caller re-plans and allocates again without evicting.
                    self.evict(EvictParams(num_tokens=n - alloc.available_size()))
                else:
                    logger.info("leyline: no free KV slots for a %d-token extension", n)
                return False
            assert self.splicer is not None
            self.splicer.splice(src, dst, torch.as_tensor(delta))
            lo = compat.match_len(res)
            value = torch.cat([compat.match_slots(self, res).to(dst.device), dst])
            result = self.insert(InsertParams(key=ns_key[: lo + n], value=value))
            assert result.prefix_len == lo, (result.prefix_len, lo)
            return True
        finally:
            for d in locked:
                self.dec_lock_ref(d)

    def warm_up(self) -> None:
        """Compile the splice kernel at start-up (see `PoolSplicer.warm_up`)."""
        if self.splicer is not None:
            self.splicer.warm_up()


def _edit_windows(payload: Payload, al: Alignment, default: int | None) -> list[int | None]:
    """Each edit's REPAIR window (None: the planner's default; always None off REPAIR): its
    directive's, the payload's (server diff), or for edits served together the largest of the
    REPAIR directives' (an omitted one counts as ``default``; None if that is not in tokens)."""
    if payload.server_diff:
        return [payload.window if e.mode == Mode.REPAIR else None for e in al.edits]
    if al.paired:
        return [d.window for d in payload.directives]
    asked = [d.window for d in payload.directives if d.mode is Mode.REPAIR]
    merged = None
    if asked and (default is not None or None not in asked):
        merged = max(default if w is None else w for w in asked)  # type: ignore[type-var]
    return [merged if e.mode == Mode.REPAIR else None for e in al.edits]


def _set_window(req: Any, state: RequestState, end: int | None) -> None:
    state.window_end = end
    setattr(req, WINDOW_ATTR, end)


def _ids(tokens: Any) -> np.ndarray:
    """Token ids as int64 numpy, viewing an ``array("q")`` without boxing each token."""
    if isinstance(tokens, array) and tokens.typecode == "q":
        return np.frombuffer(tokens, dtype=np.int64) if len(tokens) else np.zeros(0, np.int64)
    return np.asarray(tokens, dtype=np.int64)


def _arr(tokens: np.ndarray) -> array:
    """SGLang radix keys hold ``array("q")`` token ids."""
    out = array("q")
    out.frombytes(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    return out


def _namespace(extra_key: str | None) -> str:
    key = extra_key or ""
    return key if key.endswith(APPROX_SUFFIX) else key + APPROX_SUFFIX


def _tenant_key(ns: str) -> str | None:
    plain = ns[: -len(APPROX_SUFFIX)] if ns.endswith(APPROX_SUFFIX) else ns
    return plain or None


def _tenant(extra_key: str | None, salt: str | None) -> str:
    """A request's tenant (the content index's chunk salt and the session table's key): the
    plain namespace SGLang keys its radix tree with (0.5.16: ``cache_salt + extra_key`` and
    the LoRA id), and the cache salt where SGLang keeps it apart (0.5.23, compat). Encoded
    unambiguously: an extra key cannot pose as another (extra key, salt) pair."""
    return json.dumps([_tenant_key(extra_key or "") or "", salt])


def tenant_of(req: Any) -> str:
    """The tenant of a scheduler `Req` (see `_tenant`): what its session and donated chunks
    are filed under."""
    return _tenant(req.extra_key, compat.req_salt(req))


def _aborted(req: Any) -> bool:
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    return isinstance(getattr(req, "finished_reason", None), FINISH_ABORT)
