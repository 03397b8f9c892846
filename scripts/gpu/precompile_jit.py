"""Prebuild one of SGLang 0.5.16's tvm-ffi JIT kernels for sm_90a on a machine without a GPU.

The real server compiles these at first use (~30 s of nvcc each). The cache is content-addressed
(module arguments, source hash, arch, tvm-ffi version), so the built .so files load as they are
on an H100/H200 when TVM_FFI_CACHE_DIR points at them. Run by stage.sh as
``TVM_FFI_CACHE_DIR=... PYTHONPATH=<apache-tvm-ffi for this python> python precompile_jit.py NAME``
with a Python that has CPU torch and sglang 0.5.16; CUDA_HOME must name the real toolkit.

The GPU queries tvm-ffi makes while building are answered for an sm_90 device with CUDA 13.
"""

from __future__ import annotations

import sys
import time

import torch

torch.version.cuda = "13.0"
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.device_count = lambda: 1

import sglang.srt.utils.common as common  # noqa: E402

common.get_cuda_version = lambda: (13, 0)


def build(name: str) -> None:
    from sglang.jit_kernel import activation, clamp_position, kvcache, rope

    builders = {
        "act": lambda: activation._jit_activation_module(torch.bfloat16),
        "rope128": lambda: rope._jit_fused_rope_module(True, 128, torch.bfloat16),
        "rope64i": lambda: rope._jit_fused_rope_module(False, 64, torch.bfloat16),
        "kv2048": lambda: kvcache._jit_kvcache_module(2048),  # 8 KV heads x 128 x bf16
        "clamp64": lambda: clamp_position._jit_clamp_position_module(torch.int64),
        "clamp32": lambda: clamp_position._jit_clamp_position_module(torch.int32),
    }
    if name not in builders:
        raise SystemExit(f"unknown module {name!r}; one of {sorted(builders)}")
    t = time.time()
    builders[name]()
    print(f"{name} built in {time.time() - t:.1f} s")


if __name__ == "__main__":
    build(sys.argv[1])
