"""Cost model of cross-instance attention and the local / route / fetch predicate.

A request on the *requester* attends to ``n_chunks`` chunks of ``chunk_tokens`` tokens that a
*holder* keeps, with ``batch`` query rows per layer, over ``num_layers`` layers. The terms
follow the transports' messages (:mod:`.transport`) one for one:

route, once per step, then per layer (a query of layer ``l`` depends on layer ``l - 1``)::

    probe    = 2α + meta / β                        header; positions, chunk ids, deltas
    transfer = α + routed_bytes / β                 the layer's query rows
    compute  = Σ_chunks attn(batch·Hq·chunk_tokens·(qk_dim + v_dim)) + merge at the holder
    return   = α + returned_bytes / β               o, lse, status (one packed message)
    merge    = merge(2 parts)                       local partial ⊕ routed partial

fetch, once for all layers::

    probe    = 2α                                   header, chunk ids
    gather   = gather(kv bytes)                     the holder copies the chunks' rows out
    transfer = 2α + fetched_bytes / β               row counts; positions + K + V packed
    splice   = splice(key bytes)                    fp32 rotation by δ, rounded once

with a point-to-point link of latency ``α`` and bandwidth ``β`` and per-unit costs of the three
kernels (:class:`Coefficients`, each a measured ``fixed + per_unit · units`` line).

Predicate. The attention over the chunk is computed either way (by the holder when routed, by
the requester after a fetch), so on like devices it cancels, and the choice compares what
only one side pays: per use (a decode step touching the chunk) a route costs
``a_s + L · (a_r + b_r · B_r)`` (``B_r`` = routed + returned bytes of one layer, ``a_s`` the
step's probe), and a fetch costs ``a_f + b_f · B_f`` once (``B_f`` = the chunks' KV bytes, all
layers). The two measured
coefficients are ``b_r`` (seconds per routed byte: link plus merge) and ``b_f`` (seconds per
fetched byte: gather, link and splice); ``a_r``/``a_f`` are the fixed message latencies. Route while
the remaining uses ``u`` stay below the crossover ``u* = (a_f + b_f B_f) / (a_s + L (a_r + b_r
B_r))``;
chunks already on the requester are LOCAL.

Example::

    model = CostModel(coefficients)
    model.decide(RequestShape(spec, batch=8, chunk_tokens=512, n_chunks=2, num_layers=27), uses=4)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from leyline.server.core.xattn.partial import AttnSpec

__all__ = [
    "Coefficients",
    "CostModel",
    "Decision",
    "FetchTerms",
    "Line",
    "Predicate",
    "RequestShape",
    "RouteTerms",
    "fit_line",
]

_INT = 8  # bytes of one int64 on the wire
_HEADER_BYTES = 4 * _INT


class Decision(Enum):
    """Where the attention over a chunk is computed."""

    LOCAL = "local"  # the chunk's KV is on the requester already
    ROUTE = "route"  # send the query rows, merge the holder's (o, lse)
    FETCH = "fetch"  # copy the chunk's KV here and splice it


@dataclass(frozen=True, slots=True)
class Line:
    """``fixed_s + per_unit_s · units``: one measured cost (seconds)."""

    fixed_s: float
    per_unit_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fixed_s) and math.isfinite(self.per_unit_s)):
            raise ValueError("a cost line needs finite coefficients")
        if self.per_unit_s < 0:
            raise ValueError(f"per_unit_s must be >= 0, got {self.per_unit_s}")

    def __call__(self, units: float) -> float:
        return self.fixed_s + self.per_unit_s * units


def fit_line(units: Sequence[float], seconds: Sequence[float]) -> Line:
    """Least-squares line through measurements; a negative intercept is clamped to 0 (refit
    through the origin), since no operation takes negative time."""
    if len(units) != len(seconds) or len(units) < 2:
        raise ValueError("fit_line needs at least two (units, seconds) pairs of equal count")
    n = len(units)
    mx, my = sum(units) / n, sum(seconds) / n
    var = sum((x - mx) ** 2 for x in units)
    if var == 0:
        raise ValueError("fit_line needs at least two distinct unit counts")
    slope = sum((x - mx) * (y - my) for x, y in zip(units, seconds, strict=True)) / var
    fixed = my - slope * mx
    if fixed < 0 or slope < 0:
        fixed = 0.0
        slope = sum(x * y for x, y in zip(units, seconds, strict=True)) / sum(x * x for x in units)
    return Line(fixed, max(slope, 0.0))


@dataclass(frozen=True, slots=True)
class Coefficients:
    """What the model needs from one machine, for one model kind (measured by
    ``benchmarks/xattn_calibrate.py``).

    ``latency_s``/``bandwidth_Bps``: one point-to-point message (one way);
    ``attn``: partial attention, units = query rows x query heads x keys x (qk_dim + v_dim);
    ``merge``: units = parts x rows x heads x v_dim; ``splice``: units = key bytes rotated;
    ``gather``: units = KV bytes the holder copies out of its cache for a fetch.
    """

    latency_s: float
    bandwidth_Bps: float
    attn: Line
    merge: Line
    splice: Line
    gather: Line
    device: str = "unknown"

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and self.bandwidth_Bps > 0):
            raise ValueError("latency_s must be >= 0 and bandwidth_Bps > 0")

    def message(self, nbytes: float) -> float:
        """Seconds for one message of ``nbytes``."""
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True, slots=True)
class RequestShape:
    """One request's cross-instance attention: ``batch`` query rows per layer over
    ``n_chunks`` x ``chunk_tokens`` remote tokens, ``num_layers`` layers, KV at ``itemsize``
    bytes, routed results at ``result_itemsize``."""

    spec: AttnSpec
    batch: int
    chunk_tokens: int
    n_chunks: int
    num_layers: int
    itemsize: int = 2
    result_itemsize: int = 4

    def __post_init__(self) -> None:
        if min(self.batch, self.chunk_tokens, self.n_chunks, self.num_layers) < 1:
            raise ValueError("batch, chunk_tokens, n_chunks and num_layers must be positive")
        if self.itemsize not in (1, 2, 4) or self.result_itemsize not in (2, 4):
            raise ValueError("itemsize must be 1, 2 or 4 and result_itemsize 2 or 4")

    @property
    def remote_tokens(self) -> int:
        return self.chunk_tokens * self.n_chunks

    @property
    def meta_bytes(self) -> int:
        """Requester to holder, once per step: positions, chunk ids and deltas."""
        return (self.batch + 2 * self.n_chunks) * _INT

    @property
    def routed_bytes(self) -> int:
        """Requester to holder, one layer: the query rows."""
        return self.batch * self.spec.query_bytes(self.itemsize)

    @property
    def returned_bytes(self) -> int:
        """Holder to requester, one layer: ``o`` and fp32 ``lse`` plus the status word."""
        return self.batch * self.spec.result_bytes(self.result_itemsize) + 4

    @property
    def fetched_bytes(self) -> int:
        """Holder to requester, once: every layer's KV of the chunks, positions, row counts."""
        kv = self.remote_tokens * self.num_layers * self.spec.kv_bytes(self.itemsize)
        return kv + (self.remote_tokens + self.n_chunks) * _INT

    @property
    def key_bytes(self) -> int:
        """Fetched key bytes (what the splice rotates)."""
        return (
            self.remote_tokens
            * self.num_layers
            * self.spec.kv_heads
            * self.spec.qk_dim
            * self.itemsize
        )

    @property
    def attn_units(self) -> int:
        """Partial-attention units of one chunk, one layer (see :class:`Coefficients`)."""
        s = self.spec
        return self.batch * s.q_heads * self.chunk_tokens * (s.qk_dim + s.v_dim)

    def merge_units(self, parts: int) -> int:
        return parts * self.batch * self.spec.q_heads * self.spec.v_dim


