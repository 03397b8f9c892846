"""The Leyline wire schema: the one definition of what a request payload and a response's
accounting mean, shared by the SDK, the embedded engine (``leyline serve``) and the SGLang
plugin. No torch, no HTTP; docs/protocol.md is its prose.

Request: a chat-completion request carries a :class:`Payload` either as
``custom_params.leyline`` (a JSON string: SGLang forwards only flat values, and this is what the
SDK sends to every server) or, on the embedded engine only, as a top-level ``leyline`` object.
:meth:`Payload.from_request` reads either; :meth:`Payload.from_wire` validates one object and
raises :class:`~leyline.errors.PayloadError` naming the field (a server answers it as a 400).

Response: the ``leyline`` object of a response is a :class:`ResponseInfo`: where the prompt's
tokens came from (:class:`TokenCounts`) and what happened to each directive
(:class:`DirectiveOutcome`). ``usage.prompt_tokens_details`` keeps OpenAI's ``cached_tokens``
(every reused token) and adds ``approximate_tokens`` (:func:`usage_details`).

>>> p = Payload("s1", 2, base_version=1, segments=(("0123456789abcdef", 5),),
...             directives=(Directive(0, 1, (0, 1), Mode.FORGET),))
>>> Payload.from_request(p.to_custom_params_body()) == p
True
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from leyline.directives import (
    Directive,
    Mode,
    directives_from_wire,
    validate_directives,
    validate_window,
)
from leyline.errors import DirectiveError, PayloadError

__all__ = [
    "PAYLOAD_KEY",
    "PROTOCOL_VERSION",
    "SESSION_ID",
    "DirectiveOutcome",
    "Payload",
    "ResponseInfo",
    "Status",
    "TokenCounts",
    "carries_payload",
    "ignored_all",
    "session_key",
    "usage_details",
    "with_accounting",
]

PROTOCOL_VERSION = 1
PAYLOAD_KEY = "leyline"  # the key in custom_params, the top-level field, the response object
SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HASH = re.compile(r"^[0-9a-f]{16}$")
_FIELDS = frozenset(
    {"protocol", "session", "version", "base_version", "segments", "directives",
     "content_reuse", "approximate", "mode", "window"}
)  # fmt: skip
_SEGMENT_FIELDS = ("version", "base_version", "segments", "directives")


class Status(StrEnum):
    """What happened to one client directive."""

    APPLIED = "applied"  # its tokens were served as it asked
    PARTIAL = "partial"  # only some of the kept tokens after it were spliced (reason says why)
    IGNORED = "ignored"  # not used: the request was served by ordinary matching (reason)
    NOT_NEEDED = "not_needed"  # the edit and what follows it were already an exact-prefix hit


@dataclass(frozen=True, slots=True)
class Payload:
    """One request's Leyline payload (docs/protocol.md, "Request").

    Two forms. The *segment* payload (``version`` set) carries the client's segments and
    directives. The *server-diff* payload (``mode`` set, no version, segments or directives)
    only names the session and the mode of every edit: the server diffs the session's last
    token sequence against the request's tokens itself and assigns the versions; with
    ``mode=REPAIR``, ``window`` is every edit's recompute window (``None``: the server's).
    """

    session: str
    version: int | None = None
    base_version: int | None = None
    segments: tuple[tuple[str, int], ...] = ()
    directives: tuple[Directive, ...] = ()
    content_reuse: bool = True
    approximate: bool = True
    mode: Mode | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if (self.mode is None) == (self.version is None):
            raise PayloadError("a payload has either a version (segment payload) or a mode "
                               "(server-diff payload)", param=PAYLOAD_KEY)  # fmt: skip
        try:
            validate_window(self.window, self.mode)
        except ValueError as exc:
            raise PayloadError(str(exc), param=f"{PAYLOAD_KEY}.window") from exc

    @property
    def server_diff(self) -> bool:
        return self.mode is not None

    @property
    def modes(self) -> tuple[Mode, ...]:
        return tuple(d.mode for d in self.directives)

    @property
    def forgets(self) -> bool:
        """Whether any edit is FORGET: nothing at or after an edit may be reused."""
        return Mode.FORGET in self.modes or self.mode is Mode.FORGET

    def to_wire(self) -> dict[str, Any]:
        flags = {"content_reuse": self.content_reuse, "approximate": self.approximate}
        if self.mode is not None:
            window = {} if self.window is None else {"window": self.window}
            return {"protocol": PROTOCOL_VERSION, "session": self.session,
                    "mode": self.mode.value, **window, **flags}  # fmt: skip
        return {
            "protocol": PROTOCOL_VERSION,
            "session": self.session,
            "version": self.version,
            "base_version": self.base_version,
            "segments": [[h, n] for h, n in self.segments],
            "directives": [d.to_wire() for d in self.directives],
            **flags,
        }

    def to_custom_params(self) -> dict[str, str]:
        """``{"leyline": "<json>"}``: the flat ``custom_params`` entry SGLang forwards."""
        return {PAYLOAD_KEY: json.dumps(self.to_wire(), separators=(",", ":"))}

    def to_custom_params_body(self) -> dict[str, Any]:
        """``{"custom_params": {...}}``, ready for ``openai``'s ``extra_body=``."""
        return {"custom_params": self.to_custom_params()}

    def attach(self, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """A copy of a request body (or ``extra_body``) carrying this payload in
        ``custom_params``; the body's other ``custom_params`` entries are kept."""
        out = dict(body or {})
        out["custom_params"] = {**(out.get("custom_params") or {}), **self.to_custom_params()}
        return out

    @classmethod
    def from_wire(
        cls, obj: Any, *, where: str = PAYLOAD_KEY, session: str | None = None
    ) -> Payload:
        """Validate one payload object; raises :class:`PayloadError` naming the field.
        ``session`` is the fallback session key (OpenAI's ``prompt_cache_key``)."""
        if not isinstance(obj, Mapping):
            raise PayloadError(f"{where} must be a JSON object", param=where)
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise PayloadError(f"{where} has unknown fields {unknown}", param=where)
        proto = obj.get("protocol", PROTOCOL_VERSION)
        if proto != PROTOCOL_VERSION or isinstance(proto, bool):
            raise PayloadError(
                f"{where}.protocol {proto!r} is not supported (this server speaks "
                f"{PROTOCOL_VERSION})",
                param=f"{where}.protocol", code="unsupported_protocol",
            )  # fmt: skip
        sid = obj.get("session", session)
        if not isinstance(sid, str) or not SESSION_ID.match(sid):
            raise PayloadError(
                f"{where}.session must be 1-128 characters of [A-Za-z0-9._:-], got {sid!r}",
                param=f"{where}.session",
            )
        flags: dict[str, Any] = {}
        for name in ("content_reuse", "approximate"):
            value = obj.get(name, True)
            if not isinstance(value, bool):
                raise PayloadError(f"{where}.{name} must be true or false", param=f"{where}.{name}")
            flags[name] = value
        if "mode" in obj:
            mode = obj["mode"]
            if mode not in tuple(Mode):
                raise PayloadError(
                    f"{where}.mode must be 'amortize', 'forget' or 'repair', got {mode!r}",
                    param=f"{where}.mode",
                )
            extra = [f for f in _SEGMENT_FIELDS if f in obj]
            if extra:
                raise PayloadError(
                    f"{where} is a server-diff payload (it has a mode): drop {extra}",
                    param=f"{where}.{extra[0]}",
                )
            try:
                window = validate_window(obj.get("window"), Mode(mode), name=f"{where}.window")
            except ValueError as exc:
                raise PayloadError(str(exc), param=f"{where}.window") from exc
            return cls(sid, mode=Mode(mode), window=window, **flags)
        if "window" in obj:
            raise PayloadError(
                f"{where}.window belongs to a directive (or a server-diff payload's mode)",
                param=f"{where}.window",
            )
        if "version" not in obj:
            raise PayloadError(
                f"{where} needs a version (segment payload) or a mode (server-diff payload)",
                param=where,
            )
        version = _int(obj, "version", where, required=True, low=1)
        assert version is not None
        base_version = _int(obj, "base_version", where, required=False, low=1)
        if base_version is not None and base_version >= version:
            raise PayloadError(
                f"{where}.base_version {base_version} must be older than version {version}",
                param=f"{where}.base_version",
            )
        segments = _segments(obj.get("segments", []), where)
        raw = obj.get("directives", [])
        try:
            directives = tuple(directives_from_wire(raw))
            if directives:
                # The base's segment count is the server's to check; the new version's is here.
                directives = validate_directives(directives, base_len=2**62, new_len=len(segments))
        except DirectiveError as exc:
            param = f"{where}.directives" + ("" if exc.index is None else f"[{exc.index}]")
            raise PayloadError(str(exc), param=param, code="invalid_directive") from exc
        if directives and base_version is None:
            raise PayloadError(
                f"{where}.directives need a base_version (the version they edit)",
                param=f"{where}.base_version", code="invalid_directive",
            )  # fmt: skip
        return cls(sid, version, base_version, segments, directives, **flags)

    @classmethod
    def from_custom_params(
        cls, custom_params: Any, *, session: str | None = None
    ) -> Payload | None:
        """The payload in a request's ``custom_params`` (None when it carries none)."""
        if custom_params is None:
            return None
        if not isinstance(custom_params, Mapping):
            raise PayloadError("custom_params must be an object", param="custom_params")
        if PAYLOAD_KEY not in custom_params:
            return None
        where = f"custom_params.{PAYLOAD_KEY}"
        raw = custom_params[PAYLOAD_KEY]
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise PayloadError(f"{where} is not valid JSON: {exc}", param=where) from exc
        return cls.from_wire(raw, where=where, session=session)

    @classmethod
    def from_request(cls, body: Mapping[str, Any]) -> Payload | None:
        """The payload of a chat/completions request body, from either carrier. OpenAI's
        ``prompt_cache_key`` names the session when the payload does not; a request with a
        ``prompt_cache_key`` and no payload gets the exact server-diff payload (FORGET: the
        session's cache is kept for it, nothing approximate is served)."""
        key = body.get("prompt_cache_key")
        session = session_key(key) if isinstance(key, str) and key else None
        top = body.get(PAYLOAD_KEY)
        custom = cls.from_custom_params(body.get("custom_params"), session=session)
        if top is None and custom is None and session is not None:
            return cls(session, mode=Mode.FORGET)
        if top is not None and custom is not None:
            raise PayloadError(
                "send the payload once: as custom_params.leyline or as leyline, not both",
                param=PAYLOAD_KEY,
            )
        return custom if top is None else cls.from_wire(top, session=session)


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Where a request's prompt tokens came from; they sum to the prompt length.

    ``exact``: an exact-prefix hit whose KV equals a fresh prefill of this prompt;
    ``inherited``: matched as a cached prefix, but the KV descends from an earlier splice or
    chunk reuse (approximate); ``spliced``: reused through a directive with a RoPE correction;
    ``chunk_reused``: moved content found by hash; ``recomputed``: prefilled for this request.
    ``repaired`` is part of ``recomputed``, not a sixth source: REPAIR windows, tokens the
    request could have reused (spliced or chunk-reused) that were prefilled again instead.
    """

    exact: int = 0
    inherited: int = 0
    spliced: int = 0
    chunk_reused: int = 0
    recomputed: int = 0
    repaired: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.repaired <= self.recomputed:
            raise ValueError(f"repaired ({self.repaired}) is part of recomputed "
                             f"({self.recomputed})")  # fmt: skip

    @property
    def approximate(self) -> int:
        """Reused tokens whose KV is not a fresh prefill's (0: the answer came from exact KV)."""
        return self.inherited + self.spliced + self.chunk_reused

    @property
    def cached(self) -> int:
        """Every reused token (OpenAI's ``cached_tokens``)."""
        return self.exact + self.approximate

    @property
    def total(self) -> int:
        return self.cached + self.recomputed

    def to_wire(self) -> dict[str, int]:
        """The wire object; ``repaired`` is present only when a REPAIR window was served."""
        out = {
            "exact": self.exact, "inherited": self.inherited, "spliced": self.spliced,
            "chunk_reused": self.chunk_reused, "recomputed": self.recomputed,
            "approximate": self.approximate,
        }  # fmt: skip
        if self.repaired:
            out["repaired"] = self.repaired
        return out

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any] | None) -> TokenCounts:
        obj = obj or {}
        return cls(**{f: int(obj.get(f, 0) or 0) for f in _COUNT_FIELDS})


