"""``leyline serve``: run the embedded engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from leyline.server.engine.config import EngineConfig

_DEFAULTS = EngineConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leyline serve",
        description="Serve a Hugging Face model with directive-aware, content-addressed KV "
        "caching behind an OpenAI-compatible API.",
    )
    p.add_argument(
        "--model",
        default=_DEFAULTS.model,
        help="smollm2 (default), tiny-llama, tiny-deepseek, or a local HF model dir",
    )
    p.add_argument("--host", default=_DEFAULTS.host)
    p.add_argument("--port", type=int, default=_DEFAULTS.port)
    p.add_argument("--device", default=_DEFAULTS.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default=_DEFAULTS.dtype, choices=["auto", "float32", "bfloat16", "float16"]
    )
    p.add_argument(
        "--kv-tokens", type=int, default=_DEFAULTS.kv_tokens, help="KV pool capacity in tokens"
    )
    p.add_argument(
        "--content-reuse",
        choices=["on", "off"],
        default="on" if _DEFAULTS.content_reuse else "off",
        help="reuse moved content found by chunk hash (approximate)",
    )
    p.add_argument(
        "--session-ttl",
        type=float,
        default=_DEFAULTS.session_ttl_s,
        help="seconds an idle session keeps its cache locked",
    )
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return dataclasses.replace(
        _DEFAULTS,
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        kv_tokens=args.kv_tokens,
        content_reuse=args.content_reuse == "on",
        session_ttl_s=args.session_ttl,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"leyline serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    import uvicorn

    from leyline.server.engine.server import build_server

    engine, app = build_server(cfg)
    logging.getLogger("leyline.serve").info(
        "serving %s on http://%s:%d/v1 (kv %d tokens, %s)",
        cfg.model,
        cfg.host,
        cfg.port,
        cfg.kv_tokens,
        engine.rope_note or "splicing on",
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0
