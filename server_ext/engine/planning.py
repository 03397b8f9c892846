"""Phase 2 of a request, the parts that read the cache but change nothing: the client's edits
as token directives over the session's last served sequence, and what the served tokens were.

Segment payloads map segment spans to token spans through the server's own segmentation (only
when the client's segment hashes equal the server's); server-diff payloads diff the session's
last tokens against the request (`leyline.server.core.align`). Either way the planner verifies
every directive against the request's own tokens.
"""

from __future__ import annotations

import numpy as np

from leyline.directives import Mode, validate_directives
from leyline.errors import DirectiveError
from leyline.protocol import TokenCounts, ignored_all
from leyline.server.core.align import align_edits
from leyline.server.core.planner import CachedSequence, Plan, TokenDirective
from leyline.server.engine.radix import Match, RadixTree
from leyline.server.engine.request import Request
from leyline.server.engine.sessions import SessionState

__all__ = ["approx_from", "served_tokens", "token_directives"]


def token_directives(tree: RadixTree, req: Request) -> None:
    """Fill ``req.directives``, ``req.outcomes`` (for directives ignored up front) and
    ``req.base`` (the session's cached base sequence and its node)."""
    payload, state, work = req.payload, req.session, req.work
    if payload is None or state is None or state.node is None:
        if payload is not None and payload.directives:
            req.notes.append("directives ignored: the session has no cached base on this server")
            req.outcomes = ignored_all(len(payload.directives), "no cached base")
        return
    base_match = tree.match_prefix(state.tokens, session=state.key, tenant=state.tenant)
    cached = CachedSequence(tokens=state.tokens[: base_match.length], slots=base_match.slots)
    req.base = (cached, base_match.node)
    if payload.mode is not None:
        req.directives = _diff_directives(
            req, state, payload.mode, payload.window, base_match.length
        )
        return
    if not payload.directives:
        return
    if not work.aligned or tuple(h for h, _ in payload.segments) != work.segment_hashes:
        req.notes.append("directives ignored: the client's segments differ from the server's")
        req.outcomes = ignored_all(len(payload.directives), "segment hash mismatch")
        return
    parsed = validate_directives(
        payload.directives, base_len=len(state.segment_spans), new_len=len(work.segment_spans)
    )
    base_spans, new_spans = state.segment_spans, work.segment_spans
    base_prompt_end = base_spans[-1][1] if base_spans else 0
    for d in parsed:
        start = base_spans[d.start][0] if d.start < len(base_spans) else base_prompt_end
        end = base_spans[d.end - 1][1] if d.end > d.start else start
        k, length = d.replacement
        lo, hi = (new_spans[k][0], new_spans[length - 1][1]) if length > k else (0, 0)
        if end > base_match.length:
            raise DirectiveError("span is beyond the cached base sequence")
        req.directives.append(
            TokenDirective(start, end, np.asarray(req.ids[lo:hi]), d.mode, d.window)
        )
    if base_match.length < len(state.tokens):
        req.notes.append("part of the session's base was evicted; directives cover what remains")


def _diff_directives(
    req: Request, state: SessionState, mode: Mode, window: int | None, cached: int
) -> list[TokenDirective]:
    """Every edit the token diff finds inside the base prompt, in ``mode`` (REPAIR: with
    ``window``)."""
    al = align_edits(state.tokens, state.prompt_len, req.ids, (), default=mode.value)
    edits = [e for e in al.edits if e.end <= cached]
    if len(edits) < len(al.edits):
        req.notes.append("part of the session's base was evicted; edits cover what remains")
    return [
        TokenDirective(e.start, e.end, req.ids[e.new_start : e.new_end].copy(), mode, window)
        for e in edits
    ]


def approx_from(plan: Plan, match: Match) -> int | None:
    """First position whose KV is approximate (reused from elsewhere, or after such a token)."""
    if match.exact_length < match.length:
        return match.exact_length
    for run in plan.runs:
        if run.kind in ("spliced", "chunk"):
            return run.start
    return None


def served_tokens(plan: Plan, match: Match) -> TokenCounts:
    """Where the prompt's tokens came from. A matched prefix is exact only up to the tree's
    first approximate node (KV that descends from a splice or a chunk reuse); the rest of it
    is inherited. REPAIR windows are recomputed (``repaired`` counts them)."""
    exact = min(plan.exact_tokens, match.exact_length)
    return TokenCounts(
        exact=exact,
        inherited=plan.exact_tokens - exact,
        spliced=plan.spliced_tokens,
        chunk_reused=plan.chunk_tokens,
        recomputed=plan.recomputed_tokens,
        repaired=plan.repaired_tokens,
    )
