"""Middle windows: serve ``[exact][recompute][copy][recompute][copy]...[new turn]`` in SGLang.

SGLang prefills one contiguous tail after a request's matched prefix. A plan whose copy runs
(spliced or chunk-reused KV) sit *behind* a recompute window (an AMORTIZE replacement, content
moved to a later position) is served with SGLang's own chunked prefill:

1. ``match_prefix`` fills the copy runs that start right at the match end and records the
   end of the next window, ``W``, on the request (`WINDOW_ATTR`), if another copy run of at
   least ``min_copy_run`` tokens follows it;
2. the AROUND hooks on ``PrefillAdder.add_one_req`` / ``add_chunked_req`` cap the request's
   chunk at ``W``: SGLang makes it its chunked request, prefills ``[prefix, W)`` (the window,
   exact in the context of the prefix) and stops;
3. the next scheduling round caches the chunk (0.5.16 ``cache_unfinished_req``, 0.5.23
   ``checkpoint``; the Leyline cache hooks both, see `compat`): the copy run after ``W`` is
   spliced into fresh slots, inserted into the radix tree and appended to the request's
   prefix, and the next ``W`` is recorded; the adder's next ``add_chunked_req`` continues
   after the copy run.

Cost: one extra prefill round per window (a forward pass over the window alone, plus the
splice). Copy runs shorter than ``min_copy_run`` tokens are recomputed instead (the round would
cost more than it saves), and at most ``max_windows`` windows are opened per request.

The hooks change only the chunk budget of requests that carry a window end; every other
request, and every other part of SGLang's admission, is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leyline.server.sglang import compat

__all__ = [
    "HOOK_TARGETS",
    "WINDOW_ATTR",
    "Step",
    "around_add_chunked_req",
    "around_add_one_req",
    "install_window_hooks",
    "next_step",
]

WINDOW_ATTR = "_leyline_window_end"
_ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
_COPY = ("spliced", "chunk")


@dataclass(frozen=True, slots=True)
class Step:
    """Copy runs to fill now at ``start`` (contiguous with the match) and the next window end."""

    start: int
    runs: tuple[Any, ...]  # the plan's copy runs filled now (one delta each)
    window_end: int | None
    skipped: int  # copy tokens after the windows that will be recomputed (too short/too many)

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)


def next_step(plan: Any, start: int, *, min_copy_run: int, windows_left: int) -> Step:
    """Split ``plan`` (a core `Plan`) at ``start``: the leading copy runs, then the next window."""
    runs = [r for r in plan.runs if r.end > start]
    pos, i = start, 0
    while i < len(runs) and runs[i].kind in _COPY and runs[i].start == pos:
        pos, i = runs[i].end, i + 1
    taken = tuple(runs[:i])
    window_end: int | None = None
    skipped = 0
    while i < len(runs):
        while i < len(runs) and runs[i].kind not in _COPY:
            i += 1
        if i == len(runs):
            break
        g0 = g1 = runs[i].start
        while i < len(runs) and runs[i].kind in _COPY and runs[i].start == g1:
            g1, i = runs[i].end, i + 1
        if window_end is None and windows_left > 0 and g1 - g0 >= min_copy_run:
            window_end = g0
        elif window_end is None:
            skipped += g1 - g0
    return Step(start, taken, window_end, skipped)


def _window_cap(req: Any) -> int | None:
    """Tokens the request may prefill before its window ends, or None (no cap needed)."""
    end = getattr(req, WINDOW_ATTR, None)
    if end is None:
        return None
    prefix = compat.prefix_len(req)
    remaining = len(req.full_untruncated_fill_ids) - prefix
    cap = end - prefix
    return cap if 0 < cap < remaining else None


def _capped(original: Callable[..., Any], adder: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    cap = _window_cap(req)
    saved = adder.rem_chunk_tokens
    if cap is None or (saved is not None and saved <= cap):
        if saved is None and getattr(req, WINDOW_ATTR, False) is not False:
            # NOTE: without chunked prefill SGLang's add_chunked_req reads a None budget; a
            # request continued after a window gets an explicit one for this call.
            adder.rem_chunk_tokens = len(req.full_untruncated_fill_ids)
            try:
                return original(adder, req, *args, **kwargs)
            finally:
                adder.rem_chunk_tokens = None
        return original(adder, req, *args, **kwargs)
    adder.rem_chunk_tokens = cap
    out = None
    try:
        out = original(adder, req, *args, **kwargs)
    finally:
        chunked = adder.new_chunked_req is req or out is req  # add_chunked_req returns it
        if chunked:
            adder.rem_chunk_tokens = 0  # this round's chunk ends here, as SGLang's own would
        else:
            used = cap - adder.rem_chunk_tokens
            adder.rem_chunk_tokens = None if saved is None else saved - used
    return out


def around_add_one_req(original: Callable[..., Any], adder: Any, req: Any, *args: Any,
                       **kwargs: Any) -> Any:  # fmt: skip
    """AROUND hook of ``PrefillAdder.add_one_req``: end a new request's chunk at its window."""
    return _capped(original, adder, req, *args, **kwargs)


def around_add_chunked_req(original: Callable[..., Any], adder: Any, req: Any, *args: Any,
                           **kwargs: Any) -> Any:  # fmt: skip
    """AROUND hook of ``PrefillAdder.add_chunked_req``: end a continued chunk at its window."""
    return _capped(original, adder, req, *args, **kwargs)


HOOK_TARGETS = (
    (f"{_ADDER}.add_one_req", around_add_one_req),
    (f"{_ADDER}.add_chunked_req", around_add_chunked_req),
)


def install_window_hooks() -> list[str]:
    """Register the AROUND hooks with SGLang's `HookRegistry`; idempotent; returns new targets."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    added = []
    for target, hook in HOOK_TARGETS:
        # NOTE: HookRegistry has no public lookup; its class-level table is read to stay idempotent.
        if any(h is hook for _t, h, _s in HookRegistry._hooks.get(target, ())):
            continue
        HookRegistry.register(target, hook, HookType.AROUND)
        added.append(target)
    return added
