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

import json
import logging
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from leyline.server.core.kernels.splice import splice_kv
from leyline.server.core.layout import KVLayout
from leyline.server.core.rope import RopeSpec
from leyline.server.sglang.align import align_edits
from leyline.server.sglang.payload import PayloadError, RequestOptions, parse_custom_params

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

    def __post_init__(self) -> None:
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


@dataclass
class _Accounting:
    exact: int = 0
    spliced: int = 0
    chunk_reused: int = 0
    recomputed: int = 0
    directives: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_wire(self, opts: RequestOptions | None) -> dict[str, Any]:
        return {
            "session": None if opts is None else opts.session,
            "version": None if opts is None else opts.version,
            "tokens": {
                "exact": self.exact,
                "spliced": self.spliced,
                "chunk_reused": self.chunk_reused,
                "recomputed": self.recomputed,
            },
            "directives": self.directives,
            "notes": self.notes,
        }


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

    def _delete_leaf(self, node: TreeNode) -> None:
        # Evicted slots are freed and may be reallocated: their index entries die first.
        if node.value is not None and len(node.value):
            self.index.drop_slots(node.value.cpu().numpy())
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
        state: _Accounting | None = getattr(req, _STATE_ATTR, None)
        first = state is None
        acct = _Accounting(exact=len(res.device_indices))
        if self.binding is not None and len(tokens) > len(res.device_indices):
            res = self._extend(tokens, raw, res, opts, ns, acct, record=first)
        if first:
            acct.recomputed = len(tokens) - len(res.device_indices)
            setattr(req, _STATE_ATTR, acct)
            info = dict(req.customized_info or {})
            info["leyline"] = [json.dumps(acct.to_wire(opts))]
            req.customized_info = info
            if opts.session is not None and opts.version is not None:
                full = req.origin_input_ids + req.output_ids
                self.sessions.record(opts.session, opts.version, full, len(req.origin_input_ids))
        return res

    def cache_finished_req(
        self, req: Any, is_insert: bool = True, *, kv_len_to_handle: int
    ) -> None:
        super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
        if self.disable:
            return
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
            if n:
                self.index.add_sequence(
                    np.asarray(tokens[:n], dtype=np.int64), slots.cpu().numpy(),
                    salt=_tenant(req.extra_key),
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

    def _extend(
        self,
        tokens: np.ndarray,
        raw: Any,
        res: MatchResult,
        opts: RequestOptions,
        ns: str,
        acct: _Accounting,
        *,
        record: bool,
    ) -> MatchResult:
        from leyline.server.core.planner import CachedSequence, Mode, TokenDirective, build_plan

        # ``raw`` is the key's own array("q") (``tokens`` views it): no copy per radix lookup.
        ns_key = RadixKey(raw, ns)
        # 1. seed from the plain namespace (exact KV at the same positions: delta 0).
        exact_res = super().match_prefix(MatchPrefixParams(key=RadixKey(raw, _tenant_key(ns))))
        if len(exact_res.device_indices) > len(res.device_indices):
            lo, hi = len(res.device_indices), len(exact_res.device_indices)
            src = exact_res.device_indices[lo:hi]
            if self._fill(
                tokens, res, src, np.zeros(hi - lo, np.int64), [exact_res.last_device_node], ns_key
            ):
                res = super().match_prefix(MatchPrefixParams(key=ns_key))
                acct.exact = len(res.device_indices)
        # 2. plan with the session base and the content index.
        base_seq, base_node, directives = None, None, []
        if opts.session is not None and opts.base_version is not None:
            base = self.sessions.get(opts.session, opts.base_version)
            if base is None:
                why = f"session {opts.session!r} has no cached base version {opts.base_version}"
                acct.directives = [
                    {"index": i, "status": "ignored", "reason": why} for i in range(len(opts.modes))
                ]
                acct.notes.append(f"{why} (evicted or never served here): directives ignored")
            else:
                b_tokens, b_prompt = base
                b_res = super().match_prefix(MatchPrefixParams(key=RadixKey(_arr(b_tokens), ns)))
                b_slots = b_res.device_indices
                base_node = b_res.last_device_node
                base_seq = CachedSequence(
                    tokens=b_tokens[: len(b_slots)], slots=b_slots.cpu().numpy()
                )
                edits, why = align_edits(
                    b_tokens, b_prompt, tokens, opts.modes, merge_gap=self.leyline_config.merge_gap
                )
                if why is not None:
                    acct.directives = [
                        {"index": i, "status": "ignored", "reason": why}
                        for i in range(len(opts.modes))
                    ]
                    acct.notes.append(f"directives ignored: {why}")
                directives = [
                    TokenDirective(
                        e.start, e.end, tokens[e.new_start : e.new_end].copy(),
                        Mode.AMORTIZE if e.mode == "amortize" else Mode.FORGET,
                    )
                    for e in edits
                ]  # fmt: skip
        exact_len = len(res.device_indices)
        for attempt in range(2):
            plan = build_plan(
                tokens,
                exact_len=exact_len,
                exact_slots=res.device_indices.cpu().numpy(),
                base=base_seq,
                directives=directives,
                index=self.index
                if (opts.content_reuse and self.leyline_config.content_reuse)
                else None,
                salt=_tenant(ns),
            )
            src, delta, kinds = _leading_runs(plan, exact_len)
            if record and attempt == 0 and directives:
                acct.directives = [
                    {"index": i, "status": o.status, "reason": o.reason}
                    for i, o in enumerate(plan.outcomes)
                ]
            if not len(src):
                return res
            donors = [res.last_device_node] + ([base_node] if base_node is not None else [])
            if self._fill(
                tokens,
                res,
                torch.as_tensor(src, dtype=torch.int64),
                delta,
                donors,
                ns_key,
                evict=attempt == 0,
            ):
                out = super().match_prefix(MatchPrefixParams(key=ns_key))
                acct.spliced += int((kinds == 0).sum())
                acct.chunk_reused += int((kinds == 1).sum())
                return out
            # eviction may have dropped chunk donors from the index: re-plan once.
        acct.notes.append(f"no free KV slots for a {len(src)}-token extension: exact match served")
        return res

    def _fill(
        self,
        tokens: np.ndarray,
        res: MatchResult,
        src: torch.Tensor,
        delta: np.ndarray,
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
            src_d = src.to(dev)
            dst_d = dst.to(dev)
            delta_t = torch.as_tensor(delta, dtype=torch.int64, device=dev)
            inv_freq = self._inv_freq.get(dev)
            if inv_freq is None:  # once per device, not a host-to-device copy per request
                inv_freq = self._inv_freq[dev] = self.binding.rope.inv_freq_tensor(dev)
            splice_kv(
                self.binding.k, self.binding.v, src_d, dst_d, delta_t,
                layout=self.binding.layout,
                inv_freq=inv_freq,
                interleaved=self.binding.rope.interleaved,
                impl=self.leyline_config.kernel_impl,
            )  # fmt: skip
            lo = len(res.device_indices)
            value = torch.cat([res.device_indices.to(dst.device), dst])
            result = self.insert(InsertParams(key=ns_key[: lo + n], value=value))
            assert result.prefix_len == lo, (result.prefix_len, lo)
            return True
        finally:
            for d in locked:
                self.dec_lock_ref(d)


def _leading_runs(plan: Any, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source slots, per-token delta and kind (0 spliced, 1 chunk) of the contiguous runs at
    ``start``: SGLang prefills one tail, so runs after the first recompute run are unusable."""
    src: list[np.ndarray] = []
    delta: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    pos = start
    for run in plan.runs:
        if run.end <= start:
            continue
        if run.start != pos or run.kind not in ("spliced", "chunk"):
            break
        s = np.asarray(run.src_slots, dtype=np.int64)
        p = np.asarray(run.src_positions, dtype=np.int64)
        src.append(s)
        delta.append(np.arange(run.start, run.end, dtype=np.int64) - p)
        kinds.append(np.full(len(s), 0 if run.kind == "spliced" else 1, np.int8))
        pos = run.end
    if not src:
        z = np.zeros(0, np.int64)
        return z, z, z.astype(np.int8)
    return np.concatenate(src), np.concatenate(delta), np.concatenate(kinds)


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
