"""Trajectory diff: which segments of the previous version an edit touched.

The diff aligns the two versions' segment hashes (difflib's longest-matching-block alignment,
without its junk heuristic) and turns every changed region into a :class:`Directive`. Segments
appended after the end of the previous version are not edits: the server serves them as an
ordinary prefix extension.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from difflib import SequenceMatcher

from leyline.directives import Directive, Mode
from leyline.segments import Segment

__all__ = ["diff_segments"]


def diff_segments(
    base: Sequence[Segment],
    new: Sequence[Segment],
    *,
    forget: Collection[int] = (),
    default_mode: Mode = Mode.AMORTIZE,
) -> list[Directive]:
    """Directives that turn ``base`` into ``new``.

    ``forget`` holds message indices of ``new``: an edit that produces a segment of one of them
    is sent with :attr:`Mode.FORGET`, every other edit (pure deletions included) with
    ``default_mode``.

    >>> from leyline.segments import render_segments
    >>> a = render_segments([{"role": "user", "content": c} for c in "abc"])
    >>> b = render_segments([{"role": "user", "content": c} for c in "ac"])
    >>> diff_segments(a, b)
    [Directive(start=1, end=2, replacement=(1, 1), mode=<Mode.AMORTIZE: 'amortize'>)]
    """
    matcher = SequenceMatcher(None, [s.hash for s in base], [s.hash for s in new], autojunk=False)
    forget_set = set(forget)
    out: list[Directive] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal" or (op == "insert" and i1 == len(base)):
            continue
        touched = {new[j].message for j in range(j1, j2)}
        mode = Mode.FORGET if touched & forget_set else default_mode
        out.append(Directive(i1, i2, (j1, j2), mode))
    return out
