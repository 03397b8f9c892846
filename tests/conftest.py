"""Test-session setup shared by every folder.

Triton decides between compiled and interpreted kernels when it decorates them (at import), so
the interpreter switch must be set before any test module imports a kernel (engine and
middleware tests import the engine, which imports the splice kernel): on a CPU-only host the
kernels then run on CPU tensors under the Triton interpreter.
"""

from __future__ import annotations

import os

try:
    import torch
except ImportError:  # a client-only environment: no kernels to configure
    torch = None  # type: ignore[assignment]

if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
