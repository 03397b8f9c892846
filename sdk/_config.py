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
        )
