"""Per-request accounting returned by a Leyline server, and running totals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from leyline.protocol import PAYLOAD_KEY, DirectiveOutcome, ResponseInfo

__all__ = ["Accounting"]


@dataclass(frozen=True, slots=True)
class Accounting:
    """Where a request's prompt tokens came from (docs/protocol.md, "Response").

    ``exact``: exact-prefix hits whose KV equals a fresh prefill; ``inherited``: matched as a
    prefix, but descending from an earlier splice or chunk reuse (approximate); ``spliced``:
    reused through a directive (rotated); ``chunk_reused``: moved content found by hash;
    ``recomputed``: prefilled. ``cached_tokens`` is what the server reported in
    ``usage.prompt_tokens_details``. ``exact_kv`` says whether the answer came from exact KV.

    >>> a = Accounting.from_response({"usage": {"prompt_tokens": 10},
    ...     "leyline": {"tokens": {"exact": 6, "recomputed": 4}}})
    >>> (a.exact, a.recomputed, a.reused_fraction, a.exact_kv)
    (6, 4, 0.6, True)
    """

    exact: int = 0
    spliced: int = 0
    chunk_reused: int = 0
    recomputed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 1
    directives: tuple[DirectiveOutcome, ...] = field(default=())
    inherited: int = 0

    @property
    def approximate(self) -> int:
        """Reused tokens whose KV is not a fresh prefill's."""
        return self.inherited + self.spliced + self.chunk_reused

    @property
    def exact_kv(self) -> bool:
        return self.approximate == 0

    @property
    def reused(self) -> int:
        return self.exact + self.approximate

    @property
    def reused_fraction(self) -> float:
        total = self.reused + self.recomputed
        return self.reused / total if total else 0.0

    @classmethod
    def from_info(
        cls, info: ResponseInfo, *, prompt_tokens: int = 0, cached_tokens: int = 0
    ) -> Accounting:
        t = info.tokens
        return cls(
            exact=t.exact, spliced=t.spliced, chunk_reused=t.chunk_reused,
            recomputed=t.recomputed, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
            directives=info.directives, inherited=t.inherited,
        )  # fmt: skip

    @classmethod
    def from_response(cls, body: Mapping[str, Any]) -> Accounting | None:
        """Parse a chat-completion body (dict); ``None`` when it has no ``leyline`` object."""
        info = body.get(PAYLOAD_KEY)
        if not isinstance(info, Mapping):
            return None
        usage = body.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return cls.from_info(
            ResponseInfo.from_wire(info),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            cached_tokens=int(details.get("cached_tokens", 0) or 0),
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
            inherited=self.inherited + other.inherited,
        )

    @classmethod
    def zero(cls) -> Accounting:
        return cls(requests=0)
