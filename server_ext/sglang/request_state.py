"""What the Leyline cache knows about one SGLang request while it is being served.

`RequestState` lives on the scheduler's `Req` from its first ``match_prefix`` to its end. It
keeps what must not be recomputed at every radix lookup (the token diff against the session's
base and the client directives mapped onto it), the plan's schedule (the end of the next
recompute window, see :mod:`leyline.server.sglang.windows`) and the accounting: which prompt
positions were really served by a splice or a chunk copy. The accounting is rebuilt from those
positions after every fill, so it says what happened, not what was planned: a directive is
``applied`` only when every token the plan would splice after it was spliced. Its wire form is
the protocol's `ResponseInfo` (:mod:`leyline.protocol`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from leyline.protocol import (
    DirectiveOutcome,
    Payload,
    ResponseInfo,
    Status,
    TokenCounts,
    ignored_all,
)
from leyline.server.core.align import Alignment

__all__ = ["CHUNK", "SPLICED", "RequestState"]

SPLICED, CHUNK = 1, 2  # values of RequestState.served
# The shared outcome of edits that did not pair with directives is the worst of theirs.
_SEVERITY = {Status.NOT_NEEDED: 0, Status.APPLIED: 1, Status.PARTIAL: 2, Status.IGNORED: 3}


@dataclass
class RequestState:
    """One request's plan inputs, window schedule and served-token record.

    ``exact`` and ``inherited`` split the prefix the request found cached before any copy:
    ``exact`` holds KV of a fresh prefill (the plain namespace, or copies seeded from it),
    ``inherited`` the rest of its approximate-namespace match (KV descending from earlier
    splices or chunk copies). ``approx``: the request lives in the approximate namespace (it
    inherits or copies approximate KV).
    """

    payload: Payload
    prompt_len: int
    salt: str | None = None  # the tenant's cache salt where SGLang keeps it apart (compat)
    version: int | None = None  # the payload's, or the server's next one (server-diff)
    base_version: int | None = None  # the payload's, or the session's latest (server-diff)
    exact: int = 0
    inherited: int = 0
    approx: bool = False
    served: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    alignment: Alignment | None = None
    directives: list[Any] = field(default_factory=list)  # planner TokenDirectives
    moved: list[tuple[int, int, int]] = field(default_factory=list)
    base_tokens: np.ndarray | None = None  # the base version's tokens (prompt + output)
    base_len: int = 0  # cached tokens of the base version when the request was planned
    base_missing: str | None = None
    outcomes: tuple[DirectiveOutcome, ...] = ()  # the first plan's outcomes, one per edit
    window_end: int | None = None
    windows: int = 0
    shortfalls: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, Any] | None = None  # splice verification totals (verify_splices only)
    indexed_from: int = 0  # the match before any copy: already in the content index
    repair: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # REPAIR windows
    settled: tuple[int, int, int] | None = None  # (tokens, matched, evictions) of the last plan
    base_cache: tuple[int, Any, Any, Any] | None = None  # see LeylineRadixCache._base
    timings_ms: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0  # first match_prefix (admission), for the timeline
    timeline_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.served):
            self.served = np.zeros(self.prompt_len, np.int8)
        if not len(self.repair):
            self.repair = np.zeros(self.prompt_len, bool)

    # ----- recording -----

    def mark(self, runs: Any) -> None:
        """Positions filled by the plan's copy ``runs`` (``spliced`` or ``chunk`` `Run` s)."""
        for r in runs:
            self.served[r.start : min(r.end, self.prompt_len)] = (
                SPLICED if r.kind == "spliced" else CHUNK
            )

    def plan_windows(self, spans: Any) -> None:
        """A plan's REPAIR windows (``Plan.windows``): positions it recomputes that it could
        have copied. Only these count as ``repaired``; copy runs that `windows.next_step`
        recomputes because they are short are recomputed, not windows."""
        for lo, hi in spans:
            self.repair[lo : min(hi, self.prompt_len)] = True

    def rematch(self, matched: int) -> None:
        """A later lookup found only ``matched`` tokens cached (evictions since the first one):
        what lay beyond is served again by this lookup's copies or prefilled."""
        self.exact = min(self.exact, matched)
        self.inherited = min(self.inherited, matched - self.exact)
        self.served[matched:] = 0

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

    def forget_start(self, unknown: int) -> int:
        """Request position of the first FORGET edit; ``unknown`` when it was not located
        (no base to diff against, or no edit found)."""
        al = self.alignment
        starts = [e.new_start for e in al.edits if e.mode == "forget"] if al is not None else []
        return min(starts, default=unknown)

    # ----- reporting -----

    @property
    def spliced(self) -> int:
        return int((self.served == SPLICED).sum())

    @property
    def chunk_reused(self) -> int:
        return int((self.served == CHUNK).sum())

    def tokens(self) -> TokenCounts:
        spliced, chunk = self.spliced, self.chunk_reused
        cached = self.exact + self.inherited
        repaired = int((self.repair[cached:] & (self.served[cached:] == 0)).sum())
        return TokenCounts(
            exact=self.exact, inherited=self.inherited, spliced=spliced, chunk_reused=chunk,
            recomputed=self.prompt_len - cached - spliced - chunk, repaired=repaired,
        )  # fmt: skip

    def directive_outcomes(self) -> tuple[DirectiveOutcome, ...]:
        """One outcome per client directive, or per edit the server's own diff found for a
        server-diff payload (see docs/sglang.md, "Accounting")."""
        if self.payload.server_diff:
            al = self.alignment
            return tuple(self._edit_outcome(j) for j in range(len(al.edits) if al else 0))
        count = len(self.payload.directives)
        if not count:
            return ()
        if self.base_missing is not None:
            return ignored_all(count, self.base_missing)
        al = self.alignment
        if al is None or not al.edits:
            return ignored_all(count, (al and al.reason) or "no base version to edit")
        per_edit = [self._edit_outcome(j) for j in range(len(al.edits))]
        if al.paired:
            return tuple(per_edit)
        worst = max((o.status for o in per_edit), key=_SEVERITY.__getitem__)
        reasons = [al.reason] + [o.reason for o in per_edit if o.reason]
        why = "; ".join(dict.fromkeys(r for r in reasons if r))
        window = None if any(o.window_tokens for o in per_edit) else 0  # shared, like spliced
        return tuple(DirectiveOutcome(i, worst, why, None, window) for i in range(count))

    def _edit_outcome(self, j: int) -> DirectiveOutcome:
        assert self.alignment is not None
        edit = self.alignment.edits[j]
        planned = self.outcomes[j] if j < len(self.outcomes) else None
        if planned is None:
            why = "; ".join(self.shortfalls) or "the edit could not be planned"
            return DirectiveOutcome(j, Status.IGNORED, why, 0)
        if planned.status is not Status.APPLIED:  # ignored, or not needed (a retry)
            return replace(planned, index=j, spliced_tokens=0)
        if edit.mode == "forget":
            return DirectiveOutcome(j, Status.APPLIED, None, 0)
        # A REPAIR window is never copied (every plan recomputes it): served as planned.
        window = planned.window_tokens
        lo, hi = self._kept_segment(j)
        served = int((self.served[lo:hi] == SPLICED).sum())
        want = int(planned.spliced_tokens or 0)
        if served >= want:
            return DirectiveOutcome(j, Status.APPLIED, None, served, window)
        why = "; ".join(self.shortfalls) or "the spliced suffix could not be served"
        if served:
            why = f"{served} of {want} kept tokens spliced: {why}"
            return DirectiveOutcome(j, Status.PARTIAL, why, served, window)
        why = f"none of {want} kept tokens spliced: {why}"
        return DirectiveOutcome(j, Status.IGNORED, why, 0, window)

    def _kept_segment(self, j: int) -> tuple[int, int]:
        """Request positions of the base tokens kept after edit ``j`` (up to the next edit)."""
        assert self.alignment is not None
        edits = self.alignment.edits
        lo = edits[j].new_end
        hi = edits[j + 1].new_start if j + 1 < len(edits) else lo + self.base_len - edits[j].end
        return min(lo, self.prompt_len), min(max(hi, lo), self.prompt_len)

    def info(self) -> ResponseInfo:
        """The response's ``leyline`` object; the plugin's extras go in ``extra``."""
        extra: dict[str, Any] = {
            "windows": self.windows,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "timeline_ms": dict(self.timeline_ms),
        }
        if self.checks is not None:
            extra["splice_checks"] = self.checks
        return ResponseInfo(
            self.payload.session, self.version, self.tokens(),
            self.directive_outcomes(), tuple(self.notes), extra,
        )  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        return self.info().to_wire()

    def publish(self, req: Any) -> None:
        """Set ``req.customized_info["leyline"]``: SGLang ships it with the first output token,
        after the last prefill chunk, so the last call before that is what the client sees."""
        info = dict(req.customized_info or {})
        info["leyline"] = [json.dumps(self.to_wire())]
        req.customized_info = info
