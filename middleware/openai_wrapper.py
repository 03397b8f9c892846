"""``leyline.wrap``: put a history policy and a Leyline session under an ``openai`` client.

The wrapped client is a thin proxy. ``chat.completions.create(...)`` takes the same arguments and
returns the same objects (``ChatCompletion``, ``Stream``; awaitables of them for
``AsyncOpenAI``); on the way it applies the policy to ``messages``, adds the session payload to
``extra_body`` (merged with yours) and commits the session once the server accepted the request.
Everything else (``models``, ``embeddings``, ``chat.completions.parse``...) is the real client's
own attribute, untouched.

Accounting: a Leyline server adds a ``leyline`` object to the response (``response.leyline``,
a dict, or the final chunk's ``chunk.leyline`` when streaming); the wrapper parses it into
:class:`leyline.Accounting` as ``wrapped.last_accounting`` and sums it in ``wrapped.totals``.

>>> import openai, leyline
>>> from leyline.middleware import TruncateOlderThan
>>> client = leyline.wrap(openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x"),
...                       policy=TruncateOlderThan(n=2, max_chars=200))
>>> client.totals.requests
0

A policy may also be a plain function ``messages -> messages`` (its edits get
``default_mode``), and ``default_mode`` is the mode of every edit no policy marks, pure deletions
included (:attr:`leyline.Mode.AMORTIZE` unless set)::

    client = leyline.wrap(raw, policy=lambda messages: messages[-20:], default_mode=Mode.FORGET)

``default_mode="repair"`` serves edits like AMORTIZE but recomputes a window of tokens after
each edit (``repair_window`` tokens, or the server's default), which keeps answers much closer
to an exact re-prefill at a fraction of its cost (docs/repair.md)::

    client = leyline.wrap(raw, policy=TruncateOlderThan(n=2), default_mode="repair")

One wrapped client is one conversation (one session): wrap a client per agent trajectory, and
do not share one between concurrent conversations.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import openai

from leyline.accounting import Accounting
from leyline.directives import Mode
from leyline.middleware.conversation import Conversation, asend, send
from leyline.middleware.policies import Policy, PolicyLike, as_policy
from leyline.session import Session

__all__ = ["WrappedClient", "wrap"]

ClientT = TypeVar("ClientT", openai.OpenAI, openai.AsyncOpenAI)


def wrap(
    client: ClientT,
    policy: PolicyLike | None = None,
    session: Session | None = None,
    *,
    default_mode: Mode | str = Mode.AMORTIZE,
    repair_window: int | None = None,
) -> WrappedClient[ClientT]:
    """Wrap an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client (see the module docstring).

    ``policy`` (a :class:`~leyline.middleware.Policy` or a function ``messages -> messages``)
    defaults to :class:`~leyline.middleware.KeepAll`; ``session`` to a new
    :class:`leyline.Session`; ``default_mode`` is the mode of edits no policy marks (deletions
    included); ``repair_window`` the recompute window of REPAIR edits in tokens (``None``: the
    server's default).
    """
    if not isinstance(client, openai.OpenAI | openai.AsyncOpenAI):
        raise TypeError(
            f"leyline.wrap expects an openai.OpenAI or openai.AsyncOpenAI client, "
            f"got {type(client).__name__}"
        )
    conversation = Conversation(
        as_policy(policy), session, default_mode=default_mode, repair_window=repair_window
    )
    return WrappedClient(client, conversation)


class WrappedClient(Generic[ClientT]):
    """A proxy for an ``openai`` client whose chat completions go through a Leyline session."""

    def __init__(self, client: ClientT, conversation: Conversation) -> None:
        self._client: ClientT = client
        self._conversation = conversation

    # -- Leyline state ------------------------------------------------------------------------
    @property
    def unwrapped(self) -> ClientT:
        """The real ``openai`` client."""
        return self._client

    @property
    def conversation(self) -> Conversation:
        """The policy, session and accounting behind this client."""
        return self._conversation

    @property
    def policy(self) -> Policy:
        """The history policy; assigning a new one (a ``Policy`` or a plain function) makes the
        next request's edits directives."""
        return self._conversation.policy

    @policy.setter
    def policy(self, policy: PolicyLike) -> None:
        self._conversation.policy = as_policy(policy)

    @property
    def default_mode(self) -> Mode:
        """The mode of edits no policy marks (pure deletions included)."""
        return self._conversation.default_mode

    @property
    def session(self) -> Session:
        return self._conversation.session

    @property
    def last_accounting(self) -> Accounting | None:
        """Accounting of the latest response that carried one (``None`` before any)."""
        return self._conversation.last_accounting

    @property
    def totals(self) -> Accounting:
        """Running sum of every accounting this session received (``requests`` counts them)."""
        return self._conversation.totals

    @property
    def leyline_enabled(self) -> bool:
        """False once the server rejected the ``leyline`` field (policies still apply)."""
        return self._conversation.leyline_enabled

    # -- the proxied surface ------------------------------------------------------------------
    @property
    def chat(self) -> _Chat:
        return _Chat(
            self._client.chat, self._conversation, isinstance(self._client, openai.AsyncOpenAI)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def __repr__(self) -> str:
        return f"<leyline.wrap({self._client!r}, policy={self.policy!r})>"


class _Chat:
    def __init__(self, chat: Any, conversation: Conversation, is_async: bool) -> None:
        self._chat = chat
        self._conversation = conversation
        self._is_async = is_async

    @property
    def completions(self) -> _Completions:
        return _Completions(self._chat.completions, self._conversation, self._is_async)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chat, name)


class _Completions:
    def __init__(self, completions: Any, conversation: Conversation, is_async: bool) -> None:
        self._completions = completions
        self._conversation = conversation
        self._is_async = is_async

    def create(self, **kwargs: Any) -> Any:
        """``chat.completions.create`` with the policy and the Leyline session applied."""
        if self._is_async:
            return asend(self._conversation, self._completions.create, kwargs)
        return send(self._conversation, self._completions.create, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)
