"""Configuration of ``leyline serve``; the CLI's defaults come from here."""

from __future__ import annotations

from dataclasses import dataclass

from leyline.server.core.planner import DEFAULT_REPAIR, RepairWindow


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the embedded engine needs to start.

    ``device``/``dtype`` ``"auto"`` pick CUDA + bfloat16 when a GPU is present, else CPU +
    float32. ``kv_tokens`` is the KV pool's capacity in tokens (all layers).

    Security (docs/security.md): ``api_keys`` empty serves everyone (no authentication);
    otherwise every route but ``/health`` needs ``Authorization: Bearer <one of them>`` and each
    key is its own tenant. ``cache_block_tokens`` is the granularity of prefix reuse and so of
    ``cached_tokens`` (1 = per token, an exact side channel within a tenant).
    ``index_all_requests`` lets requests that did not opt in to approximate reuse donate their
    content to requests that did (same tenant only). ``repair_window`` is REPAIR's window for
    directives that give none (docs/repair.md).

    Limits: ``max_sessions`` open sessions in all (``max_sessions_per_tenant`` each, ``None`` =
    no per-tenant cap), a session's TTL at most ``max_session_ttl_s``, ``max_queue`` requests
    waiting, ``max_running`` decoding together (their decode steps interleave), request bodies
    of at most ``max_request_bytes``.
    """

    model: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    kv_tokens: int = 32768
    content_reuse: bool = True
    session_ttl_s: float = 600.0
    max_sessions: int = 1024
    max_request_bytes: int = 8 * 1024 * 1024
    max_queue: int = 256
    max_tokens_default: int = 256
    seed: int = 0
    api_keys: tuple[str, ...] = ()
    max_session_ttl_s: float = 3600.0
    max_sessions_per_tenant: int | None = None
    max_running: int = 8
    cache_block_tokens: int = 16
    index_all_requests: bool = False
    repair_window: RepairWindow = DEFAULT_REPAIR

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.kv_tokens < 64:
            raise ValueError(f"kv_tokens must be >= 64, got {self.kv_tokens}")
        if self.session_ttl_s <= 0 or self.max_sessions < 1 or self.max_queue < 1:
            raise ValueError("session_ttl_s, max_sessions and max_queue must be positive")
        if self.max_request_bytes < 1024 or self.max_tokens_default < 1:
            raise ValueError("max_request_bytes must be >= 1024 and max_tokens_default >= 1")
        if not self.session_ttl_s <= self.max_session_ttl_s < float("inf"):
            raise ValueError(
                f"max_session_ttl_s must be finite and >= session_ttl_s ({self.session_ttl_s}), "
                f"got {self.max_session_ttl_s}"
            )
        per_tenant = self.max_sessions_per_tenant
        if per_tenant is not None and not 1 <= per_tenant <= self.max_sessions:
            raise ValueError(
                f"max_sessions_per_tenant must lie in [1, max_sessions], got {per_tenant}"
            )
        if self.max_running < 1 or self.cache_block_tokens < 1:
            raise ValueError("max_running and cache_block_tokens must be >= 1")
        if isinstance(self.api_keys, str):
            raise ValueError("api_keys is a tuple of keys, not one string")
        for key in self.api_keys:
            if not key or key != key.strip() or not key.isprintable() or not key.isascii():
                raise ValueError("API keys must be non-empty printable ASCII without surrounding "
                                 "whitespace")  # fmt: skip

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.resolved_device() == "cpu" else "bfloat16"
