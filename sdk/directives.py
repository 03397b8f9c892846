"""Directives: the 4-tuple ``(start, end, replacement, mode)`` over segments.

On the wire a directive edits the session's *previous* version: ``[start, end)`` is a half-open
span of that version's segments, ``replacement = (k, l)`` the span of the *new* version's
segments that take its place (``k == l`` for a deletion), ``mode`` how the server treats the
tokens after the edit:

- ``amortize`` keeps the suffix's cached KV and only moves its rotary part (fast, approximate:
  the suffix still "saw" the old span);
- ``forget`` re-prefills everything after the edit point (exact, for redaction);
- ``repair`` is ``amortize`` plus a recompute window: the first ``window`` tokens of the suffix
  (``k``; omitted = the server's default) are prefilled again in the context of the prefix and
  the replacement (exact), the rest is spliced as with ``amortize``. The window holds most of
  the suffix's deviation from an exact re-prefill (docs/repair.md measures how much).

The server maps segment spans to token spans with its own tokenizer and applies a directive only
if the result equals the request's tokens, so a wrong directive costs speed, never content.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from leyline.errors import DirectiveError

__all__ = [
    "MAX_WINDOW",
    "Directive",
    "Mode",
    "directives_from_wire",
    "parse_mode",
    "validate_directives",
    "validate_window",
]

#: The largest ``window`` a directive may carry (a window past the suffix covers all of it).
MAX_WINDOW = 2**31 - 1


class Mode(StrEnum):
    """How the server treats the tokens after an edit."""

    AMORTIZE = "amortize"
    FORGET = "forget"
    REPAIR = "repair"


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
            f"{name} must be leyline.Mode.AMORTIZE, Mode.FORGET or Mode.REPAIR ('amortize', "
            f"'forget' or 'repair'), got {value!r}"
        ) from None


def validate_window(window: object, mode: object, *, name: str = "window") -> int | None:
    """``window`` (a REPAIR directive's recompute window ``k``, in tokens; ``None``: the
    server's default) checked against ``mode``; ``ValueError`` naming ``name`` otherwise.

    >>> validate_window(64, Mode.REPAIR)
    64
    >>> validate_window(64, Mode.AMORTIZE)
    Traceback (most recent call last):
    ...
    ValueError: window is only for mode 'repair', not 'amortize'
    """
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"{name} must be an integer 0..{MAX_WINDOW} (tokens), got {window!r}")
    if mode is not Mode.REPAIR:
        shown = mode.value if isinstance(mode, Mode) else mode
        raise ValueError(f"{name} is only for mode 'repair', not {shown!r}")
    return window


@dataclass(frozen=True, slots=True)
class Directive:
    """Replace base segments ``[start, end)`` by new segments ``replacement = (k, l)``.

    ``window`` (REPAIR only): recompute the first ``window`` tokens after the edit; ``None``
    takes the server's default.

    >>> Directive(2, 3, (2, 2), Mode.AMORTIZE)  # delete base segment 2
    Directive(start=2, end=3, replacement=(2, 2), mode=<Mode.AMORTIZE: 'amortize'>)
    >>> Directive(2, 3, (2, 2), Mode.REPAIR, window=64).to_wire()["window"]
    64
    """

    start: int
    end: int
    replacement: tuple[int, int]
    mode: Mode = Mode.AMORTIZE
    window: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        validate_window(self.window, self.mode)

    def __repr__(self) -> str:
        window = "" if self.window is None else f", window={self.window}"
        return (
            f"Directive(start={self.start}, end={self.end}, replacement={self.replacement}, "
            f"mode={self.mode!r}{window})"
        )

    @property
    def is_noop(self) -> bool:
        return self.start == self.end and self.replacement[0] == self.replacement[1]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "start": self.start,
            "end": self.end,
            "replacement": list(self.replacement),
            "mode": self.mode.value,
        }
        if self.window is not None:
            out["window"] = self.window
        return out

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any], *, index: int | None = None) -> Directive:
        """Parse one wire directive; raises :class:`DirectiveError` naming the bad field."""
        if not isinstance(obj, Mapping):
            raise DirectiveError("must be an object", index=index)
        unknown = set(obj) - {"start", "end", "replacement", "mode", "window"}
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
                f"unknown mode {mode_name!r} (expected 'amortize', 'forget' or 'repair')",
                index=index,
            ) from exc
        try:
            window = validate_window(obj.get("window"), mode)
        except ValueError as exc:
            raise DirectiveError(str(exc), index=index) from exc
        return cls(start, end, (repl[0], repl[1]), mode, window)


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
