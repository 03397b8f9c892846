"""Run the real embedded engine (uvicorn + FastAPI) in a thread for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from leyline.server.engine.config import EngineConfig
from leyline.server.engine.engine import Engine
from leyline.server.engine.server import build_server


@dataclass
class RunningServer:
    base_url: str
    engine: Engine
    model: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(**overrides: object) -> Iterator[RunningServer]:
    cfg = EngineConfig(
        **{
            "model": "tiny-llama",
            "device": "cpu",
            "port": free_port(),
            "kv_tokens": 4096,
            **overrides,
        }  # type: ignore[arg-type]
    )
    engine, app = build_server(cfg)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{cfg.port}/v1", engine, cfg.model)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


def assert_no_leaks(engine: Engine) -> None:
    """Every used slot is owned by the radix tree (nothing private leaked)."""
    with engine.lock:
        assert engine.store.num_used == engine.tree.total_cached_tokens
        assert engine.store.num_free + engine.store.num_used == engine.store.capacity
