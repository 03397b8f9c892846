"""What the examples share: a throw-away project to read, the questions about it, and a server
(the given base URL, or the embedded engine started in this process).

Imported by the examples next to it (``python examples/<name>.py`` puts this folder on the path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from leyline import Accounting

__all__ = ["QUESTIONS", "counts", "make_project", "server"]

#: (question, the file that answers it)
QUESTIONS = [
    ("Which functions does the parser define?", "parser.py"),
    ("What does the tokenizer do with blank lines?", "tokenizer.py"),
    ("What is the project for?", "README.md"),
    ("Does the parser handle quoted fields?", "parser.py"),
]


def counts(acc: Accounting) -> str:
    """Where an accounting's prompt tokens came from, as ``key=value`` pairs."""
    return (
        f"exact={acc.exact} inherited={acc.inherited} spliced={acc.spliced} "
        f"chunk_reused={acc.chunk_reused} recomputed={acc.recomputed}"
    )


def make_project(root: Path) -> None:
    """A few files with long enough contents that old reads are worth editing away."""
    (root / "parser.py").write_text(
        "".join(f"def parse_{i}(line):\n    return line.split(',')[{i}]\n\n" for i in range(40))
    )
    (root / "tokenizer.py").write_text(
        "".join(f"# rule {i}: blank lines are skipped, tokens are lower-cased\n" for i in range(60))
    )
    (root / "README.md").write_text("A tiny CSV toolkit: a parser and a tokenizer.\n" * 20)


@contextmanager
def server(base_url: str | None, model: str) -> Iterator[str]:
    """``base_url``, or the embedded engine started in this process."""
    if base_url:
        yield base_url
        return
    from leyline.server.engine.config import EngineConfig
    from leyline.server.engine.server import free_port, serve_in_thread

    print(f"starting the embedded engine with {model} ...", flush=True)
    with serve_in_thread(EngineConfig(model=model, port=free_port(), kv_tokens=16384)) as srv:
        yield srv.base_url
