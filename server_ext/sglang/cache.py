"""`LeylineRadixCache`: SGLang's RadixCache extended with directive splices and chunk reuse.

A request that opts in (``approximate``) lives in its own namespace of the tree
(``extra_key + APPROX_SUFFIX``): SGLang never shares nodes across extra keys, so spliced or
chunk-reused KV can never be matched by a request that did not opt in. On ``match_prefix``
with such a request the exact match is extended, token by token from its end:

1. seed: a longer exact match in the request's plain namespace is copied (delta 0);
2. plan: the core planner places the session's base sequence (AMORTIZE directives) and the
   content index's chunks; SGLang prefills only a contiguous tail, so the match extends
   through the plan's leading spliced/chunk runs and stops at the first recompute run;
3. the extension is allocated (evicting when the pool is full, donors locked), filled by the
   core splice kernel (copy + rotate the rotary part by per-token delta) and inserted, so the
   next ``match_prefix`` call (SGLang makes several per request) finds it as an exact hit.
"""

from __future__ import annotations

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

from leyline.server.core.index import ContentIndex
from leyline.server.core.kernels.splice import KVPointers, kv_pointers, splice_kv
from leyline.server.core.layout import KVLayout
from leyline.server.core.rope import RopeSpec, rotate
from leyline.server.sglang.align import align_edits, moved_spans
from leyline.server.sglang.payload import PayloadError, RequestOptions, parse_custom_params
from leyline.server.sglang.request_state import RequestState
from leyline.server.sglang.windows import WINDOW_ATTR, Step, next_step

__all__ = ["APPROX_SUFFIX", "LeylineCacheConfig", "LeylineRadixCache", "PoolBinding"]

logger = logging.getLogger(__name__)

APPROX_SUFFIX = "\x1eleyline:approx"
_STATE_ATTR = "_leyline_state"


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


@dataclass(frozen=True)
class PoolBinding:
    """The KV buffers a splice writes (SGLang's own pool tensors) and how their keys rotate."""

    k: list[torch.Tensor]  # MHA k_buffer or MLA kv_buffer, one per local layer
    v: list[torch.Tensor] | None  # MHA v_buffer; None for MLA
    layout: KVLayout
    rope: RopeSpec

    @classmethod
    def from_pool(cls, pool: Any, rope: RopeSpec) -> PoolBinding:
        """Bind an `MHATokenToKVPool` or `MLATokenToKVPool` (exact classes, checked upstream)."""
        if hasattr(pool, "kv_lora_rank"):
            rank, rope_dim = int(pool.kv_lora_rank), int(pool.qk_rope_head_dim)
            if rope.rotary_dim != rope_dim:
                raise ValueError(f"rotary_dim {rope.rotary_dim} != qk_rope_head_dim {rope_dim}")
            layout = KVLayout("mla", len(pool.kv_buffer), 1, rank + rope_dim, 0, rank, rope_dim)
            return cls(list(pool.kv_buffer), None, layout, rope)
        layout = KVLayout(
            "mha", len(pool.k_buffer), int(pool.head_num), int(pool.head_dim),
            int(pool.v_head_dim), 0, rope.rotary_dim,
        )  # fmt: skip
        return cls(list(pool.k_buffer), list(pool.v_buffer), layout, rope)


