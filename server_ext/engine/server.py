"""Assemble a running engine from an :class:`EngineConfig`: model, KV store, RoPE, HTTP app."""

from __future__ import annotations

import logging

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
    )


def build_server(cfg: EngineConfig) -> tuple[Engine, FastAPI]:
    """A started engine and its HTTP app."""
    from leyline.server.engine.api import create_app

    engine = build_engine(cfg)
    engine.start()
    app = create_app(engine, model_name=cfg.model, max_request_bytes=cfg.max_request_bytes)
    return engine, app
