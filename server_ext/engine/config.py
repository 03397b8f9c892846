"""Configuration of ``leyline serve``; the CLI's defaults come from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the embedded engine needs to start.

    ``device``/``dtype`` ``"auto"`` pick CUDA + bfloat16 when a GPU is present, else CPU +
    float32. ``kv_tokens`` is the KV pool's capacity in tokens (all layers).
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

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.resolved_device() == "cpu" else "bfloat16"
