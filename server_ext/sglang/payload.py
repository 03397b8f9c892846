"""The Leyline payload inside SGLang: flat ``custom_params`` in, parsed request options out.

SGLang's scheduler decodes ``sampling_params.custom_params`` with msgpack and accepts only flat
values, so the client's ``leyline`` object travels as one JSON string:
``extra_body={"custom_params": {"leyline": json.dumps(payload)}}`` (see `to_custom_params`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CUSTOM_PARAMS_KEY",
    "PayloadError",
    "RequestOptions",
    "parse_custom_params",
    "to_custom_params",
]

CUSTOM_PARAMS_KEY = "leyline"
_MODES = ("amortize", "forget")


class PayloadError(ValueError):
    """The ``leyline`` custom param is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What one request asked of the Leyline cache.

    ``modes`` holds one entry per client directive, in order (segment indices are not needed
    server-side: see docs/sglang.md, "How directives are mapped").
    """

    session: str | None = None
    version: int | None = None
    base_version: int | None = None
    modes: tuple[str, ...] = ()
    deletions: tuple[bool, ...] = ()
    content_reuse: bool = True
    approximate: bool = True

    def __post_init__(self) -> None:
        if any(m not in _MODES for m in self.modes):
            raise PayloadError(f"directive modes must be among {_MODES}, got {self.modes}")
        if len(self.deletions) != len(self.modes):
            raise PayloadError("deletions and modes must have one entry per directive")

    @property
    def opted_in(self) -> bool:
        """Whether the request accepts approximate (spliced or chunk-reused) KV."""
        return self.approximate


def to_custom_params(payload: Mapping[str, Any]) -> dict[str, str]:
    """The flat ``custom_params`` dict carrying a client payload (``Prepared.payload()``)."""
    return {CUSTOM_PARAMS_KEY: json.dumps(dict(payload), separators=(",", ":"))}


def parse_custom_params(custom_params: Mapping[str, Any] | None) -> RequestOptions | None:
    """Parse a request's ``custom_params``; None when it carries no Leyline payload."""
    if not custom_params or CUSTOM_PARAMS_KEY not in custom_params:
        return None
    raw = custom_params[CUSTOM_PARAMS_KEY]
    if isinstance(raw, str):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PayloadError(f"custom_params.leyline is not valid JSON: {exc}") from exc
    else:
        obj = raw
    if not isinstance(obj, Mapping):
        raise PayloadError("custom_params.leyline must be a JSON object")
    directives = obj.get("directives") or []
    if not isinstance(directives, list):
        raise PayloadError("leyline.directives must be a list")
    modes: list[str] = []
    deletions: list[bool] = []
    for i, d in enumerate(directives):
        if not isinstance(d, Mapping):
            raise PayloadError(f"leyline.directives[{i}] must be an object")
        modes.append(str(d.get("mode", "amortize")))
        repl = d.get("replacement", [0, 0])
        if not (isinstance(repl, list | tuple) and len(repl) == 2):
            raise PayloadError(f"leyline.directives[{i}].replacement must be [k, l]")
        deletions.append(int(repl[0]) == int(repl[1]))
    session = obj.get("session")
    return RequestOptions(
        session=None if session is None else str(session),
        version=_opt_int(obj, "version"),
        base_version=_opt_int(obj, "base_version"),
        modes=tuple(modes),
        deletions=tuple(deletions),
        content_reuse=bool(obj.get("content_reuse", True)),
        approximate=bool(obj.get("approximate", True)),
    )


def _opt_int(obj: Mapping[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"leyline.{name} must be an integer or null, got {value!r}")
    return value
