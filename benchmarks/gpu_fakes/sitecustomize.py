"""FAKE modules for SGLang's CUDA-only dependencies, for benchmarks/sglang_splice_gpu.py only.

The GPU machine takes at most 64 MiB of wheels per run; ``sgl_kernel``, ``flashinfer`` and
``xgrammar`` are hundreds of MB. SGLang imports them at module load (quantization, attention,
grammar backends) but the splice benchmark never calls them: it drives the KV pools, the
allocator and the radix cache. Put this folder on PYTHONPATH to let those imports succeed with
inert stand-ins; any *call* into them raises, so a benchmark that needed them would fail loudly.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

_FAKED = ("sgl_kernel", "flashinfer", "xgrammar")


class _Inert:
    """Any attribute is another inert value (``scalar_types.uint4b8``); calling one raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"FAKE {self._name} called: this stand-in only satisfies imports")


def _inert(name: str) -> Any:
    if name[:1].isupper():
        # classes may appear in pydantic models' annotations (xgrammar.StructuralTag)
        from pydantic import BaseModel, ConfigDict

        return type(name, (BaseModel,), {"model_config": ConfigDict(extra="allow")})
    return _Inert(name)


class _FakeModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = _inert(attr)
        setattr(self, attr, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.split(".")[0] in _FAKED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _FakeModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


sys.meta_path.insert(0, _Finder())
