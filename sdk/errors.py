"""The SDK's one exception hierarchy.

Every error the SDK raises is a :class:`LeylineError`; the subclasses say what a caller can do
about it. Errors that are also value errors (bad directives, bad configuration) subclass
``ValueError`` as well, so generic handlers keep working::

    try:
        session.prepare(messages)
    except leyline.errors.DirectiveError as exc:
        print(exc.index, exc)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DirectiveError",
    "LeylineError",
    "MissingExtraError",
    "PayloadError",
    "ServerError",
    "StaleVersionError",
    "TransportError",
]


class LeylineError(Exception):
    """Base class of every error raised by the Leyline SDK."""


class DirectiveError(LeylineError, ValueError):
    """A directive (or a list of them) is malformed: the message says which one and why."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"directive {index}: {message}")
        self.index = index


class PayloadError(LeylineError, ValueError):
    """A request's Leyline payload is malformed. ``param`` names the field (as in OpenAI's error
    shape, e.g. ``leyline.directives[1]``); ``code`` is the error code a server answers with
    (``invalid_payload``, ``invalid_directive``, ``unsupported_protocol``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_payload"):
        super().__init__(message)
        self.param = param
        self.code = code


class StaleVersionError(DirectiveError):
    """Directives were built against a session version that is no longer the latest one."""


class ServerError(LeylineError):
    """The server answered with an error (OpenAI's error shape).

    ``status`` is the HTTP status; ``code`` and ``type`` come from the error body when present.
    """

    def __init__(
        self, status: int, message: str, *, code: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}" + (f" ({code})" if code else ""))
        self.status = status
        self.code = code
        self.type = type
        self.message = message

    @classmethod
    def from_body(cls, status: int, body: Any) -> ServerError:
        """Build from an OpenAI-shaped ``{"error": {...}}`` body (or anything else)."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return cls(
                status,
                str(err.get("message", "")),
                code=err.get("code"),
                type=err.get("type"),
            )
        return cls(status, str(body)[:500])


class MissingExtraError(LeylineError, ImportError):
    """An optional part of Leyline was used without its extra installed."""

    def __init__(self, feature: str, extra: str, cause: BaseException | None = None) -> None:
        detail = f" ({cause})" if cause else ""
        super().__init__(
            f"{feature} needs the '{extra}' extra: pip install 'leyline[{extra}]'{detail}"
        )
        self.extra = extra


class TransportError(LeylineError):
    """The server could not be reached or the connection broke mid-request."""
