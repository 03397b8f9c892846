"""The Leyline payload and accounting at SGLang's OpenAI layer (main process, through hooks).

Hooks registered with SGLang's `HookRegistry` from `plugin.register` in the process that serves
HTTP. In: ``_validate_request`` of ``OpenAIServingChat`` and ``OpenAIServingCompletion``
(AFTER, `validate_payload`) parses ``custom_params.leyline`` with `leyline.protocol.Payload`;
a malformed payload is answered 400 with the message the embedded engine gives, before anything
reaches the scheduler.

Out: the scheduler-side cache sets ``req.customized_info["leyline"] = [json]`` (a
`leyline.protocol.ResponseInfo`); SGLang ships it to the tokenizer manager as
``meta_info["leyline"]`` (a per-output-token list, so the JSON sits in its first entry). Three
hooks lift it to the top-level ``"leyline"`` object the client reads, add
``approximate_tokens`` to ``usage.prompt_tokens_details`` (SGLang's ``cached_tokens`` is kept)
and copy the object to ``usage.leyline`` (`leyline.protocol.with_accounting`):

- ``OpenAIServingChat._build_chat_response`` (AFTER): the non-streaming response is rebuilt as
  `LeylineChatCompletionResponse` (a `ChatCompletionResponse` with a ``leyline`` field);
- ``TokenizerManager.generate_request`` (AROUND): the first accounting seen in a stream's
  outputs is kept on the `GenerateReqInput` (the stream's meta_info drops it after chunk 1);
- ``OpenAIServingChat._generate_chat_stream`` (AROUND): the final usage chunk
  (``choices == []`` with ``usage``) gets ``"leyline"`` added.

Requests without a Leyline payload carry no accounting and pass through unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)

from leyline.errors import PayloadError
from leyline.protocol import Payload
from leyline.protocol import with_accounting as usage_with_accounting

__all__ = [
    "ACCOUNTING_KEY",
    "HOOK_TARGETS",
    "LeylineChatCompletionResponse",
    "accounting_from_meta_info",
    "around_chat_stream",
    "around_generate_request",
    "install_http_hooks",
    "validate_payload",
    "with_accounting",
]

logger = logging.getLogger("leyline.sglang")

ACCOUNTING_KEY = "leyline"
_STASH_ATTR = "_leyline_accounting"
_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
_COMPLETION = "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion"
_TM = "sglang.srt.managers.tokenizer_manager.TokenizerManager"


class LeylinePromptTokensDetails(PromptTokensDetails):
    """SGLang's prompt token details plus ``approximate_tokens`` (docs/protocol.md)."""

    approximate_tokens: int = 0


class LeylineUsageInfo(UsageInfo):
    """SGLang's usage plus ``usage.leyline``, a copy of the accounting (docs/protocol.md)."""

    prompt_tokens_details: LeylinePromptTokensDetails | None = None
    leyline: dict[str, Any] | None = None


class LeylineChatCompletionResponse(ChatCompletionResponse):
    """SGLang's chat completion response plus the top-level ``leyline`` accounting object."""

    usage: LeylineUsageInfo
    leyline: dict[str, Any] | None = None


def validate_payload(
    result: str | None, serving: Any, request: Any, *_a: Any, **_k: Any
) -> str | None:
    """AFTER hook of ``_validate_request``: the error message of a malformed Leyline payload,
    which SGLang answers 400 (``create_error_response``); None keeps SGLang's own verdict."""
    if result:
        return None
    try:
        Payload.from_custom_params(getattr(request, "custom_params", None))
    except PayloadError as exc:
        return str(exc)
    return None


