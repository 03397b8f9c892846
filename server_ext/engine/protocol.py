"""HTTP request/response schemas (pydantic, at the boundary only) and OpenAI-shaped errors.

Unknown request fields are errors (400), and so are OpenAI parameters this server does not
implement when they ask for something (``logprobs: true``, ``echo: true``, a penalty, ...):
ignoring them would answer a different question than the one asked. Bodies are read with
:func:`load_json`, which refuses what Python's parser lets through (NaN/Infinity, lone
surrogates, nesting deep enough to exhaust the stack).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_JSON_DEPTH = 64


class APIError(Exception):
    """An error answered in OpenAI's shape; raising it changes nothing in the engine."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, code=self.code, param=self.param, type=self.type)


def error_body(
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str = "invalid_request_error",
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx of this server."""

    error: ErrorDetail


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(raw: bytes) -> Any:
    """Parse a request body strictly; raises :class:`APIError` (400 ``invalid_json``)."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise APIError(400, "malformed JSON: nested too deeply", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise APIError(400, f"malformed JSON: {exc}", code="invalid_json") from exc
    _check_values(data)
    return data


def _check_values(data: Any) -> None:
    """Iteratively: nesting depth, finite numbers (1e400 parses as inf), UTF-8-clean strings."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
            )
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(
                    400, "a string holds a lone UTF-16 surrogate", code="invalid_json"
                ) from exc
        elif isinstance(value, float) and value - value != 0.0:
            raise APIError(400, "numbers must be finite", code="invalid_json")


# Parameters of OpenAI's API that this server does not implement, with the values that ask
# for nothing (accepted). Any other value is a 400 ``unsupported_parameter``.
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "functions": (None,),
    "function_call": (None,),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # torch's seed range
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    # the tenant's cache namespace (vLLM's convention; docs/security.md)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    # accepted and without effect here
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None
    # not implemented: refused unless they ask for nothing (see _UNSUPPORTED_DEFAULTS)
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    response_format: Any = None
    modalities: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    def unsupported(self) -> str | None:
        """The first parameter that asks for something this server does not implement."""
        for name, fine in _UNSUPPORTED_DEFAULTS.items():
            value = getattr(self, name)
            if not any(value == ok and type(value) is type(ok) for ok in fine):
                return name
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TextPart(BaseModel):
    """A message content part; only text is served."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # The Leyline payload, read by leyline.protocol.Payload.from_request (the one parser):
    # custom_params.leyline (a JSON string, what the SDK sends) or a top-level leyline object.
    leyline: Any = None
    custom_params: Any = None
    prompt_cache_key: str | None = None  # OpenAI's: names the session when the payload does not

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(min_length=1)


class SessionRequest(BaseModel):
    """Body of ``POST /v1/leyline/sessions/{id}`` (optional)."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float | None = Field(default=None, gt=0)