class _Sessions:
    """Per-session token sequences by version (the base a later request's directives edit)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_id: OrderedDict[str, dict[int, tuple[np.ndarray, int]]] = OrderedDict()

    def record(self, session: str, version: int, tokens: Sequence[int], prompt_len: int) -> None:
        versions = self._by_id.setdefault(session, {})
        self._by_id.move_to_end(session)
        versions[version] = (_ids(tokens).copy(), prompt_len)
        for old in sorted(versions)[:-2]:  # a request edits the latest committed version
            del versions[old]
        while len(self._by_id) > self._capacity:
            self._by_id.popitem(last=False)

    def get(self, session: str, version: int) -> tuple[np.ndarray, int] | None:
        return self._by_id.get(session, {}).get(version)

    def drop(self, session: str) -> bool:
        return self._by_id.pop(session, None) is not None

    def clear(self) -> None:
        self._by_id.clear()

    def __len__(self) -> int:
        return len(self._by_id)


class LeylineRadixCache(RadixCache):
    """SGLang's `RadixCache` plus AMORTIZE/FORGET directives and content-addressed reuse.

    Requests without a Leyline payload (or with ``approximate: false``) take exactly
    SGLang's code path.
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
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._pointers: KVPointers | None = None
        self._evictions = 0
        self.splice_checks: dict[str, Any] = {
            "rows": 0, "max_abs_err": 0.0, "bit_exact_outside_rope": True,
        }  # fmt: skip
        super().__init__(params)

    @classmethod
    def create_simulated(  # type: ignore[override]
        cls,
        disable: bool = False,
        mock_allocator: Any | None = None,
        page_size: int = 1,
        enable_kv_cache_events: bool = False,
    ) -> LeylineRadixCache:
        """A pool-less cache (no splices) like `RadixCache.create_simulated`, of this class."""
        params = CacheInitParams(
            disable=disable,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=mock_allocator,
            page_size=page_size,
            enable_kv_cache_events=enable_kv_cache_events,
        )
        return cls(params)

    # ----- SGLang hooks -----

    def reset(self) -> None:
        super().reset()
        self.index.clear()
        self.sessions.clear()
        self._evictions = getattr(self, "_evictions", 0) + 1

    def _delete_leaf(self, node: TreeNode) -> None:
        # Evicted slots are freed and may be reallocated: their index entries die first.
        if node.value is not None and len(node.value):
            self.index.drop_slots(node.value.cpu().numpy())
        self._evictions += 1  # cached copies of slot lists (RequestState.base) may be stale
        super()._delete_leaf(node)

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        req = params.req
        opts = self._options(req)
        if self.disable or opts is None or not opts.opted_in:
            return super().match_prefix(params)
        ns = _namespace(params.key.extra_key)
        req.extra_key = ns  # every later insert of this request stays in the namespace
        key = RadixKey(params.key.token_ids, ns, limit=params.key.limit)
        res = super().match_prefix(MatchPrefixParams(key=key, cow_mamba=params.cow_mamba))
        raw = key.raw_token_ids()
        tokens = _ids(raw) if len(key) else np.zeros(0, np.int64)
        state: RequestState | None = getattr(req, _STATE_ATTR, None)
        first = state is None
        if state is None:
            state = RequestState(opts, prompt_len=len(req.origin_input_ids))
            state.indexed_from = len(res.device_indices)
            state.t0 = time.perf_counter()
            setattr(req, _STATE_ATTR, state)
        elif state.settled == (len(tokens), len(res.device_indices), self._evictions):
            return res  # SGLang matches several times per request: nothing changed since
        t0 = time.perf_counter()
        if self.binding is not None and len(tokens) > len(res.device_indices):
            res = self._seed(raw, res, ns)
            if first:
                state.exact = len(res.device_indices)
                self._prepare(state, tokens)
            res = self._advance(req, state, tokens, raw, res, ns)
        elif first:
            state.exact = len(res.device_indices)
        state.settled = (len(tokens), len(res.device_indices), self._evictions)
        state.time("match", t0)
        if first:
            state.publish(req)
            if opts.session is not None and opts.version is not None:
                full = req.origin_input_ids + req.output_ids
                self.sessions.record(opts.session, opts.version, full, len(req.origin_input_ids))
        return res

    def cache_unfinished_req(self, req: Any, chunked: bool = False) -> None:
        super().cache_unfinished_req(req, chunked)
        state: RequestState | None = getattr(req, _STATE_ATTR, None)
        if state is None or self.disable or self.binding is None:
            return
        if state.window_end is None or len(req.prefix_indices) != state.window_end:
            return  # no window, or SGLang's own chunk budget ended this chunk inside it
        # The window is prefilled: continue the plan behind it (see windows.py).
        t0 = time.perf_counter()
        state.mark_time(f"window{state.windows}_cached")
        _set_window(req, state, None)
        fill = req.full_untruncated_fill_ids
        key = RadixKey(fill, req.extra_key, limit=len(fill) - 1)  # SGLang keeps the last token
        res = super().match_prefix(MatchPrefixParams(key=key))
        raw = key.raw_token_ids()
        out = self._advance(req, state, _ids(raw), raw, res, req.extra_key)
        new, n_old = out.device_indices, len(req.prefix_indices)
        if len(new) > n_old:
            self.req_to_token_pool.write(
                (req.req_pool_idx, slice(n_old, len(new))), new[n_old:].to(torch.int32)
            )
            self.dec_lock_ref(req.last_node)
            self.inc_lock_ref(out.last_device_node)
            req.prefix_indices, req.last_node = new, out.last_device_node
            req.cache_protected_len = len(new)
        state.time("windows", t0)
        state.publish(req)

    def cache_finished_req(
        self, req: Any, is_insert: bool = True, *, kv_len_to_handle: int
    ) -> None:
        super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
        if getattr(req, WINDOW_ATTR, None) is not None:
            setattr(req, WINDOW_ATTR, None)  # finished or aborted mid-plan: no more windows
        if self.disable:
            return
        state = getattr(req, _STATE_ATTR, None)
        if state is not None:
            state.mark_time("finished")
            state.publish(req)  # SGLang streams the first output after this call
        opts = getattr(req, "_leyline_opts", None)
        tokens = (req.origin_input_ids + req.output_ids)[:kv_len_to_handle]
        if (
            isinstance(opts, RequestOptions)
            and opts.session is not None
            and opts.version is not None
        ):
            self.sessions.record(opts.session, opts.version, tokens, len(req.origin_input_ids))
        if self.leyline_config.content_reuse and is_insert and self.binding is not None:
            key = RadixKey(tokens, req.extra_key)
            slots = super().match_prefix(MatchPrefixParams(key=key)).device_indices
            n = len(slots)
            # The exact prefix matched in the namespace was indexed when it was served; its
            # chunks would only be indexed again (this runs before SGLang sends the response).
            start = state.indexed_from if state is not None else 0
            if n > start:
                self.index.add_sequence(
                    np.asarray(tokens[:n], dtype=np.int64), slots.cpu().numpy(),
                    salt=_tenant(req.extra_key), start=start,
                )  # fmt: skip

    # ----- the extension -----

    def _options(self, req: Any) -> RequestOptions | None:
        if req is None:
            return None
        cached = getattr(req, "_leyline_opts", False)
        if cached is not False:
            return cached  # type: ignore[no-any-return]
        sp = getattr(req, "sampling_params", None)
        try:
            opts = parse_custom_params(getattr(sp, "custom_params", None))
        except PayloadError as exc:
            logger.warning(
                "leyline: ignoring request %s payload: %s", getattr(req, "rid", "?"), exc
            )
            opts = None
        req._leyline_opts = opts
        return opts

    def _seed(self, raw: Any, res: MatchResult, ns: str) -> MatchResult:
        """Copy a longer exact match of the plain namespace into the request's (delta 0)."""
        exact_res = super().match_prefix(MatchPrefixParams(key=RadixKey(raw, _tenant_key(ns))))
        lo, hi = len(res.device_indices), len(exact_res.device_indices)
        if hi <= lo:
            return res
        src = exact_res.device_indices[lo:hi]
        ns_key = RadixKey(raw, ns)
        if self._fill(res, src, np.zeros(hi - lo, np.int64), [exact_res.last_device_node], ns_key):
            return super().match_prefix(MatchPrefixParams(key=ns_key))
        return res

    def _base(self, state: RequestState, ns: str) -> tuple[Any, TreeNode | None, Any]:
        """The session's base version as a planner `CachedSequence` (its still cached part),
        its last node and its slots on the device. Reused while nothing was evicted: the slot
        list is copied to the host once, not at every window (each copy waits for the GPU)."""
        from leyline.server.core.planner import CachedSequence

        if state.base_tokens is None:
            return None, None, None
        cached = state.base_cache
        if cached is not None and cached[0] == self._evictions:
            return cached[1], cached[2], cached[3]
        b_tokens = state.base_tokens
        b_res = super().match_prefix(MatchPrefixParams(key=RadixKey(_arr(b_tokens), ns)))
        b_slots = b_res.device_indices
        seq = CachedSequence(tokens=b_tokens[: len(b_slots)], slots=b_slots.cpu().numpy())
        state.base_cache = (self._evictions, seq, b_res.last_device_node, b_slots)
        return seq, b_res.last_device_node, b_slots

    def _prepare(self, state: RequestState, tokens: np.ndarray) -> None:
        """Once per request: map the client's directives onto the base (token diff)."""
        from leyline.server.core.planner import Mode, TokenDirective

        opts = state.opts
        if opts.session is None or opts.base_version is None:
            return
        base = self.sessions.get(opts.session, opts.base_version)
        if base is None:
            why = f"session {opts.session!r} has no cached base version {opts.base_version}"
            state.base_missing = why
            if opts.modes:
                state.note(f"{why} (evicted or never served here): directives ignored")
            return
        b_tokens, b_prompt = base
        state.base_tokens = b_tokens  # kept: the session may record newer versions meanwhile
        cfg = self.leyline_config
        al = align_edits(b_tokens, b_prompt, tokens, opts.modes, merge_gap=cfg.merge_gap)
        state.alignment = al
        if al.reason is not None:
            state.note(al.reason)
        state.directives = [
            TokenDirective(
                e.start, e.end, tokens[e.new_start : e.new_end].copy(),
                Mode.AMORTIZE if e.mode == "amortize" else Mode.FORGET,
            )
            for e in al.edits
        ]  # fmt: skip
        for e in al.edits:
            if e.mode == "amortize" and e.new_end - e.new_start >= cfg.min_moved_run:
                state.moved.extend(
                    moved_spans(b_tokens, tokens, e.new_start, e.new_end, cfg.min_moved_run)
                )

    def _advance(
        self,
        req: Any,
        state: RequestState,
        tokens: np.ndarray,
        raw: Any,
        res: MatchResult,
        ns: str,
    ) -> MatchResult:
        """Plan from the current match end, fill the copy runs there, record the next window."""
        from leyline.server.core.planner import build_plan

        cfg = self.leyline_config
        ns_key = RadixKey(raw, ns)
        base_seq, base_node, base_dev = self._base(state, ns)
        directives = state.directives if base_seq is not None else []
        if base_seq is not None and directives and directives[-1].end > len(base_seq):
            # Part of the base version's KV was evicted: only edits inside what is left apply.
            keep = [d for d in directives if d.end <= len(base_seq)]
            directives = directives[: len(keep)]
            state.shortfall("the base version's KV was partly evicted")
        use_index = state.opts.content_reuse and cfg.content_reuse
        for attempt in range(2):
            exact_len = len(res.device_indices)
            plan = build_plan(
                tokens,
                exact_len=exact_len,
                exact_slots=np.zeros(exact_len, np.int64),  # exact runs are used in place
                base=base_seq,
                directives=directives,
                index=self.index if use_index else None,
                salt=_tenant(ns),
                moved=state.moved if base_seq is not None else (),
            )
            if not state.outcomes and directives and base_seq is not None:
                state.outcomes, state.base_len = plan.outcomes, len(base_seq)
            step = next_step(plan, exact_len, min_copy_run=cfg.min_copy_run,
                             windows_left=cfg.max_windows - state.windows)  # fmt: skip
            if step.skipped:
                state.shortfall(
                    f"{step.skipped} copy tokens behind a window recomputed (runs under "
                    f"{cfg.min_copy_run} tokens, or over {cfg.max_windows} windows)"
                )
            if len(step):
                donors = [res.last_device_node] + ([base_node] if base_node is not None else [])
                src, delta = self._sources(step, base_seq, base_dev)
                if not self._fill(res, src, delta, donors, ns_key, evict=attempt == 0):
                    if attempt == 0:
                        continue  # eviction may have dropped chunk donors: re-plan once
                    state.shortfall("no free KV slots for the copy")
                    state.note(f"no free KV slots for a {len(step)}-token copy: recomputed")
                    _set_window(req, state, None)
                    return res
                res = super().match_prefix(MatchPrefixParams(key=ns_key))
                state.mark(np.arange(exact_len, exact_len + len(step)), step.kinds)
                if cfg.verify_splices:
                    state.checks = dict(self.splice_checks)
            if step.window_end is not None and step.window_end > len(res.device_indices):
                state.windows += 1
                _set_window(req, state, step.window_end)
            else:
                _set_window(req, state, None)
            return res
        return res

    def _sources(
        self, step: Step, base: Any, base_dev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Donor slots and deltas of a step on the pool's device. Runs copied from a contiguous
        stretch of the base are slices of its device slot list (no host-to-device copy, which
        would wait for the GPU); only chunk-index donors travel from the host."""
        assert self.binding is not None
        dev = self.binding.k[0].device
        srcs: list[torch.Tensor] = []
        deltas: list[torch.Tensor] = []
        for run in step.runs:
            n = len(run.src_slots)
            p0 = int(run.src_positions[0])
            contiguous = int(run.src_positions[-1]) - p0 == n - 1
            if (
                base is not None and base_dev is not None and contiguous and p0 + n <= len(base)
                and np.array_equal(run.src_slots, base.slots[p0 : p0 + n])
            ):  # fmt: skip
                srcs.append(base_dev[p0 : p0 + n].to(dev))
            else:
                srcs.append(torch.as_tensor(run.src_slots, dtype=torch.int64).to(dev))
            deltas.append(torch.full((n,), run.start - p0, dtype=torch.int64, device=dev))
        return torch.cat(srcs), torch.cat(deltas)

    def _fill(
        self,
        res: MatchResult,
        src: torch.Tensor,
        delta: np.ndarray | torch.Tensor,
        donors: list[TreeNode],
        ns_key: RadixKey,
        *,
        evict: bool = True,
    ) -> bool:
        """Allocate ``len(src)`` slots after the match, splice into them, insert; False if full."""
        assert self.binding is not None
        n = len(src)
        locked = [d for d in donors if d is not None]
        for d in locked:
            self.inc_lock_ref(d)
        try:
            alloc = self.token_to_kv_pool_allocator
            dst = alloc.alloc(n)
            if dst is None and evict:
                self.evict(EvictParams(num_tokens=n - alloc.available_size()))
                dst = alloc.alloc(n)
            if dst is None:
                logger.info("leyline: no free KV slots for a %d-token extension", n)
                return False
            dev = self.binding.k[0].device
            delta_d = torch.as_tensor(delta, dtype=torch.int64).to(dev)
            splice_kv(
                self.binding.k, self.binding.v, src.to(dev), dst.to(dev), delta_d,
                layout=self.binding.layout,
                inv_freq=self._inv_freq_on(dev),
                interleaved=self.binding.rope.interleaved,
                impl=self.leyline_config.kernel_impl,
                pointers=self._kv_pointers(),
            )  # fmt: skip
            if self.leyline_config.verify_splices:
                self._verify(src.to(dev), dst.to(dev), delta_d)
            lo = len(res.device_indices)
            value = torch.cat([res.device_indices.to(dst.device), dst])
            result = self.insert(InsertParams(key=ns_key[: lo + n], value=value))
            assert result.prefix_len == lo, (result.prefix_len, lo)
            return True
        finally:
            for d in locked:
                self.dec_lock_ref(d)

    def _verify(self, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> None:
        """Compare the spliced rows with the core's `rotate` of the donor rows (and V/latent
        bit-exact); the totals land in `splice_checks` and in the request's notes."""
        assert self.binding is not None
        b, lay = self.binding, self.binding.layout
        worst, v_equal = 0.0, True
        for layer in range(lay.num_layers):
            want = rotate(b.k[layer][src], delta[:, None], b.rope, offset=lay.rope_offset)
            got = b.k[layer][dst]
            worst = max(worst, float((got.float() - want.float()).abs().max()))
            if b.v is not None:
                v_equal &= bool(torch.equal(b.v[layer][dst], b.v[layer][src]))
            lo, hi = lay.rope_offset, lay.rope_offset + lay.rope_dim
            outside = torch.ones(got.shape[-1], dtype=torch.bool, device=got.device)
            outside[lo:hi] = False
            v_equal &= bool(torch.equal(got[..., outside], b.k[layer][src][..., outside]))
        c = self.splice_checks
        c["rows"] += len(src)
        c["max_abs_err"] = max(c["max_abs_err"], worst)
        c["bit_exact_outside_rope"] &= v_equal

    def _kv_pointers(self) -> KVPointers | None:
        """The pool's layer-offset tables for the Triton kernel, built once (not per splice)."""
        assert self.binding is not None
        if self._pointers is None and self.binding.k[0].is_cuda:
            self._pointers = kv_pointers(self.binding.k, self.binding.v)
        return self._pointers

    def _inv_freq_on(self, dev: torch.device) -> torch.Tensor:
        assert self.binding is not None
        inv_freq = self._inv_freq.get(dev)
        if inv_freq is None:  # once per device, not a host-to-device copy per request
            inv_freq = self._inv_freq[dev] = self.binding.rope.inv_freq_tensor(dev)
        return inv_freq

    def warm_up(self) -> None:
        """Compile the splice kernel now, not inside the first request (a ~1 s stall was seen).

        Splices the reserved padding slot 0 onto itself with delta 0 (its rows stay bit-equal);
        the launcher makes every later call run this same compiled variant.
        """
        if self.binding is None:
            return
        dev = self.binding.k[0].device
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        splice_kv(
            self.binding.k, self.binding.v, zero, zero, zero,
            layout=self.binding.layout, inv_freq=self._inv_freq_on(dev),
            interleaved=self.binding.rope.interleaved, impl=self.leyline_config.kernel_impl,
            pointers=self._kv_pointers(),
        )  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)


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


def _tenant(extra_key: str | None) -> str:
    return _tenant_key(extra_key or "") or ""