_COUNT_FIELDS = ("exact", "inherited", "spliced", "chunk_reused", "recomputed", "repaired")


def usage_details(tokens: TokenCounts) -> dict[str, int]:
    """``usage.prompt_tokens_details``: OpenAI's ``cached_tokens`` plus ``approximate_tokens``."""
    return {"cached_tokens": tokens.cached, "approximate_tokens": tokens.approximate}


def with_accounting(usage: Mapping[str, Any], leyline: Mapping[str, Any]) -> dict[str, Any]:
    """A response's ``usage`` with Leyline's entries, given its ``leyline`` object (wire form).

    ``prompt_tokens_details`` gains :func:`usage_details` (entries the server already set win)
    and ``usage.leyline`` repeats the ``leyline`` object, for clients that keep a response's
    usage but drop its other fields (LangChain's ``response_metadata["token_usage"]``).

    >>> with_accounting({"prompt_tokens": 3}, {"tokens": {"exact": 3}})["prompt_tokens_details"]
    {'cached_tokens': 3, 'approximate_tokens': 0}
    """
    own = usage.get("prompt_tokens_details") or {}
    details = {**usage_details(TokenCounts.from_wire(leyline.get("tokens"))), **own}
    return {**usage, "prompt_tokens_details": details, PAYLOAD_KEY: dict(leyline)}


