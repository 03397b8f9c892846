"""``leyline serve``: run the embedded engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from leyline._config import Environment
from leyline.server.core.planner import RepairWindow
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
    sec = p.add_argument_group("authentication and tenants (docs/security.md)")
    sec.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health; repeat for "
        "several keys (each is its own tenant); default: $LEYLINE_API_KEY, else no "
        "authentication",
    )
    sec.add_argument(
        "--cache-block-tokens",
        type=int,
        default=_DEFAULTS.cache_block_tokens,
        help="prefix reuse (and cached_tokens) in whole blocks of this many tokens; 1 = per "
        "token, which lets clients of one tenant probe each other's prompts",
    )
    sec.add_argument(
        "--index-all-requests",
        choices=["on", "off"],
        default="on" if _DEFAULTS.index_all_requests else "off",
        help="let requests that did not opt in to approximate reuse donate their content to "
        "content reuse (within their tenant)",
    )
    rep = p.add_argument_group("REPAIR (docs/repair.md)")
    rep.add_argument(
        "--repair-window",
        type=_window,
        default=None,
        metavar="TOKENS|PERCENT%",
        help="the recompute window of REPAIR directives that give none: tokens (default "
        f"{_DEFAULTS.repair_window.tokens}), or a share of the suffix such as 10%%",
    )
    rep.add_argument(
        "--repair-window-cap",
        type=int,
        default=None,
        metavar="TOKENS",
        help="the most tokens a --repair-window given as a share may recompute",
    )
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-sessions", type=int, default=_DEFAULTS.max_sessions)
    lim.add_argument(
        "--max-sessions-per-tenant",
        type=int,
        default=_DEFAULTS.max_sessions_per_tenant,
        help="default: --max-sessions",
    )
    lim.add_argument(
        "--max-session-ttl",
        type=float,
        default=_DEFAULTS.max_session_ttl_s,
        help="the longest TTL a client may ask for (seconds)",
    )
    lim.add_argument(
        "--max-queue",
        type=int,
        default=_DEFAULTS.max_queue,
        help="requests waiting for the engine (503 past it)",
    )
    lim.add_argument(
        "--max-running",
        type=int,
        default=_DEFAULTS.max_running,
        help="requests decoding together (their decode steps interleave)",
    )
    lim.add_argument(
        "--max-request-bytes",
        type=int,
        default=_DEFAULTS.max_request_bytes,
        help="larger bodies are refused (413) before they are read",
    )
    lim.add_argument(
        "--max-tokens-default",
        type=int,
        default=_DEFAULTS.max_tokens_default,
        help="max_tokens of a request that sets none (capped to what fits the context)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _window(text: str) -> int | float:
    """``--repair-window``: ``128`` (tokens) or ``10%`` (a share of the suffix, as 0.1)."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a token count or a percentage such as 10%, got {text!r}"
        ) from None


def _repair_window(args: argparse.Namespace) -> RepairWindow:
    """REPAIR's default window from the two flags (ValueError: a bad combination)."""
    size, cap = args.repair_window, args.repair_window_cap
    if isinstance(size, float):
        return RepairWindow(fraction=size, cap=cap)
    if cap is not None:
        raise ValueError("--repair-window-cap needs --repair-window given as a percentage")
    return _DEFAULTS.repair_window if size is None else RepairWindow(tokens=size)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    keys = args.api_keys
    if keys is None:
        env_key = Environment.read().serve_api_key
        keys = [env_key] if env_key else []
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
        api_keys=tuple(keys),
        cache_block_tokens=args.cache_block_tokens,
        index_all_requests=args.index_all_requests == "on",
        repair_window=_repair_window(args),
        max_sessions=args.max_sessions,
        max_sessions_per_tenant=args.max_sessions_per_tenant,
        max_session_ttl_s=args.max_session_ttl,
        max_queue=args.max_queue,
        max_running=args.max_running,
        max_request_bytes=args.max_request_bytes,
        max_tokens_default=args.max_tokens_default,
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
        "serving %s on http://%s:%d/v1 (kv %d tokens, %s, %s)",
        cfg.model,
        cfg.host,
        cfg.port,
        cfg.kv_tokens,
        engine.rope_note or "splicing on",
        f"{len(cfg.api_keys)} API key(s)" if cfg.api_keys else "no authentication",
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0
