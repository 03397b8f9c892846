"""What the Leyline cache knows about one SGLang request while it is being served.

`RequestState` lives on the scheduler's `Req` from its first ``match_prefix`` to its end. It
keeps what must not be recomputed at every radix lookup (the token diff against the session's
base and the client directives mapped onto it), the plan's schedule (the end of the next
recompute window, see :mod:`leyline.server.sglang.windows`) and the accounting: which prompt
positions were really served by a splice or a chunk copy. The accounting is rebuilt from those
positions after every fill, so it says what happened, not what was planned: a directive is
``applied`` only when every token the plan would splice after it was spliced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leyline.server.sglang.align import Alignment
from leyline.server.sglang.payload import RequestOptions

__all__ = ["CHUNK", "SPLICED", "RequestState"]

SPLICED, CHUNK = 1, 2  # values of RequestState.served


@dataclass
class RequestState:
    """One request's plan inputs, window schedule and served-token record."""

    opts: RequestOptions
    prompt_len: int
    exact: int = 0
    served: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    alignment: Alignment | None = None
    directives: list[Any] = field(default_factory=list)  # planner TokenDirectives
    moved: list[tuple[int, int, int]] = field(default_factory=list)
    base_tokens: np.ndarray | None = None  # the base version's tokens (prompt + output)
    base_len: int = 0  # cached tokens of the base version when the request was planned
    base_missing: str | None = None
    outcomes: tuple[Any, ...] = ()  # the first plan's DirectiveOutcomes, one per edit
    window_end: int | None = None
    windows: int = 0
    shortfalls: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, Any] | None = None  # splice verification totals (verify_splices only)
    indexed_from: int = 0  # the exact match before any copy: already in the content index
    settled: tuple[int, int, int] | None = None  # (tokens, matched, evictions) of the last plan
    base_cache: tuple[int, Any, Any, Any] | None = None  # see LeylineRadixCache._base
    timings_ms: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0  # first match_prefix (admission), for the timeline
    timeline_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.served):
            self.served = np.zeros(self.prompt_len, np.int8)

    # ----- recording -----

    def mark(self, runs: Any) -> None:
        """Positions filled by the plan's copy ``runs`` (``spliced`` or ``chunk`` `Run` s)."""
        for r in runs:
            self.served[r.start : min(r.end, self.prompt_len)] = (
                SPLICED if r.kind == "spliced" else CHUNK
            )

    def shortfall(self, why: str) -> None:
        """Why some planned reuse was not served (reported with the affected directives)."""
        if why not in self.shortfalls:
            self.shortfalls.append(why)

    def time(self, phase: str, t0: float) -> None:
        """Add the host time since ``t0`` (``time.perf_counter()``) to ``phase``."""
        ms = (time.perf_counter() - t0) * 1e3
        self.timings_ms[phase] = self.timings_ms.get(phase, 0.0) + ms

    def mark_time(self, event: str) -> None:
        """Milliseconds from the first ``match_prefix`` to ``event`` (scheduler clock)."""
        self.timeline_ms[event] = round((time.perf_counter() - self.t0) * 1e3, 3)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ----- reporting -----

    @property
    def spliced(self) -> int:
        return int((self.served == SPLICED).sum())

    @property
    def chunk_reused(self) -> int:
        return int((self.served == CHUNK).sum())

    def directive_outcomes(self) -> list[dict[str, Any]]:
        """One outcome per client directive (see docs/sglang.md, "Accounting")."""
        count = len(self.opts.modes)
        if not count:
            return []
        if self.base_missing is not None:
            return [_outcome(i, "ignored", self.base_missing, 0) for i in range(count)]
        al = self.alignment
        if al is None or not al.edits:
            why = al.reason if al is not None else "no base version to edit"
            return [_outcome(i, "ignored", why, 0) for i in range(count)]
        per_edit = [self._edit_outcome(j) for j in range(len(al.edits))]
        if al.paired:
            return [{**o, "index": i} for i, o in enumerate(per_edit)]
        order = {"applied": 0, "partial": 1, "ignored": 2}
        worst = max((o["status"] for o in per_edit), key=order.__getitem__)
        reasons = [al.reason] + [o["reason"] for o in per_edit if o["reason"]]
        why = "; ".join(dict.fromkeys(r for r in reasons if r))
        return [_outcome(i, worst, why, None) for i in range(count)]

    def _edit_outcome(self, j: int) -> dict[str, Any]:
        assert self.alignment is not None
        edit = self.alignment.edits[j]
        planned = self.outcomes[j] if j < len(self.outcomes) else None
        if planned is None or planned.status != "applied":
            why = planned.reason if planned is not None else "; ".join(self.shortfalls)
            return _outcome(j, "ignored", why or "the edit could not be planned", 0)
        if edit.mode == "forget":
            return _outcome(j, "applied", None, 0)
        lo, hi = self._kept_segment(j)
        served = int((self.served[lo:hi] == SPLICED).sum())
        want = int(planned.spliced_tokens)
        if served >= want:
            return _outcome(j, "applied", None, served)
        why = "; ".join(self.shortfalls) or "the spliced suffix could not be served"
        if served:
            return _outcome(j, "partial", f"{served} of {want} kept tokens spliced: {why}", served)
        return _outcome(j, "ignored", f"none of {want} kept tokens spliced: {why}", 0)

    def _kept_segment(self, j: int) -> tuple[int, int]:
        """Request positions of the base tokens kept after edit ``j`` (up to the next edit)."""
        assert self.alignment is not None
        edits = self.alignment.edits
        lo = edits[j].new_end
        hi = edits[j + 1].new_start if j + 1 < len(edits) else lo + self.base_len - edits[j].end
        return min(lo, self.prompt_len), min(max(hi, lo), self.prompt_len)

    def to_wire(self) -> dict[str, Any]:
        spliced, chunk = self.spliced, self.chunk_reused
        return {
            "session": self.opts.session,
            "version": self.opts.version,
            "tokens": {
                "exact": self.exact,
                "spliced": spliced,
                "chunk_reused": chunk,
                "recomputed": self.prompt_len - self.exact - spliced - chunk,
            },
            "directives": self.directive_outcomes(),
            "windows": self.windows,
            "notes": list(self.notes),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "timeline_ms": dict(self.timeline_ms),
        } | ({"splice_checks": self.checks} if self.checks is not None else {})

    def publish(self, req: Any) -> None:
        """Set ``req.customized_info["leyline"]``: SGLang ships it with the first output token,
        after the last prefill chunk, so the last call before that is what the client sees."""
        info = dict(req.customized_info or {})
        info["leyline"] = [json.dumps(self.to_wire())]
        req.customized_info = info


def _outcome(index: int, status: str, reason: str | None, spliced: int | None) -> dict[str, Any]:
    return {"index": index, "status": status, "reason": reason, "spliced_tokens": spliced}
