"""Every public module's ``__all__`` names what it defines, and the package exports resolve."""

from __future__ import annotations

import importlib
import inspect

import pytest

import leyline

MODULES = [
    "leyline", "leyline.accounting", "leyline.client", "leyline.diff", "leyline.directives",
    "leyline.errors", "leyline.protocol", "leyline.segments", "leyline.session",
    "leyline.tokens", "leyline.middleware",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_all_resolves_and_covers_public_definitions(name: str) -> None:
    mod = importlib.import_module(name)
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    for attr in exported:
        assert getattr(mod, attr, None) is not None, f"{name}.__all__ names missing {attr}"
    # public classes and functions defined in the module itself are exported
    own = {
        n for n, obj in vars(mod).items()
        if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == mod.__name__
    }  # fmt: skip
    assert own <= set(exported), f"{name} defines but does not export {sorted(own - set(exported))}"


def test_package_exports_the_wire_schema() -> None:
    from leyline import protocol

    for attr in ("Payload", "ResponseInfo", "TokenCounts", "DirectiveOutcome", "Status"):
        assert getattr(leyline, attr) is getattr(protocol, attr)
    assert leyline.PayloadError is leyline.errors.PayloadError
