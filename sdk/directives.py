"""Directives: the 4-tuple ``(start, end, replacement, mode)`` over segments.

On the wire a directive edits the session's *previous* version: ``[start, end)`` is a half-open
span of that version's segments, ``replacement = (k, l)`` the span of the *new* version's
segments that take its place (``k == l`` for a deletion), ``mode`` how the server treats the
tokens after the edit:

- ``amortize`` keeps the suffix's cached KV and only moves its rotary part (fast, approximate:
  the suffix still "saw" the old span);
- ``forget`` re-prefills everything after the edit point (exact, for redaction).

The server maps segment spans to token spans with its own tokenizer and applies a directive only
if the result equals the request's tokens, so a wrong directive costs speed, never content.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from leyline.errors import DirectiveError

__all__ = ["Directive", "Mode", "directives_from_wire", "parse_mode", "validate_directives"]


class Mode(StrEnum):
    """How the server treats the tokens after an edit."""

    AMORTIZE = "amortize"
    FORGET = "forget"


def parse_mode(value: object, *, name: str = "mode") -> Mode:
    """``value`` as a :class:`Mode` (a ``Mode`` or its string); ``ValueError`` naming ``name``.

    >>> parse_mode("forget")
    <Mode.FORGET: 'forget'>
    """
    if isinstance(value, Mode):
        return value
    try:
        return Mode(str(value))
    except ValueError:
        raise ValueError(
            f"{name} must be leyline.Mode.AMORTIZE or Mode.FORGET ('amortize' or 'forget'), "
            f"got {value!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class Directive:
    """Replace base segments ``[start, end)`` by new segments ``replacement = (k, l)``.

    >>> Directive(2, 3, (2, 2), Mode.AMORTIZE)  # delete base segment 2
    Directive(start=2, end=3, replacement=(2, 2), mode=<Mode.AMORTIZE: 'amortize'>)
    """

    start: int
    end: int
    replacement: tuple[int, int]
    mode: Mode = Mode.AMORTIZE

    @property
    def is_noop(self) -> bool:
        return self.start == self.end and self.replacement[0] == self.replacement[1]

    def to_wire(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "replacement": list(self.replacement),
            "mode": self.mode.value,
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any], *, index: int | None = None) -> Directive:
        """Parse one wire directive; raises :class:`DirectiveError` naming the bad field."""
        if not isinstance(obj, Mapping):
            raise DirectiveError("must be an object", index=index)
        unknown = set(obj) - {"start", "end", "replacement", "mode"}
        if unknown:
            raise DirectiveError(f"unknown fields {sorted(unknown)}", index=index)
        try:
            start, end = obj["start"], obj["end"]
            repl = obj.get("replacement", [])
            mode_name = obj.get("mode", Mode.AMORTIZE.value)
        except KeyError as exc:
            raise DirectiveError(f"missing field {exc.args[0]!r}", index=index) from exc
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise DirectiveError("start and end must be integers", index=index)
        if (
            not isinstance(repl, list | tuple)
            or len(repl) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in repl)
        ):
            raise DirectiveError("replacement must be a [k, l] pair of integers", index=index)
        try:
            mode = Mode(mode_name)
        except ValueError as exc:
            raise DirectiveError(
                f"unknown mode {mode_name!r} (expected 'amortize' or 'forget')", index=index
            ) from exc
        return cls(start, end, (repl[0], repl[1]), mode)


def validate_directives(
    directives: Iterable[Directive], *, base_len: int, new_len: int
) -> tuple[Directive, ...]:
    """Check a directive list against the base and new segment counts.

    Returns the directives sorted by ``start``. Raises :class:`DirectiveError` for reversed or
    empty spans, spans beyond either version, and overlapping directives (in the base or the
    new version).
    """
    items = list(directives)
    for i, d in enumerate(items):
        if not isinstance(d.mode, Mode):
            raise DirectiveError(f"unknown mode {d.mode!r}", index=i)
        k, length = d.replacement
        if d.start < 0 or d.end < d.start:
            raise DirectiveError(f"span [{d.start}, {d.end}) is reversed or negative", index=i)
        if k < 0 or length < k:
            raise DirectiveError(f"replacement [{k}, {length}) is reversed or negative", index=i)
        if d.is_noop:
            raise DirectiveError("empty span with no replacement does nothing", index=i)
        if d.end > base_len:
            raise DirectiveError(
                f"span [{d.start}, {d.end}) is beyond the previous version ({base_len} segments)",
                index=i,
            )
        if length > new_len:
            raise DirectiveError(
                f"replacement [{k}, {length}) is beyond the new version ({new_len} segments)",
                index=i,
            )
    order = sorted(range(len(items)), key=lambda i: (items[i].start, items[i].replacement[0]))
    for a, b in itertools.pairwise(order):
        da, db = items[a], items[b]
        if db.start < da.end or (db.start == da.start and da.start == da.end == db.end):
            raise DirectiveError(f"overlaps directive {a}", index=b)
        if db.replacement[0] < da.replacement[1]:
            raise DirectiveError(f"replacement overlaps that of directive {a}", index=b)
    return tuple(items[i] for i in order)


def directives_from_wire(objs: Sequence[Any]) -> list[Directive]:
    """Parse a wire list of directives (no range checks: see :func:`validate_directives`)."""
    if not isinstance(objs, list | tuple):
        raise DirectiveError("directives must be a list")
    return [Directive.from_wire(o, index=i) for i, o in enumerate(objs)]
