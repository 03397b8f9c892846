"""The two cross-instance transports over ``torch.distributed`` point-to-point messages.

A *requester* rank attends to chunks of KV that a *holder* rank keeps (cached at the positions
where the holder computed them, ``positions``; placed at ``positions + delta`` in the
requester's sequence). Two ways to get the attention over them:

- **fetch** (move the cache): the holder sends the chunks' KV rows for every layer; the
  requester rotates the keys' rotary dims by ``delta`` (:func:`leyline.server.core.rope.rotate`,
  the splice's rotation) and attends locally from then on.
- **route** (move the query): per layer, the requester sends its query rows; the holder turns
  their rotary dims by ``-delta`` per chunk (:func:`.partial.shift_query`), computes partial
  attention over its chunks, merges them and returns one ``(o, lse)``; the requester merges it
  with its own partials (:func:`.merge.merge_partials`).

Both are exact: they equal attention over the requester's sequence with every chunk's keys
computed at their new positions (tests/server/xattn/test_transport.py).

Wire format (int64 unless said; ``dtype`` is the KV dtype, ``Hq``/``Hkv`` heads). A route
is opened once per step and then costs one message each way per layer, in layer order (the
query of layer ``l`` exists only after layer ``l - 1``)::

    route  R->H  header [ROUTE, T, n, layers]; meta [q_pos (T) | chunk ids (n) | deltas (n)]
           per layer l = 0 .. layers-1:
           R->H  q (T, Hq, qk_dim) dtype
           H->R  bytes [o (T, Hq, v_dim) result_dtype | lse (T*Hq) fp32 | status fp32]
                 (status != 0: a chunk is not held; the holder ends the route there)
    fetch  R->H  header [FETCH, n, 0, 0]; chunk ids (n)
           H->R  rows per chunk (n) (-1: not held, and nothing follows);
                 bytes [positions (rows) | k (L, rows, Hkv, qk_dim) | v (L, rows, Hkv, v_dim)]
    stop   R->H  header [STOP, 0, 0, 0]

Consecutive messages in one direction cost a wake-up each on gloo (three back-to-back sends
took ~4 ms against ~0.1 ms for one on a loaded 2-core host), so payloads are packed into one
byte message per direction wherever the receiver can size it.

The code is device-agnostic: gloo moves CPU tensors, NCCL moves CUDA tensors (``device``);
shapes travel ahead of payloads because NCCL needs both ends to post matching sizes. Bounded
waits come from the process group's ``timeout``.

Example (rank 1 holds chunk 7, rank 0 routes its queries to it)::

    Holder(spec, rope, {7: chunk}, device="cpu").serve(peer=0)                   # rank 1
    route = Requester(spec, rope, device="cpu").open_route(1, q_pos, [7], [delta])  # rank 0
    part = route.layer(q)          # once per layer, in order
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist
from torch import Tensor

from leyline.errors import LeylineError
from leyline.server.core.rope import RopeSpec, rotate
from leyline.server.core.xattn.merge import merge_partials
from leyline.server.core.xattn.partial import (
    AttnSpec,
    Partial,
    empty_partial,
    partial_attention,
    shift_query,
)

__all__ = ["Chunk", "ChunkNotHeld", "Fetched", "Holder", "Op", "Requester", "Route"]

_HEADER = 4


class Op(IntEnum):
    """First word of a request header."""

    STOP = 0
    ROUTE = 1
    FETCH = 2


class ChunkNotHeld(LeylineError, LookupError):
    """The holder was asked for a chunk it does not keep (the placement map is stale)."""


@dataclass(frozen=True, slots=True, eq=False)
class Chunk:
    """One chunk's KV on its holder, all layers: ``k (L, n, Hkv, qk_dim)`` as cached (rotated
    for ``positions``), ``v (L, n, Hkv, v_dim)`` or None for MLA, ``positions (n,)`` int64.

    An engine adapter gathers these rows from its pool slots (:mod:`leyline.server.core.layout`).
    """

    k: Tensor
    v: Tensor | None
    positions: Tensor

    def __post_init__(self) -> None:
        if self.k.dim() != 4 or self.positions.shape != (self.k.shape[1],):
            raise ValueError("Chunk needs k (L, n, Hkv, qk_dim) and positions (n,)")
        if self.v is not None and tuple(self.v.shape[:3]) != tuple(self.k.shape[:3]):
            raise ValueError("Chunk v must be (L, n, Hkv, v_dim) like k")


@dataclass(frozen=True, slots=True, eq=False)
class Fetched:
    """Fetched KV ready for the requester's pool: keys rotated to ``positions`` (the new ones)."""

    k: Tensor
    v: Tensor | None
    positions: Tensor


def _send(x: Tensor, peer: int, group: dist.ProcessGroup | None) -> None:
    dist.send(x.contiguous(), peer, group=group)


