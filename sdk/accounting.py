"""Per-request accounting returned by a Leyline server, and running totals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Accounting"]


@dataclass(frozen=True, slots=True)
class Accounting:
    """Where a request's prompt tokens came from.

    ``exact``: exact prefix hits; ``spliced``: reused through a directive (rotated);
    ``chunk_reused``: moved content found by hash; ``recomputed``: prefilled.
    ``cached_tokens`` is what the server reported in ``usage.prompt_tokens_details``.

    >>> a = Accounting.from_response({"usage": {"prompt_tokens": 10},
    ...     "leyline": {"tokens": {"exact": 6, "recomputed": 4}}})
    >>> (a.exact, a.recomputed, a.reused_fraction)
    (6, 4, 0.6)
    """

    exact: int = 0
    spliced: int = 0
    chunk_reused: int = 0
    recomputed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 1
    directives: tuple[Mapping[str, Any], ...] = field(default=())

    @property
    def reused(self) -> int:
        return self.exact + self.spliced + self.chunk_reused

    @property
    def reused_fraction(self) -> float:
        total = self.reused + self.recomputed
        return self.reused / total if total else 0.0

    @classmethod
    def from_response(cls, body: Mapping[str, Any]) -> Accounting | None:
        """Parse a chat-completion body (dict); ``None`` when it has no ``leyline`` object."""
        info = body.get("leyline")
        if not isinstance(info, Mapping):
            return None
        tokens = info.get("tokens") or {}
        usage = body.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return cls(
            exact=int(tokens.get("exact", 0)),
            spliced=int(tokens.get("spliced", 0)),
            chunk_reused=int(tokens.get("chunk_reused", 0)),
            recomputed=int(tokens.get("recomputed", 0)),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            cached_tokens=int(details.get("cached_tokens", 0) or 0),
            directives=tuple(info.get("directives") or ()),
        )

    def __add__(self, other: Accounting) -> Accounting:
        return Accounting(
            exact=self.exact + other.exact,
            spliced=self.spliced + other.spliced,
            chunk_reused=self.chunk_reused + other.chunk_reused,
            recomputed=self.recomputed + other.recomputed,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            requests=self.requests + other.requests,
            directives=(),
        )

    @classmethod
    def zero(cls) -> Accounting:
        return cls(requests=0)
