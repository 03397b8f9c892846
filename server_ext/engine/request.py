"""What flows through the embedded engine: the submitted :class:`Work`, the per-request state
:class:`Request` that the phases (plan, materialize, decode, commit) fill in, the
:class:`Finished` result, and the :class:`EngineError`\\ s the HTTP layer turns into answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from leyline.protocol import DirectiveOutcome, Payload, TokenCounts
from leyline.server.core.planner import CachedSequence, Plan, TokenDirective
from leyline.server.engine.forward import Generation
from leyline.server.engine.radix import Match, Node
from leyline.server.engine.sessions import SessionState

__all__ = [
    "Cancelled",
    "ContextTooLong",
    "EngineError",
    "Finished",
    "Held",
    "KVCacheFull",
    "Overloaded",
    "Request",
    "SamplingParams",
    "SessionBusy",
    "StaleBaseVersion",
    "StaleVersion",
    "TooManySessions",
    "Work",
]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Work:
    """One request, already tokenized and validated by the HTTP layer.

    ``tenant`` is its cache and session namespace (docs/security.md); ``opted_in``: the request
    itself asked for approximate reuse (a payload with ``approximate`` and ``content_reuse``),
    so its content may be indexed for the tenant's content reuse. ``on_start`` is called when
    the first token is sampled, ``on_text`` with each piece of final text; ``cancelled`` stops
    the request (nothing of it is kept)."""

    ids: np.ndarray
    sampling: SamplingParams
    segment_spans: tuple[tuple[int, int], ...] = ()
    segment_hashes: tuple[str, ...] = ()
    aligned: bool = False
    leyline: Payload | None = None
    tenant: str = ""
    opted_in: bool = False
    on_start: Callable[[], None] | None = None
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future[Finished] = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    tokens: TokenCounts
    directives: tuple[DirectiveOutcome, ...]
    notes: list[str]
    ttft_s: float
    latency_s: float
    session: str | None = None
    version: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        return self.tokens.cached


@dataclass
class Held:
    """Resources a request holds until it finishes or fails."""

    private: list[np.ndarray] = field(default_factory=list)  # slots not yet owned by the tree
    locked: list[Node] = field(default_factory=list)  # radix nodes


@dataclass
class Request:
    """One request's state, filled in phase by phase (see engine.py's docstring)."""

    work: Work
    payload: Payload | None
    session: SessionState | None = None
    version: int | None = None  # the version this request makes the session's
    approximate: bool = False  # approximate KV may be used (opted in, and splicing is on)
    notes: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # phase end times (perf_counter)
    held: Held = field(default_factory=Held)
    opened_session: bool = False  # this request opened its session (a failure closes it)
    # plan
    directives: list[TokenDirective] = field(default_factory=list)
    outcomes: tuple[DirectiveOutcome, ...] = ()
    base: tuple[CachedSequence, Node | None] | None = None
    match: Match | None = None
    plan: Plan | None = None
    fresh: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reserved: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # for decode
    # materialize
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    logits: torch.Tensor | None = None
    generation: Generation | None = None
    # decode
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    ttft_at: float | None = None

    @property
    def ids(self) -> np.ndarray:
        return self.work.ids


class EngineError(Exception):
    """A request the engine refuses; the HTTP layer answers ``status`` with ``code``."""

    status = 400
    code = "invalid_request"
    type = "invalid_request_error"
    param: str | None = None


class TooManySessions(EngineError):
    status, code = 429, "too_many_sessions"


class SessionBusy(EngineError):
    status, code = 409, "session_busy"


class StaleVersion(EngineError):
    code, param = "stale_version", "leyline.version"


class StaleBaseVersion(EngineError):
    code, param = "stale_base_version", "leyline.base_version"


class ContextTooLong(EngineError):
    code = "context_length_exceeded"


class Cancelled(EngineError):
    """The client went away (disconnect, timeout): the request was dropped, nothing kept."""

    status, code = 499, "cancelled"


class Overloaded(EngineError):
    status, code, type = 503, "overloaded", "server_error"


class KVCacheFull(EngineError):
    status, code, type = 503, "kv_cache_full", "server_error"