@dataclass(frozen=True, slots=True)
class DirectiveOutcome:
    """What happened to client directive ``index`` (``spliced_tokens``: kept tokens after it
    served spliced; ``window_tokens``: kept tokens after it recomputed by its REPAIR window;
    None when several edits share one outcome)."""

    index: int
    status: Status
    reason: str | None = None
    spliced_tokens: int | None = 0
    window_tokens: int | None = 0

    def to_wire(self) -> dict[str, Any]:
        """The wire object; ``window_tokens`` is present only when it is not 0."""
        out = {
            "index": self.index, "status": self.status.value, "reason": self.reason,
            "spliced_tokens": self.spliced_tokens,
        }  # fmt: skip
        if self.window_tokens != 0:
            out["window_tokens"] = self.window_tokens
        return out

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> DirectiveOutcome:
        spliced, window = obj.get("spliced_tokens", 0), obj.get("window_tokens", 0)
        return cls(
            int(obj.get("index", 0)), Status(obj.get("status", Status.IGNORED)),
            obj.get("reason"), None if spliced is None else int(spliced),
            None if window is None else int(window),
        )  # fmt: skip


@dataclass(frozen=True)
class ResponseInfo:
    """A response's ``leyline`` object. ``extra`` holds what one server adds (``ttft_ms``,
    ``timings_ms``; SGLang: ``windows``, ``timeline_ms``, ``splice_checks``)."""

    session: str | None
    version: int | None
    tokens: TokenCounts
    directives: tuple[DirectiveOutcome, ...] = ()
    notes: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exact_kv(self) -> bool:
        """Whether every reused token's KV was exact (the answer equals a fresh prefill's)."""
        return self.tokens.approximate == 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "session": self.session,
            "version": self.version,
            "tokens": self.tokens.to_wire(),
            "exact_kv": self.exact_kv,
            "directives": [d.to_wire() for d in self.directives],
            "notes": list(self.notes),
            **self.extra,
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ResponseInfo:
        known = {"protocol", "session", "version", "tokens", "exact_kv", "directives", "notes"}
        return cls(
            session=obj.get("session"),
            version=obj.get("version"),
            tokens=TokenCounts.from_wire(obj.get("tokens")),
            directives=tuple(DirectiveOutcome.from_wire(d) for d in obj.get("directives") or ()),
            notes=tuple(obj.get("notes") or ()),
            extra={k: v for k, v in obj.items() if k not in known},
        )


