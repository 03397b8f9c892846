"""Session table: what each live agent session last saw, and the cache it keeps alive.

A session pins (locks) the radix node that ends its last served sequence, so the KV a
follow-up request extends or edits cannot be evicted while the session is live. Closing or
expiring a session unlocks that node and frees the session's approximate KV (spliced or
chunk-reused nodes that only this session can match).

Sessions live in their tenant's namespace (docs/security.md): the same id names unrelated
sessions in two tenants, and one tenant can neither see nor touch another's. ``SessionState.key``
(the id, prefixed by the tenant when there is one) is the table's key and the owner of the
session's approximate nodes in the radix tree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from leyline.server.engine.radix import Node, RadixTree

__all__ = ["SessionState", "SessionTable", "UnknownSession", "session_key"]


def session_key(session_id: str, tenant: str = "") -> str:
    """The table key of ``session_id`` in ``tenant`` (session ids cannot contain ``/``)."""
    return f"{tenant}/{session_id}" if tenant else session_id


class UnknownSession(KeyError):
    """The session id is not open (never opened, closed, or expired); open it first."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(session_id)

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r} (never opened, closed, or expired)"


@dataclass(slots=True)
class SessionState:
    """Mutable per-session record.

    ``tokens`` is the last served sequence (prompt + generated); ``node`` the radix node
    locked on its behalf (``None`` until the first :meth:`SessionTable.update`);
    ``segment_spans[i]`` is the half-open token span of client segment ``i`` whose content hash
    is ``segment_hashes[i]``. ``busy`` is set by the engine while a request runs.
    """

    id: str
    version: int = 0
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    node: Node | None = None
    segment_spans: tuple[tuple[int, int], ...] = ()
    segment_hashes: tuple[str, ...] = ()
    prompt_len: int = 0  # tokens of ``tokens`` that were the prompt (the rest was generated)
    expires_at: float = 0.0
    busy: bool = False
    ttl_s: float = 600.0
    tenant: str = ""

    @property
    def key(self) -> str:
        return session_key(self.id, self.tenant)


class SessionTable:
    """Open sessions by (tenant, id), each with a time-to-live refreshed on open and update
    (at most ``max_ttl_s``). Methods take the session id and its ``tenant``."""

    def __init__(
        self,
        tree: RadixTree,
        *,
        ttl_s: float = 600.0,
        max_ttl_s: float = float("inf"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_ttl(ttl_s)
        if not max_ttl_s >= ttl_s:
            raise ValueError(f"max_ttl_s ({max_ttl_s}) must be >= ttl_s ({ttl_s})")
        self.tree = tree
        self.ttl_s = float(ttl_s)
        self.max_ttl_s = float(max_ttl_s)
        self._clock = clock
        self._sessions: dict[str, SessionState] = {}

    def open(
        self, session_id: str, ttl_s: float | None = None, *, tenant: str = ""
    ) -> SessionState:
        """Open ``session_id`` or, if already open, keep its state and refresh its TTL
        (``ttl_s`` given on a reopen replaces the session's TTL)."""
        if not isinstance(session_id, str) or not session_id or "/" in session_id:
            raise ValueError(
                f"session id must be a non-empty string without '/', got {session_id!r}"
            )
        if ttl_s is not None:
            _check_ttl(ttl_s)
            if ttl_s > self.max_ttl_s:
                raise ValueError(f"ttl_s must be at most {self.max_ttl_s} seconds, got {ttl_s}")
        key = session_key(session_id, tenant)
        state = self._sessions.get(key)
        if state is None:
            state = SessionState(id=session_id, ttl_s=self.ttl_s, tenant=tenant)
            self._sessions[key] = state
        if ttl_s is not None:
            state.ttl_s = float(ttl_s)
        state.expires_at = self._clock() + state.ttl_s
        return state

    def get(self, session_id: str, tenant: str = "") -> SessionState:
        """The open session's state; raises :class:`UnknownSession`."""
        state = self._sessions.get(session_key(session_id, tenant))
        if state is None:
            raise UnknownSession(session_id)
        return state

    def update(
        self,
        session_id: str,
        *,
        version: int,
        tokens: np.ndarray,
        node: Node,
        spans: tuple[tuple[int, int], ...] | list[tuple[int, int]],
        hashes: tuple[str, ...] | list[str],
        prompt_len: int | None = None,
        tenant: str = "",
    ) -> SessionState:
        """Record a served request: the new version, sequence and segments; lock ``node``
        (which must end a prefix of ``tokens``) and unlock the previous one; refresh the TTL.

        ``version`` must exceed the current one. On any error nothing changes.
        """
        state = self.get(session_id, tenant)
        toks = np.asarray(tokens)
        if toks.ndim != 1 or (toks.size and not np.issubdtype(toks.dtype, np.integer)):
            raise ValueError("tokens must be a 1-D integer array")
        toks = toks.astype(np.int64)  # a private copy: the caller may reuse its buffer
        if isinstance(version, bool) or not isinstance(version, int | np.integer):
            raise ValueError(f"version must be an int, got {version!r}")
        if version <= state.version:
            raise ValueError(
                f"session {session_id!r} is at version {state.version}; "
                f"an update needs a newer one, got {version}"
            )
        spans_t = tuple((int(s), int(e)) for s, e in spans)
        hashes_t = tuple(str(h) for h in hashes)
        if len(spans_t) != len(hashes_t):
            raise ValueError(f"{len(spans_t)} segment spans but {len(hashes_t)} hashes")
        prev_end = 0
        for s, e in spans_t:
            if not prev_end <= s <= e <= len(toks):
                raise ValueError(
                    f"segment spans must be ordered, non-overlapping and inside the "
                    f"{len(toks)} tokens; got {spans_t}"
                )
            prev_end = e
        if node.depth > len(toks) or not np.array_equal(
            self.tree.path_tokens(node), toks[: node.depth]
        ):
            raise ValueError("node does not end a cached prefix of the session's tokens")
        self.tree.lock(node)  # lock first: the old and new paths usually share a prefix
        if state.node is not None:
            self.tree.unlock(state.node)
        state.version = int(version)
        state.tokens = toks
        state.node = node
        state.segment_spans = spans_t
        state.segment_hashes = hashes_t
        state.prompt_len = len(toks) if prompt_len is None else min(int(prompt_len), len(toks))
        state.expires_at = self._clock() + state.ttl_s
        return state

    def close(self, session_id: str, tenant: str = "") -> int:
        """Forget the session: unlock its node and free its unlocked approximate KV.

        Returns the approximate tokens freed; raises :class:`UnknownSession`.
        """
        state = self.get(session_id, tenant)
        del self._sessions[state.key]
        if state.node is not None:
            self.tree.unlock(state.node)
            state.node = None
        return self.tree.drop_session(state.key)

    def expire(self, now: float | None = None) -> list[str]:
        """Close every session whose TTL ran out (busy sessions wait); returns their ids."""
        now = self._clock() if now is None else now
        gone = [s.key for s in self._sessions.values() if s.expires_at <= now and not s.busy]
        for key in gone:
            self.close(key)
        return gone

    def ids(self) -> list[str]:
        """The keys of the open sessions (``get(key)`` finds each)."""
        return list(self._sessions)

    def count(self, tenant: str) -> int:
        """Open sessions of ``tenant``."""
        return sum(1 for s in list(self._sessions.values()) if s.tenant == tenant)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)


def _check_ttl(ttl_s: float) -> None:
    if not 0 < ttl_s < float("inf"):
        raise ValueError(f"ttl_s must be > 0 seconds, got {ttl_s}")