@dataclass(frozen=True, slots=True)
class RouteTerms:
    """Seconds of one routed step: ``probe`` once, the other terms per layer."""

    probe: float
    transfer: float
    compute: float
    ret: float
    merge: float
    num_layers: int

    @property
    def per_layer(self) -> float:
        return self.transfer + self.compute + self.ret + self.merge

    @property
    def round_trip(self) -> float:
        return self.probe + self.per_layer * self.num_layers


@dataclass(frozen=True, slots=True)
class FetchTerms:
    """Seconds of one fetch of all layers."""

    probe: float
    gather: float
    transfer: float
    splice: float

    @property
    def round_trip(self) -> float:
        return self.probe + self.gather + self.transfer + self.splice


@dataclass(frozen=True, slots=True)
class Predicate:
    """The closed-form choice (module doc): per use a route costs ``route_step_s + L ·
    (route_fixed_s + route_s_per_byte · B_r)``, a fetch ``fetch_fixed_s + fetch_s_per_byte ·
    B_f`` once."""

    route_step_s: float
    route_fixed_s: float
    route_s_per_byte: float
    fetch_fixed_s: float
    fetch_s_per_byte: float

    def route_cost(self, shape: RequestShape, uses: float = 1) -> float:
        per_layer = self.route_fixed_s + self.route_s_per_byte * (
            shape.routed_bytes + shape.returned_bytes
        )
        return uses * (self.route_step_s + shape.num_layers * per_layer)

    def fetch_cost(self, shape: RequestShape) -> float:
        return self.fetch_fixed_s + self.fetch_s_per_byte * shape.fetched_bytes

    def crossover_uses(self, shape: RequestShape) -> float:
        """Uses below which routing is cheaper than fetching."""
        return self.fetch_cost(shape) / self.route_cost(shape, 1)

    def decide(self, shape: RequestShape, uses: float = 1, *, local: bool = False) -> Decision:
        """LOCAL if the chunks are here; else ROUTE iff it is cheaper over ``uses`` uses."""
        if local:
            return Decision.LOCAL
        if uses <= 0:
            raise ValueError(f"uses must be positive, got {uses}")
        cheaper = self.route_cost(shape, uses) < self.fetch_cost(shape)
        return Decision.ROUTE if cheaper else Decision.FETCH


