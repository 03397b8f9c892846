"""Import core modules from the source tree when the package is not installed (the GPU machine
has no copy of leyline): bare parent packages, because ``leyline.server``'s ``__init__`` pulls in
the whole server stack and the core modules need none of it."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_PARENTS = (
    ("leyline", "sdk"),
    ("leyline.server", "server_ext"),
    ("leyline.server.core", "server_ext/core"),
)


def import_core(name: str) -> types.ModuleType:
    """``import_core("leyline.server.core.chunking")``: installed package first, else the tree."""
    try:
        return importlib.import_module(name)
    except ImportError:
        for package, folder in _PARENTS:
            module = types.ModuleType(package)
            module.__path__ = [str(_ROOT / folder)]
            sys.modules[package] = module
        return importlib.import_module(name)
