"""Leyline middleware: history policies and the adapters that turn them into directives.

- :mod:`~leyline.middleware.policies`: ``KeepAll``, ``TruncateOlderThan``, ``DropFailedToolCalls``,
  ``LastNObservations``, ``Redact``, composed with ``|``;
- :func:`wrap`: an ``openai.OpenAI`` / ``AsyncOpenAI`` client with a policy and a session;
- :func:`leyline_model` (``pip install 'leyline[langgraph]'``): a LangChain chat model for
  LangGraph agents, one session per thread id.

No torch here: the middleware is client-only.
"""

from __future__ import annotations

from typing import Any

from leyline.middleware.conversation import Conversation
from leyline.middleware.messages import check_valid, orphan_tool_messages, turn_of
from leyline.middleware.openai_wrapper import WrappedClient, wrap
from leyline.middleware.policies import (
    Compose,
    DropFailedToolCalls,
    KeepAll,
    LastNObservations,
    Policy,
    PolicyResult,
    Redact,
    TruncateOlderThan,
    looks_like_error,
)

__all__ = [
    "Compose",
    "Conversation",
    "DropFailedToolCalls",
    "KeepAll",
    "LastNObservations",
    "Policy",
    "PolicyResult",
    "Redact",
    "TruncateOlderThan",
    "WrappedClient",
    "check_valid",
    "looks_like_error",
    "orphan_tool_messages",
    "turn_of",
    "wrap",
]


def __getattr__(name: str) -> Any:
    # why: LangChain/LangGraph are an optional extra; import them only when asked for.
    if name in ("leyline_model", "LeylineChatModel"):
        from leyline.middleware import langgraph

        return getattr(langgraph, name)
    raise AttributeError(f"module 'leyline.middleware' has no attribute {name!r}")
