"""Leyline middleware: history policies and the adapters that turn them into directives.

- :mod:`~leyline.middleware.policies`: ``KeepAll``, ``TruncateOlderThan``, ``DropFailedToolCalls``
  (``.for_debug_gym()``), ``LastNObservations``, ``Redact``, ``DropReasoning``, composed with
  ``|``; a plain function ``messages -> messages`` is a policy too (``as_policy``);
- :func:`wrap`: an ``openai.OpenAI`` / ``AsyncOpenAI`` client with a policy and a session;
- ``LeylineMiddleware`` (``pip install 'leyline[langchain]'``): LangChain 1.x agent middleware
  for ``create_agent``;
- ``leyline.middleware.openai_agents`` (``pip install 'leyline[agents]'``): the OpenAI Agents SDK;
- ``leyline_model`` (deprecated, use ``LeylineMiddleware``): a LangChain chat model for
  LangGraph agents, one session per thread id.

No torch here: the middleware is client-only.
"""

from __future__ import annotations

from typing import Any

from leyline.middleware.conversation import Conversation
from leyline.middleware.messages import check_valid, orphan_tool_messages, turn_of
from leyline.middleware.openai_wrapper import WrappedClient, wrap
from leyline.middleware.policies import (
    DEBUG_GYM_FAILURE_MARKERS,
    POLICY_NAMES,
    Compose,
    DropFailedToolCalls,
    DropReasoning,
    FunctionPolicy,
    KeepAll,
    LastNObservations,
    Policy,
    PolicyFunction,
    PolicyLike,
    PolicyResult,
    Redact,
    TruncateOlderThan,
    as_policy,
    looks_like_debug_gym_failure,
    looks_like_error,
    named_policy,
)

__all__ = [
    "DEBUG_GYM_FAILURE_MARKERS",
    "POLICY_NAMES",
    "Compose",
    "Conversation",
    "DropFailedToolCalls",
    "DropReasoning",
    "FunctionPolicy",
    "KeepAll",
    "LastNObservations",
    "Policy",
    "PolicyFunction",
    "PolicyLike",
    "PolicyResult",
    "Redact",
    "TruncateOlderThan",
    "WrappedClient",
    "as_policy",
    "check_valid",
    "looks_like_debug_gym_failure",
    "looks_like_error",
    "named_policy",
    "orphan_tool_messages",
    "turn_of",
    "wrap",
]


def __getattr__(name: str) -> Any:
    # why: LangChain/LangGraph are an optional extra; import them only when asked for.
    if name in ("leyline_model", "LeylineChatModel"):
        from leyline.middleware import langgraph

        return getattr(langgraph, name)
    if name in ("LeylineMiddleware", "accounting_of", "is_redacted"):
        from leyline.middleware import langchain

        return getattr(langchain, name)
    if name in ("LeylineModelProvider", "LeylineChatCompletionsModel", "session_key_of"):
        from leyline.middleware import openai_agents

        return getattr(openai_agents, name)
    raise AttributeError(f"module 'leyline.middleware' has no attribute {name!r}")