def _recv(shape: Sequence[int], dtype: torch.dtype, device: torch.device, peer: int,
          group: dist.ProcessGroup | None) -> Tensor:  # fmt: skip
    x = torch.empty(tuple(shape), dtype=dtype, device=device)
    dist.recv(x, peer, group=group)
    return x


def _pack(*xs: Tensor) -> Tensor:
    """Tensors as one flat byte tensor (one message)."""
    return torch.cat([x.contiguous().reshape(-1).view(torch.uint8) for x in xs])


def _unpack(buf: Tensor, *specs: tuple[tuple[int, ...], torch.dtype]) -> list[Tensor]:
    """Inverse of :func:`_pack` for known shapes and dtypes."""
    out, at = [], 0
    for shape, dtype in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(buf[at : at + n].view(dtype).reshape(shape))
        at += n
    if at != buf.numel():
        raise AssertionError(f"packed message has {buf.numel()} bytes, expected {at}")
    return out


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class Holder:
    """Serves route and fetch requests for the chunks it keeps, one requester at a time."""

    def __init__(
        self,
        spec: AttnSpec,
        rope: RopeSpec,
        chunks: Mapping[int, Chunk],
        *,
        device: torch.device | str,
        result_dtype: torch.dtype = torch.float32,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if rope.rotary_dim != spec.rope_dim:
            raise ValueError(f"rope spec rotates {rope.rotary_dim} dims, the layer {spec.rope_dim}")
        dtypes = {c.k.dtype for c in chunks.values()}
        if len(dtypes) > 1:
            raise ValueError(f"all chunks must share one dtype, got {dtypes}")
        self.spec, self.rope, self.chunks = spec, rope, dict(chunks)
        self.device = torch.device(device)
        self.dtype = dtypes.pop() if dtypes else torch.float32
        self.result_dtype, self.group = result_dtype, group

    def serve(self, peer: int) -> int:
        """Answer ``peer``'s requests until it sends STOP; return how many were answered."""
        served = 0
        while True:
            header = _recv((_HEADER,), torch.int64, self.device, peer, self.group).tolist()
            op = Op(header[0])
            if op is Op.STOP:
                return served
            if op is Op.ROUTE:
                self._route(peer, t=header[1], n=header[2], layers=header[3])
            else:
                self._fetch(peer, n=header[1])
            served += 1

    def _route(self, peer: int, *, t: int, n: int, layers: int) -> None:
        spec, dev = self.spec, self.device
        meta = _recv((t + 2 * n,), torch.int64, dev, peer, self.group)
        q_pos, ids, deltas = meta[:t], meta[t : t + n].tolist(), meta[t + n :].tolist()
        held = all(i in self.chunks for i in ids)
        for layer in range(layers):
            q = _recv((t, spec.q_heads, spec.qk_dim), self.dtype, dev, peer, self.group)
            parts = []
            for cid, d in zip(ids if held else (), deltas, strict=False):
                c = self.chunks[cid]
                v = c.v[layer] if c.v is not None else None
                qc = shift_query(q, d, spec, self.rope)
                parts.append(partial_attention(qc, c.k[layer], v, spec, q_pos=q_pos,
                                               k_pos=c.positions + d))  # fmt: skip
            out = merge_partials(parts) if parts else empty_partial(t, spec, dev)
            status = torch.tensor([0.0 if held else 1.0], dtype=torch.float32, device=dev)
            _send(_pack(out.o.to(self.result_dtype), out.lse, status), peer, self.group)
            if not held:
                return

    def _fetch(self, peer: int, *, n: int) -> None:
        ids = _recv((n,), torch.int64, self.device, peer, self.group).tolist()
        chunks = [self.chunks.get(i) for i in ids]
        held = [c for c in chunks if c is not None]
        counts = [-1 if c is None else c.positions.numel() for c in chunks]
        _send(torch.tensor(counts, dtype=torch.int64, device=self.device), peer, self.group)
        if len(held) < len(chunks) or not held:
            return
        parts = [torch.cat([c.positions for c in held]), torch.cat([c.k for c in held], dim=1)]
        if self.spec.kind == "gqa":
            parts.append(torch.cat([c.v for c in held if c.v is not None], dim=1))
        _send(_pack(*parts), peer, self.group)


class Route:
    """One routed step: the holder's partial for each layer's query, in layer order.

    Made by :meth:`Requester.open_route`; call :meth:`layer` exactly ``layers`` times.
    """

    def __init__(self, req: Requester, holder: int, t: int, layers: int) -> None:
        self._req, self._holder, self._t, self._layers = req, holder, t, layers
        self.next_layer = 0

    def layer(self, q: Tensor) -> Partial:
        """Send layer ``next_layer``'s query rows ``(T, Hq, qk_dim)``; its merged ``Partial``."""
        req, spec, t = self._req, self._req.spec, self._t
        if self.next_layer >= self._layers:
            raise RuntimeError(f"this route was opened for {self._layers} layers")
        if q.dtype != req.dtype or tuple(q.shape) != (t, spec.q_heads, spec.qk_dim):
            raise ValueError(f"q must be {req.dtype} ({t}, {spec.q_heads}, {spec.qk_dim})")
        _send(q.to(req.device), self._holder, req.group)
        o_shape = (t, spec.q_heads, spec.v_dim)
        size = _nbytes(o_shape, req.result_dtype) + 4 * (t * spec.q_heads + 1)
        buf = _recv((size,), torch.uint8, req.device, self._holder, req.group)
        o, lse, status = _unpack(buf, (o_shape, req.result_dtype),
                                 ((t, spec.q_heads), torch.float32), ((1,), torch.float32))  # fmt: skip
        self.next_layer += 1
        if status.item() != 0:
            self.next_layer = self._layers  # the holder has ended this route
            raise ChunkNotHeld(f"rank {self._holder} does not hold some of the routed chunks")
        return Partial(o.float(), lse.clone())


class Requester:
    """Routes query rows to holders, or fetches chunks from them (see module doc)."""

    def __init__(
        self,
        spec: AttnSpec,
        rope: RopeSpec,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        num_layers: int = 1,
        result_dtype: torch.dtype = torch.float32,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if rope.rotary_dim != spec.rope_dim:
            raise ValueError(f"rope spec rotates {rope.rotary_dim} dims, the layer {spec.rope_dim}")
        self.spec, self.rope, self.num_layers = spec, rope, num_layers
        self.device, self.dtype = torch.device(device), dtype
        self.result_dtype, self.group = result_dtype, group

    def open_route(
        self,
        holder: int,
        q_pos: Tensor,
        chunk_ids: Sequence[int],
        deltas: Sequence[int],
        *,
        layers: int | None = None,
    ) -> Route:
        """Start routing ``len(q_pos)`` query rows at positions ``q_pos`` to the holder's chunks
        placed at ``positions + delta``, for ``layers`` (default: all) layers from layer 0."""
        n, layers = len(chunk_ids), self.num_layers if layers is None else layers
        if len(deltas) != n:
            raise ValueError(f"{n} chunk ids but {len(deltas)} deltas")
        if not 1 <= layers <= self.num_layers:
            raise ValueError(f"layers must be in [1, {self.num_layers}], got {layers}")
        if q_pos.dim() != 1 or q_pos.is_floating_point():
            raise ValueError("q_pos must be a 1-D integer tensor")
        t, dev = q_pos.numel(), self.device
        _send(torch.tensor([Op.ROUTE, t, n, layers], dtype=torch.int64, device=dev), holder,
              self.group)  # fmt: skip
        meta = [*q_pos.tolist(), *chunk_ids, *deltas]
        _send(torch.tensor(meta, dtype=torch.int64, device=dev), holder, self.group)
        return Route(self, holder, t, layers)

    def fetch(self, holder: int, chunk_ids: Sequence[int], deltas: Sequence[int]) -> Fetched:
        """The chunks' KV for every layer, keys rotated by their chunk's ``delta``."""
        spec, n, dev = self.spec, len(chunk_ids), self.device
        if len(deltas) != n or n == 0:
            raise ValueError(
                f"need one delta per chunk and at least one chunk, got {n}/{len(deltas)}"
            )
        _send(torch.tensor([Op.FETCH, n, 0, 0], dtype=torch.int64, device=dev), holder, self.group)
        _send(torch.tensor(list(chunk_ids), dtype=torch.int64, device=dev), holder, self.group)
        counts = _recv((n,), torch.int64, dev, holder, self.group)
        if bool((counts < 0).any()):
            gone = [c for c, k in zip(chunk_ids, counts.tolist(), strict=True) if k < 0]
            raise ChunkNotHeld(f"rank {holder} does not hold chunks {gone}")
        rows, layers, hkv = int(counts.sum()), self.num_layers, spec.kv_heads
        specs: list[tuple[tuple[int, ...], torch.dtype]] = [
            ((rows,), torch.int64),
            ((layers, rows, hkv, spec.qk_dim), self.dtype),
        ]
        if spec.kind == "gqa":
            specs.append(((layers, rows, hkv, spec.v_dim), self.dtype))
        size = sum(_nbytes(shape, dtype) for shape, dtype in specs)
        got = _unpack(_recv((size,), torch.uint8, dev, holder, self.group), *specs)
        positions, k = got[0], got[1]
        v = got[2] if spec.kind == "gqa" else None
        shift = torch.tensor(list(deltas), dtype=torch.int64, device=dev).repeat_interleave(counts)
        if spec.rope_dim:
            # NOTE: one fp32 rotation from the holder's cached key, rounded once (never chained).
            k = rotate(k, shift.view(1, rows, 1), self.rope, offset=spec.rope_offset)
        return Fetched(k, v, positions + shift)

    def stop(self, holder: int) -> None:
        """End the holder's :meth:`Holder.serve` loop."""
        _send(torch.tensor([Op.STOP, 0, 0, 0], dtype=torch.int64, device=self.device), holder,
              self.group)  # fmt: skip
