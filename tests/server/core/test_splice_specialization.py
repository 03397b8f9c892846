"""The splice kernel compiles once per pool: no argument's alignment or value may make Triton
build another variant (on a real SGLang server each recompile stalled the scheduler 0.6-0.9 s
inside ``match_prefix``).

On CPU the kernel is interpreted, so the check runs Triton's own specialization binder (the
code that computes a launch's cache key) in a subprocess without ``TRITON_INTERPRET``, over
launches with varied lengths and slot views at odd offsets. On CUDA it also counts compiled
variants after real launches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from leyline.server.core.kernels import splice as splice_mod

needs_triton = pytest.mark.skipif(splice_mod.triton is None, reason="triton is not installed")

# Launches with varied n (1, multiples of 16, odd) and index views at every offset mod 16 bytes.
_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from leyline.server.core.kernels import splice as sp
    from leyline.server.core.layout import KVLayout
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import create_function_from_signature

    layout = KVLayout("mha", 3, 3, 80, 48, 0, 32)
    k = [torch.randn(300, 3, 80, dtype=torch.bfloat16) for _ in range(3)]
    v = [torch.randn(300, 3, 48, dtype=torch.bfloat16) for _ in range(3)]
    ptrs = sp.kv_pointers(k, v)
    inv = torch.rand(16)
    kern = sp._splice_kernel
    binder = create_function_from_signature(kern.signature, kern.params, BaseBackend)
    free = torch.arange(1, 300)  # an allocator's free list: its slices start anywhere
    keys, raw_keys = set(), set()
    for n in (1, 2, 16, 17, 32, 63, 64, 100):
        for off in range(5):
            src, dst = free[off : off + n], free[150 + off : 150 + off + n]
            delta = torch.arange(n) - 7
            grid, args, meta = sp._kernel_args(k, v, src, dst, delta, layout, inv, False, ptrs,
                                              None, True)
            _, spec, _ = binder(*args, **meta)
            keys.add(repr(spec))
            # negative control: the binder does tell an index view at another offset apart
            _, raw_spec, _ = binder(*args[:3], dst, *args[4:], **meta)
            raw_keys.add(repr(raw_spec))
    print(json.dumps({"variants": len(keys), "raw_variants": len(raw_keys)}))
    """
)


@needs_triton
def test_one_compiled_variant_for_any_length_and_slot_view() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["variants"] == 1, got
    # The probe itself can tell launches apart: views at other offsets/lengths differ.
    assert got["raw_variants"] > 1, got


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts real compilations on CUDA")
def test_cuda_compiles_once_over_varied_launches() -> None:
    from leyline.server.core.layout import KVLayout

    layout = KVLayout("mha", 3, 3, 80, 48, 0, 32)
    k = [torch.randn(300, 3, 80, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    v = [torch.randn(300, 3, 48, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    inv = torch.rand(16, device="cuda")
    free = torch.arange(1, 300, device="cuda")
    kern = splice_mod._splice_kernel

    def variants() -> int:
        return sum(len(c[0]) for c in kern.device_caches.values())

    before = variants()
    for n in (1, 2, 16, 17, 32, 63, 64, 100):
        for off in range(5):
            src, dst = free[off : off + n], free[150 + off : 150 + off + n]
            splice_mod.splice_kv_triton(k, v, src, dst, torch.arange(n, device="cuda") - 7,
                                        layout=layout, inv_freq=inv, interleaved=False)  # fmt: skip
    torch.cuda.synchronize()
    assert variants() - before <= 1
