"""Triton kernels of the engine-agnostic core, each beside its plain-torch reference.

- :mod:`.splice`: copy the KV of ``n`` tokens to new slots for all layers in one launch,
  rotating the rotary part of every key by a per-token position shift (AMORTIZE splices and
  content-addressed chunk reuse). ``splice_kv`` picks the Triton kernel on CUDA (and on CPU
  under ``TRITON_INTERPRET=1``), the torch reference otherwise.
"""

from leyline.server.core.kernels.splice import (
    KVPointers,
    kv_pointers,
    splice_kv,
    splice_kv_ref,
    splice_kv_triton,
)

__all__ = ["KVPointers", "kv_pointers", "splice_kv", "splice_kv_ref", "splice_kv_triton"]
