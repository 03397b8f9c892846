"""Run the real embedded engine (uvicorn + FastAPI) in a thread for tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from leyline.server.engine.config import EngineConfig
from leyline.server.engine.engine import Engine
from leyline.server.engine.server import InProcessServer, free_port, serve_in_thread

RunningServer = InProcessServer


def served_kv(
    engine: Engine, session_id: str
) -> tuple[np.ndarray, list[torch.Tensor], list[torch.Tensor] | None]:
    """A session's served tokens and, per layer, the K rows and V rows (None: an MLA pool, whose
    rows are all in K) that the radix tree holds for them."""
    with engine.lock:
        state = engine.sessions.get(session_id)
        m = engine.tree.match_prefix(state.tokens, session=session_id)
        assert m.length == len(state.tokens)
        slots = torch.from_numpy(m.slots)
        keys = [k[slots].clone() for k in engine.store.k]
        values = None if engine.store.v is None else [v[slots].clone() for v in engine.store.v]
        return state.tokens.copy(), keys, values


@contextmanager
def running_server(**overrides: Any) -> Iterator[InProcessServer]:
    # The tests check per-token accounting; the shipped block granularity (docs/security.md)
    # is tested in tests/server/engine/test_tenants.py with EngineConfig's own defaults.
    settings: dict[str, Any] = {
        "model": "tiny-llama", "device": "cpu", "kv_tokens": 4096, "cache_block_tokens": 1,
    }  # fmt: skip
    settings.update(overrides)
    with serve_in_thread(EngineConfig(port=free_port(), **settings)) as srv:
        yield srv


def assert_no_leaks(engine: Engine) -> None:
    """Every used slot is owned by the radix tree (nothing private leaked)."""
    with engine.lock:
        assert engine.store.num_used == engine.tree.total_cached_tokens
        assert engine.store.num_free + engine.store.num_used == engine.store.capacity