class CostModel:
    """The five-term model and its predicate, from one machine's :class:`Coefficients`."""

    def __init__(self, coefficients: Coefficients) -> None:
        self.c = coefficients

    def route(self, shape: RequestShape) -> RouteTerms:
        c = self.c
        compute = shape.n_chunks * c.attn(shape.attn_units)
        if shape.n_chunks > 1:
            compute += c.merge(shape.merge_units(shape.n_chunks))
        return RouteTerms(
            probe=c.message(_HEADER_BYTES) + c.message(shape.meta_bytes),
            transfer=c.message(shape.routed_bytes),
            compute=compute,
            ret=c.message(shape.returned_bytes),
            merge=c.merge(shape.merge_units(2)),
            num_layers=shape.num_layers,
        )

    def fetch(self, shape: RequestShape) -> FetchTerms:
        c = self.c
        kv = shape.fetched_bytes - (shape.remote_tokens + shape.n_chunks) * _INT
        return FetchTerms(
            probe=c.message(_HEADER_BYTES) + c.message(shape.n_chunks * _INT),
            gather=c.gather(kv),
            transfer=c.message(shape.n_chunks * _INT)
            + c.message(shape.fetched_bytes - shape.n_chunks * _INT),
            splice=c.splice(shape.key_bytes),
        )

    def predicate(self, spec: AttnSpec) -> Predicate:
        """The two-coefficient predicate for one layer kind: ``b_r`` = link + merge per routed
        or returned byte, ``b_f`` = link + splice per fetched byte; the fixed terms are the
        message latencies and the kernels' fixed costs."""
        c = self.c
        # NOTE: merge work is proportional to the returned o rows (2 parts x 1 fp32 element per
        # 4 B), so its per-unit cost folds into b_r; the splice rotates keys only (GQA values
        # are copied as received), so it folds into b_f by the keys' share of a KV row.
        merge_per_byte = c.merge.per_unit_s * 2 / 4
        values = spec.v_dim if spec.kind == "gqa" else 0
        key_share = spec.qk_dim / (spec.qk_dim + values)
        return Predicate(
            route_step_s=2 * c.latency_s,
            route_fixed_s=2 * c.latency_s + c.merge.fixed_s,
            route_s_per_byte=1 / c.bandwidth_Bps + merge_per_byte,
            fetch_fixed_s=4 * c.latency_s + c.splice.fixed_s + c.gather.fixed_s,
            fetch_s_per_byte=1 / c.bandwidth_Bps
            + c.splice.per_unit_s * key_share
            + c.gather.per_unit_s,
        )

    def decide(self, shape: RequestShape, uses: float = 1, *, local: bool = False) -> Decision:
        return self.predicate(shape.spec).decide(shape, uses, local=local)
