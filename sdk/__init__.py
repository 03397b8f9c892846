"""Leyline: cache-aware agent middleware and KV-cache directives.

The client half needs no torch::

    import leyline
    from openai import OpenAI

    client = leyline.wrap(OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x"))

See ``docs/protocol.md`` for the wire format.
"""

from __future__ import annotations

from typing import Any

from leyline.accounting import Accounting
from leyline.client import ChatResult, LeylineClient
from leyline.directives import Directive, Mode, validate_directives
from leyline.errors import (
    DirectiveError,
    LeylineError,
    MissingExtraError,
    PayloadError,
    ServerError,
    StaleVersionError,
    TransportError,
)
from leyline.protocol import (
    PROTOCOL_VERSION,
    DirectiveOutcome,
    Payload,
    ResponseInfo,
    Status,
    TokenCounts,
)
from leyline.segments import Segment, SegmentParams, render_segments, split_content
from leyline.session import Prepared, Session

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Accounting",
    "ChatResult",
    "Directive",
    "DirectiveError",
    "DirectiveOutcome",
    "LeylineClient",
    "LeylineError",
    "MissingExtraError",
    "Mode",
    "Payload",
    "PayloadError",
    "Prepared",
    "ResponseInfo",
    "Segment",
    "SegmentParams",
    "ServerError",
    "Session",
    "StaleVersionError",
    "Status",
    "TokenCounts",
    "TransportError",
    "__version__",
    "render_segments",
    "split_content",
    "validate_directives",
    "wrap",
]


def __getattr__(name: str) -> Any:
    # `leyline.wrap` lives in the middleware; import it on first use only.
    if name == "wrap":
        from leyline.middleware import wrap

        return wrap
    raise AttributeError(f"module 'leyline' has no attribute {name!r}")
