"""Loading a source file as a module: the examples, and middleware modules with an extra
blocked (to check the error that names the extra)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).parents[1] / "examples"


def load_module(path: Path, name: str) -> ModuleType:
    """Execute ``path`` as a fresh module called ``name`` (not put in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (its ``main(argv)`` is then called by the test), with
    the examples folder on the path as when it runs as a script (for ``examples/_project.py``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.append(str(EXAMPLES))
    return load_module(EXAMPLES / f"{name}.py", f"_example_{name}")