def ignored_all(count: int, reason: str) -> tuple[DirectiveOutcome, ...]:
    """Every one of ``count`` directives ignored for one ``reason``."""
    return tuple(DirectiveOutcome(i, Status.IGNORED, reason, 0) for i in range(count))


def carries_payload(body: Any) -> bool:
    """Whether a request body (or ``extra_body``) already carries a Leyline payload, in either
    carrier (a caller's own payload wins over an adapter's)."""
    if not isinstance(body, Mapping):
        return False
    custom = body.get("custom_params")
    return PAYLOAD_KEY in body or (isinstance(custom, Mapping) and PAYLOAD_KEY in custom)


def session_key(key: str) -> str:
    """A session id for an OpenAI ``prompt_cache_key`` (kept when it already is a valid id)."""
    if SESSION_ID.match(key):
        return key
    return "pck-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _int(obj: Mapping[str, Any], name: str, where: str, *, required: bool, low: int) -> int | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**62:
        need = "an integer" if required else "an integer or null"
        raise PayloadError(
            f"{where}.{name} must be {need} >= {low}, got {value!r}", param=f"{where}.{name}"
        )
    return value


def _segments(raw: Any, where: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, list | tuple):
        raise PayloadError(f"{where}.segments must be a list", param=f"{where}.segments")
    out = []
    for i, seg in enumerate(raw):
        ok = isinstance(seg, Sequence) and not isinstance(seg, str) and len(seg) == 2
        if ok:
            h, n = seg
            ok = isinstance(h, str) and bool(_HASH.match(h))
            ok = ok and isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**62
        if not ok:
            raise PayloadError(
                f"{where}.segments[{i}] must be [16 hex digits, characters >= 0]",
                param=f"{where}.segments[{i}]",
            )
        out.append((seg[0], seg[1]))
    return tuple(out)
