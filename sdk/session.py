"""Sessions: client-side state that turns successive prompts into directives.

A :class:`Session` remembers the segments of the last version the server accepted. Each request
is :meth:`Session.prepare`-d (render segments, diff, build the wire payload) and, once the server
answered, :meth:`Session.commit`-ted. Nothing is committed for a failed request, so a retry
diffs against the same base.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leyline.diff import diff_segments
from leyline.directives import Directive, Mode, validate_directives, validate_window
from leyline.errors import StaleVersionError
from leyline.protocol import Payload
from leyline.segments import DEFAULT_PARAMS, Segment, SegmentParams, render_segments

__all__ = ["Prepared", "Session"]

_CACHE_LIMIT = 4096  # memoised message splits per session


@dataclass(frozen=True)
class Prepared:
    """One request's Leyline payload: the new version's segments and its directives."""

    session_id: str
    version: int
    base_version: int | None
    segments: tuple[Segment, ...]
    directives: tuple[Directive, ...]
    content_reuse: bool = True
    approximate: bool = True

    def to_payload(self) -> Payload:
        """This request's :class:`leyline.protocol.Payload`."""
        return Payload(
            session=self.session_id,
            version=self.version,
            base_version=self.base_version,
            segments=tuple((s.hash, s.chars) for s in self.segments),
            directives=self.directives,
            content_reuse=self.content_reuse,
            approximate=self.approximate,
        )

    def payload(self) -> dict[str, Any]:
        """The payload as a JSON object (see docs/protocol.md)."""
        return self.to_payload().to_wire()

    def extra_body(self) -> dict[str, Any]:
        """``{"custom_params": {"leyline": "<json>"}}`` for ``openai``'s ``extra_body=``: the
        carrier both servers read (SGLang forwards only flat ``custom_params`` values)."""
        return self.to_payload().to_custom_params_body()


class Session:
    """A client-generated session id plus the last version the server accepted.

    >>> s = Session("demo")
    >>> p = s.prepare([{"role": "user", "content": "hello"}])
    >>> (p.version, p.base_version, p.directives)
    (1, None, ())
    >>> s.commit(p); s.version
    1
    """

    def __init__(
        self,
        id: str | None = None,
        *,
        params: SegmentParams = DEFAULT_PARAMS,
        content_reuse: bool = True,
        approximate: bool = True,
    ) -> None:
        self.id = id or uuid.uuid4().hex
        self.version = 0
        self.params = params
        self.content_reuse = content_reuse
        self.approximate = approximate
        self._base: tuple[Segment, ...] | None = None
        self._split_cache: dict[tuple[str, str], list[str]] = {}

    def prepare(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        forget: Collection[int] = (),
        tools: Sequence[Mapping[str, Any]] | None = None,
        default_mode: Mode = Mode.AMORTIZE,
        window: int | None = None,
    ) -> Prepared:
        """Render ``messages`` and diff them against the last committed version.

        ``forget`` lists indices of ``messages`` whose edits must be re-prefilled (FORGET);
        every other edit, deletions included, gets ``default_mode``;
        ``tools`` are the request's tool definitions (they render in front of message 0);
        ``window`` is the recompute window of REPAIR edits (``None``: the server's default).

        >>> s = Session("w")
        >>> s.commit(s.prepare([{"role": "user", "content": c} for c in "abc"]))
        >>> p = s.prepare([{"role": "user", "content": c} for c in "ac"],
        ...               default_mode=Mode.REPAIR, window=32)
        >>> [(d.mode.value, d.window) for d in p.directives]
        [('repair', 32)]
        """
        validate_window(window, Mode.REPAIR)
        if len(self._split_cache) > _CACHE_LIMIT:
            self._split_cache.clear()
        segments = tuple(
            render_segments(messages, self.params, cache=self._split_cache, tools=tools)
        )
        directives: tuple[Directive, ...] = ()
        if self._base is not None and self.approximate:
            found = diff_segments(self._base, segments, forget=forget, default_mode=default_mode)
            if window is not None:
                found = [
                    dataclasses.replace(d, window=window) if d.mode is Mode.REPAIR else d
                    for d in found
                ]
            directives = validate_directives(found, base_len=len(self._base), new_len=len(segments))
        return Prepared(
            session_id=self.id,
            version=self.version + 1,
            base_version=self.version if self._base is not None else None,
            segments=segments,
            directives=directives,
            content_reuse=self.content_reuse,
            approximate=self.approximate,
        )

    def commit(self, prepared: Prepared) -> None:
        """Record that the server accepted ``prepared``; later diffs start from it."""
        if prepared.session_id != self.id:
            raise ValueError(f"prepared for session {prepared.session_id!r}, not {self.id!r}")
        if prepared.version != self.version + 1:
            raise StaleVersionError(
                f"prepared against version {prepared.version - 1}, session is at {self.version}"
            )
        self.version = prepared.version
        self._base = prepared.segments

    def reset(self) -> None:
        """Drop the client-side base: the next request carries no directives."""
        self._base = None

    @property
    def base_segments(self) -> tuple[Segment, ...] | None:
        return self._base
