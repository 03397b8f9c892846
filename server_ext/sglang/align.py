"""Map a request's client directives to token spans by diffing token sequences.

In SGLang the request arrives already tokenized with SGLang's own chat template, so the plugin
cannot tokenize segment by segment. It aligns the session's previous token sequence (the base)
with the request's tokens instead: every edit region that starts inside the base *prompt* is
one edit; regions closer than ``merge_gap`` tokens merge (a truncation that keeps a head shares
tokens with the original). Edits pair with the client's directives in order when the counts
agree; when they do not and all directives share one mode, every edit gets that mode; otherwise
the directives are ignored. The prompt stays the source of truth: each span is read off the two
token sequences, so applying the edits to the base always yields the request's tokens.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TokenEdit", "align_edits"]


@dataclass(frozen=True, slots=True)
class TokenEdit:
    """Base tokens ``[start, end)`` became request tokens ``[new_start, new_end)``."""

    start: int
    end: int
    new_start: int
    new_end: int
    mode: str


def _regions(base: Sequence[int], new: Sequence[int], merge_gap: int) -> list[list[int]]:
    sm = difflib.SequenceMatcher(None, base, new, autojunk=len(base) > 2000)
    regions: list[list[int]] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        if regions and i1 - regions[-1][1] < merge_gap and j1 - regions[-1][3] < merge_gap:
            regions[-1][1], regions[-1][3] = i2, j2
        else:
            regions.append([i1, i2, j1, j2])
    return regions


def align_edits(
    base: Sequence[int],
    base_prompt_len: int,
    new: Sequence[int],
    modes: Sequence[str],
    *,
    merge_gap: int = 16,
) -> tuple[list[TokenEdit], str | None]:
    """Token edits of ``base`` -> ``new`` with the client's modes, or ``([], reason)``."""
    if not modes:
        return [], None
    regions = [r for r in _regions(base, new, merge_gap) if r[0] < base_prompt_len]
    if not regions:
        return [], "the request's tokens show no edit inside the base prompt"
    if len(regions) == len(modes):
        paired = list(modes)
    elif len(set(modes)) == 1:
        paired = [modes[0]] * len(regions)
    else:
        return [], (
            f"the token diff finds {len(regions)} edits but the payload has {len(modes)} "
            "directives with mixed modes"
        )
    return [
        TokenEdit(r[0], r[1], r[2], r[3], m) for r, m in zip(regions, paired, strict=True)
    ], None
