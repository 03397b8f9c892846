"""Fixtures for the middleware tests: the stub OpenAI-compatible server (see stub_server.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# why: tests/ folders have no __init__.py and `middleware` is also the source folder's name, so
# the stub is imported as a top-level module from this folder.
sys.path.insert(0, str(Path(__file__).parent))

from stub_server import StubOpenAIServer


@pytest.fixture
def make_stub() -> Iterator[Callable[..., StubOpenAIServer]]:
    """Start stub servers (``leyline=``, ``strict=``); all are stopped after the test."""
    started: list[StubOpenAIServer] = []

    def make(**kwargs: Any) -> StubOpenAIServer:
        server = StubOpenAIServer(**kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def stub(make_stub: Callable[..., StubOpenAIServer]) -> StubOpenAIServer:
    """A stub that speaks Leyline (returns accounting)."""
    return make_stub()
