"""The bytes the Leyline cache moves inside SGLang's own KV pools.

`PoolBinding` names the tensors of an `MHATokenToKVPool` (``k_buffer``/``v_buffer``) or an
`MLATokenToKVPool` (``kv_buffer``, latent first) and how their keys rotate; `PoolSplicer` runs
the core splice kernel on them: donor slots and per-token deltas on the pool's device (slices of
a device slot list where it can, since a host-to-device copy waits for the in-flight forward),
the kernel's pointer table built once, the kernel compiled at start-up, and an optional check
of every spliced row against the core's torch `rotate` (``verify``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leyline.server.core.kernels.splice import KVPointers, kv_pointers, splice_kv
from leyline.server.core.layout import KVLayout
from leyline.server.core.rope import RopeSpec, rotate

__all__ = ["PoolBinding", "PoolSplicer"]


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

    @property
    def device(self) -> torch.device:
        return self.k[0].device


@dataclass
class PoolSplicer:
    """Splices into one bound pool: copy rows to new slots, rotating the keys' rotary dims."""

    binding: PoolBinding
    kernel_impl: str = "auto"
    verify: bool = False
    checks: dict[str, Any] = field(
        default_factory=lambda: {"rows": 0, "max_abs_err": 0.0, "bit_exact_outside_rope": True}
    )
    _inv_freq: torch.Tensor | None = None
    _pointers: KVPointers | None = None

    def splice(self, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> None:
        """``K/V[dst] = K/V[src]`` for every layer, the keys' rotary part turned by ``delta``."""
        b, dev = self.binding, self.binding.device
        src, dst = src.to(dev), dst.to(dev)
        delta = torch.as_tensor(delta, dtype=torch.int64).to(dev)
        splice_kv(
            b.k, b.v, src, dst, delta,
            layout=b.layout, inv_freq=self.inv_freq(), interleaved=b.rope.interleaved,
            impl=self.kernel_impl, pointers=self._kv_pointers(),
        )  # fmt: skip
        if self.verify:
            self.check(src, dst, delta)

    def sources(
        self, runs: Any, base: Any, base_dev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Donor slots and deltas of the plan's copy ``runs`` on the pool's device. Runs copied
        from a contiguous stretch of the base (a planner `CachedSequence` whose slots are
        ``base_dev`` on the device) are slices of ``base_dev``; other donors (the content
        index's) travel from the host."""
        dev = self.binding.device
        srcs: list[torch.Tensor] = []
        deltas: list[torch.Tensor] = []
        for run in runs:
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

    def warm_up(self) -> None:
        """Compile the splice kernel now, not inside the first request (a ~1 s stall was seen).

        Splices the reserved padding slot 0 onto itself with delta 0 (its rows stay bit-equal);
        the launcher makes every later call run this same compiled variant.
        """
        zero = torch.zeros(1, dtype=torch.int64, device=self.binding.device)
        verify, self.verify = self.verify, False
        try:
            self.splice(zero, zero, zero)
        finally:
            self.verify = verify
        if self.binding.device.type == "cuda":
            torch.cuda.synchronize(self.binding.device)

    def check(self, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> None:
        """Compare spliced rows with the core's `rotate` of the donor rows; every non-rotary
        dim, V and the MLA latent must be bit-exact. Totals accumulate in ``checks``."""
        b, lay = self.binding, self.binding.layout
        worst, exact = 0.0, True
        lo, hi = lay.rope_offset, lay.rope_offset + lay.rope_dim
        for layer in range(lay.num_layers):
            donor = b.k[layer][src]
            want = rotate(donor, delta[:, None], b.rope, offset=lo)
            got = b.k[layer][dst]
            worst = max(worst, float((got.float() - want.float()).abs().max()))
            outside = torch.ones(got.shape[-1], dtype=torch.bool, device=got.device)
            outside[lo:hi] = False
            exact &= bool(torch.equal(got[..., outside], donor[..., outside]))
            if b.v is not None:
                exact &= bool(torch.equal(b.v[layer][dst], b.v[layer][src]))
        c = self.checks
        c["rows"] += len(src)
        c["max_abs_err"] = max(c["max_abs_err"], worst)
        c["bit_exact_outside_rope"] &= exact

    def inv_freq(self) -> torch.Tensor:
        """fp32 inverse frequencies on the pool's device (copied there once)."""
        if self._inv_freq is None:
            self._inv_freq = self.binding.rope.inv_freq_tensor(self.binding.device)
        return self._inv_freq

    def _kv_pointers(self) -> KVPointers | None:
        """The pool's layer-offset tables for the Triton kernel, built once (not per splice)."""
        if self._pointers is None and self.binding.k[0].is_cuda:
            self._pointers = kv_pointers(self.binding.k, self.binding.v)
        return self._pointers