def accounting_from_meta_info(meta_info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The accounting dict carried in a request's ``meta_info``, or None.

    Accepts the shape SGLang delivers (a list whose first non-null entry is the JSON string)
    as well as a bare JSON string or dict; malformed values are logged and dropped.
    """
    if not meta_info:
        return None
    value = meta_info.get(ACCOUNTING_KEY)
    if isinstance(value, list | tuple):
        value = next((v for v in value if v is not None), None)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            logger.warning("leyline: unreadable accounting in meta_info: %s", exc)
            return None
    return dict(value) if isinstance(value, Mapping) else None


def with_accounting(
    result: Any, serving: Any, request: Any, ret: list[dict[str, Any]], *_a: Any, **_k: Any
) -> Any:
    """AFTER hook of ``_build_chat_response``: the response with ``leyline`` set, when any."""
    if not isinstance(result, ChatCompletionResponse) or not ret:
        return result  # an error response (ORJSONResponse) passes through
    # NOTE: with n > 1 every choice is a copy of one prompt; its first item is the accounting.
    wire = accounting_from_meta_info(ret[0].get("meta_info"))
    if wire is None:
        return result
    fields = {name: getattr(result, name) for name in ChatCompletionResponse.model_fields}
    usage = usage_with_accounting(result.usage.model_dump(), wire)
    fields["usage"] = LeylineUsageInfo.model_validate(usage)
    return LeylineChatCompletionResponse(**fields, leyline=wire)


async def around_generate_request(
    original: Callable[..., AsyncIterator[Any]], manager: Any, obj: Any, *args: Any, **kwargs: Any
) -> AsyncIterator[Any]:
    """AROUND hook of ``TokenizerManager.generate_request``: keep the first accounting on ``obj``."""
    async for out in original(manager, obj, *args, **kwargs):
        if getattr(obj, _STASH_ATTR, None) is None:
            first = out[0] if isinstance(out, list) and out else out
            if isinstance(first, Mapping):
                wire = accounting_from_meta_info(first.get("meta_info"))
                if wire is not None:
                    setattr(obj, _STASH_ATTR, wire)
        yield out


async def around_chat_stream(
    original: Callable[..., AsyncIterator[str]],
    serving: Any,
    adapted_request: Any,
    *args: Any,
    **kwargs: Any,
) -> AsyncIterator[str]:
    """AROUND hook of ``_generate_chat_stream``: add ``leyline`` (and ``approximate_tokens``)
    to the final usage chunk."""
    async for chunk in original(serving, adapted_request, *args, **kwargs):
        wire = getattr(adapted_request, _STASH_ATTR, None)
        if wire is not None and _is_usage_chunk(chunk):
            body = json.loads(chunk[len("data: ") :])
            body["usage"] = usage_with_accounting(body["usage"], wire)
            body[ACCOUNTING_KEY] = wire
            chunk = f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
        yield chunk


def _is_usage_chunk(chunk: str) -> bool:
    # The final usage chunk is the only one with empty choices and a usage object (the sglext
    # chunk has ``"usage":null``); cheap substring tests avoid parsing every token's chunk.
    return chunk.startswith("data: {") and '"choices":[]' in chunk and '"usage":{' in chunk


HOOK_TARGETS: tuple[tuple[str, str, Callable[..., Any]], ...] = (
    (f"{_CHAT}._validate_request", "after", validate_payload),
    (f"{_COMPLETION}._validate_request", "after", validate_payload),
    (f"{_CHAT}._build_chat_response", "after", with_accounting),
    (f"{_TM}.generate_request", "around", around_generate_request),
    (f"{_CHAT}._generate_chat_stream", "around", around_chat_stream),
)


def install_http_hooks() -> list[str]:
    """Register the hooks with SGLang's `HookRegistry` (applied by ``load_plugins``); idempotent.

    Returns the targets newly registered.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    kinds = {"after": HookType.AFTER, "around": HookType.AROUND}
    added = []
    for target, kind, hook in HOOK_TARGETS:
        # NOTE: HookRegistry has no public lookup; its class-level table is read to stay idempotent.
        if any(h is hook for _t, h, _s in HookRegistry._hooks.get(target, ())):
            continue
        HookRegistry.register(target, hook, kinds[kind])
        added.append(target)
    return added
