"""Shared setup for tests/server/core.

Triton decides between compiled and interpreted kernels when it decorates them (at import), so
the interpreter switch must be set before any kernel module is imported: on a CPU-only host the
kernels then run on CPU tensors under the Triton interpreter.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
