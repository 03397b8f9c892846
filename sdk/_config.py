"""The one place that reads ``LEYLINE_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Environment:
    """Settings taken from the environment (each has a documented default)."""

    cache_dir: Path
    base_url: str
    api_key: str  # what the SDK sends (LEYLINE_API_KEY, else "leyline")
    serve_api_key: str | None = None  # what `leyline serve` requires (LEYLINE_API_KEY, else none)
    sglang_verify_splices: bool = False  # LEYLINE_SGLANG_VERIFY_SPLICES=1: check every splice
    # LEYLINE_SGLANG_REPAIR_WINDOW=k: the SGLang plugin's default REPAIR window in tokens
    # (unset: the core's DEFAULT_REPAIR, 128 tokens; docs/repair.md)
    sglang_repair_window: int | None = None
    # LEYLINE_SGLANG_INDEX_ALL_REQUESTS=1: every request donates its content to content reuse
    # within its tenant, not only those that opted in (docs/security.md, "On SGLang")
    sglang_index_all_requests: bool = False

    @classmethod
    def read(cls) -> Environment:
        cache = os.environ.get("LEYLINE_CACHE_DIR")
        key = os.environ.get("LEYLINE_API_KEY") or None
        return cls(
            cache_dir=Path(cache) if cache else Path.home() / ".cache" / "leyline",
            base_url=os.environ.get("LEYLINE_BASE_URL", "http://127.0.0.1:8000/v1"),
            api_key=key or "leyline",
            serve_api_key=key,
            sglang_verify_splices=os.environ.get("LEYLINE_SGLANG_VERIFY_SPLICES", "0") == "1",
            sglang_repair_window=_tokens("LEYLINE_SGLANG_REPAIR_WINDOW"),
            sglang_index_all_requests=os.environ.get("LEYLINE_SGLANG_INDEX_ALL_REQUESTS", "0")
            == "1",
        )


def _tokens(name: str) -> int | None:
    """An optional token count (a non-negative integer) from the environment."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"{name} must be a non-negative integer (tokens), got {raw!r}")
    return int(raw)
