"""Leyline's server side: the engine-agnostic core and its two engine adapters.

- ``leyline.server.core``: RoPE math, splice kernels, token CDC, content index, planner.
- ``leyline.server.engine``: the embedded engine behind ``leyline serve``.
- ``leyline.server.sglang``: the SGLang plugin.

Needs the ``server`` extra (torch, transformers, ...): ``pip install 'leyline[server]'``.
"""

from __future__ import annotations

try:
    import numpy  # noqa: F401
    import torch  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised by the client-only packaging test
    from leyline.errors import MissingExtraError

    raise MissingExtraError("leyline.server", "server", _exc) from _exc
