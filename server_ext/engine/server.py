"""Assemble a running engine from an :class:`EngineConfig`: model, KV store, RoPE, HTTP app."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI

from leyline.server.core.rope import RopeSpec, UnsupportedRope
from leyline.server.engine.config import EngineConfig
from leyline.server.engine.engine import Engine
from leyline.server.engine.model import load_model
from leyline.server.engine.store import KVStore

log = logging.getLogger("leyline.serve")


def build_engine(cfg: EngineConfig) -> Engine:
    """Load the model and allocate the KV pool; the engine is not started."""
    device = cfg.resolved_device()
    loaded = load_model(cfg.model, device=device, dtype=cfg.resolved_dtype())
    store = KVStore(loaded.layout, cfg.kv_tokens, dtype=loaded.dtype, device=device)
    inv_freq: torch.Tensor | None = None
    interleaved = False
    note = None
    try:
        # NOTE: the pool stores keys in the model's own pair layout (forward.py re-interleaves
        # DeepSeek's rope part like SGLang does), i.e. the semantic spec, not HF's cache order.
        spec = RopeSpec.from_hf_config(loaded.model.config)
        if spec.rotary_dim != loaded.layout.rope_dim:
            raise UnsupportedRope(
                f"rotary dims {spec.rotary_dim} differ from the pool's {loaded.layout.rope_dim}"
            )
        inv_freq = spec.inv_freq_tensor(device)
        interleaved = spec.interleaved
    except UnsupportedRope as exc:
        note = f"splicing disabled: {exc}"
        log.warning("%s; serving exact prefix reuse only", note)
    return Engine(
        loaded,
        store,
        inv_freq=inv_freq,
        interleaved=interleaved,
        content_reuse=cfg.content_reuse,
        session_ttl_s=cfg.session_ttl_s,
        max_sessions=cfg.max_sessions,
        max_queue=cfg.max_queue,
        seed=cfg.seed,
        rope_note=note,
        max_session_ttl_s=cfg.max_session_ttl_s,
        max_sessions_per_tenant=cfg.max_sessions_per_tenant,
        max_running=cfg.max_running,
        cache_block_tokens=cfg.cache_block_tokens,
        index_all_requests=cfg.index_all_requests,
        repair=cfg.repair_window,
    )


def build_server(cfg: EngineConfig) -> tuple[Engine, FastAPI]:
    """A started engine and its HTTP app."""
    from leyline.server.engine.api import create_app

    engine = build_engine(cfg)
    engine.start()
    app = create_app(engine, cfg)
    return engine, app


@dataclass
class InProcessServer:
    """A running engine behind HTTP in this process (see :func:`serve_in_thread`)."""

    base_url: str
    engine: Engine
    model: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_in_thread(cfg: EngineConfig) -> Iterator[InProcessServer]:
    """Start the engine and uvicorn on a background thread; stop both on exit.

    Used by ``leyline demo``, the evals and the tests: the real server, minus a subprocess.
    """
    import uvicorn

    engine, app = build_server(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="leyline-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {cfg.host}:{cfg.port}")
            time.sleep(0.02)
        yield InProcessServer(f"http://{cfg.host}:{cfg.port}/v1", engine, cfg.model)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
