"""The I/O-free core shared by the adapters: one Leyline session under one history policy.

A :class:`Conversation` turns the keyword arguments of a ``chat.completions.create`` call into
the ones actually sent (policy applied, ``extra_body["custom_params"]["leyline"]`` added), and reads the answer
back (commit the session, record the accounting). :func:`send` and :func:`asend` are the only
places that do I/O; the OpenAI wrapper and the LangGraph model both go through them, so sync
and async behave the same.

Graceful degradation: a server that ignores ``custom_params`` just works (no accounting). A
strict server that rejects the field with a 400 is retried once without it, and the
conversation stops sending it; the policy keeps applying. A Leyline server's own 400 about the
payload (``invalid_payload``, ``stale_version``, ...) is raised, not swallowed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai

from leyline.accounting import Accounting
from leyline.middleware.messages import as_message_dicts
from leyline.middleware.policies import KeepAll, Policy
from leyline.protocol import PAYLOAD_KEY
from leyline.session import Prepared, Session

__all__ = ["Conversation", "Plan", "asend", "is_leyline_refusal", "send"]

log = logging.getLogger("leyline.middleware")
_LEYLINE_CODES = ("invalid_payload", "invalid_directive", "unsupported_protocol",
                  "stale_version", "stale_base_version", "session_busy")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """One request as it will be sent: ``kwargs`` for ``create``, and the session payload."""

    kwargs: dict[str, Any]
    prepared: Prepared | None
    user_extra_body: Any

    def without_leyline(self) -> dict[str, Any]:
        """The same request with only the caller's own ``extra_body``."""
        kwargs = {k: v for k, v in self.kwargs.items() if k != "extra_body"}
        if self.user_extra_body is not None:
            kwargs["extra_body"] = self.user_extra_body
        return kwargs


def is_leyline_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is a 400 from a server that rejects the payload's carrier field
    (``custom_params``) itself. A 400 about the payload's content (a Leyline server's
    ``invalid_payload`` / ``invalid_directive`` ...) is a real error and is raised."""
    if not isinstance(exc, openai.BadRequestError):
        return False
    text = f"{exc.message} {exc.body}".lower()
    if any(code in text for code in _LEYLINE_CODES):
        return False
    return "custom_params" in text or "leyline" in text


class Conversation:
    """One session, one policy, the latest and running accounting.

    >>> conv = Conversation(KeepAll())
    >>> plan = conv.plan({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    >>> sorted(plan.kwargs["extra_body"]["custom_params"])
    ['leyline']
    """

    def __init__(
        self,
        policy: Policy | None = None,
        session: Session | None = None,
        *,
        leyline: bool = True,
    ) -> None:
        self.policy: Policy = policy if policy is not None else KeepAll()
        self.session = session if session is not None else Session()
        #: False once a server refused the ``leyline`` field: requests go without it.
        self.leyline_enabled = leyline
        self.last_accounting: Accounting | None = None
        self.totals = Accounting.zero()

    def plan(self, kwargs: dict[str, Any]) -> Plan:
        """Apply the policy to ``kwargs["messages"]`` and attach the session payload."""
        if "messages" not in kwargs:
            raise TypeError("chat.completions.create() needs messages=")
        result = self.policy.apply(as_message_dicts(kwargs["messages"]))
        sent = dict(kwargs, messages=list(result.messages))
        user_extra = kwargs.get("extra_body")
        user_has_leyline = isinstance(user_extra, dict) and (
            PAYLOAD_KEY in user_extra or PAYLOAD_KEY in (user_extra.get("custom_params") or {})
        )
        if not self.leyline_enabled or user_has_leyline:
            # why: an explicit leyline payload from the caller wins over ours.
            return Plan(sent, None, user_extra)
        tools = kwargs.get("tools")
        prepared = self.session.prepare(
            result.messages,
            forget=result.forget,
            tools=tools if isinstance(tools, list) else None,
        )
        extra = dict(user_extra) if isinstance(user_extra, dict) else {}
        custom = dict(extra.get("custom_params") or {})
        custom.update(prepared.to_payload().to_custom_params())
        extra["custom_params"] = custom
        sent["extra_body"] = extra
        return Plan(sent, prepared, user_extra)

    def refused(self, exc: BaseException) -> None:
        """Stop sending the ``leyline`` field after a server rejected it."""
        log.warning("server rejected the leyline field; continuing without directives: %s", exc)
        self.leyline_enabled = False

    def accepted(self, plan: Plan) -> None:
        """The server took the request: advance the session to the plan's version."""
        if plan.prepared is not None:
            self.session.commit(plan.prepared)

    def observe(self, body: Any) -> Accounting | None:
        """Record the accounting of a response (or final stream chunk), if it has one."""
        if not isinstance(body, dict):
            body = body.model_dump() if hasattr(body, "model_dump") else {}
        acc = Accounting.from_response(body)
        if acc is not None:
            self.last_accounting = acc
            self.totals = self.totals + acc
        return acc

    def finish(self, plan: Plan, response: Any) -> Any:
        """Commit and read accounting; streams are watched so the final chunk is read."""
        self.accepted(plan)
        if isinstance(response, openai.Stream):
            return _watch_stream(response, self)
        if isinstance(response, openai.AsyncStream):
            return _watch_async_stream(response, self)
        if hasattr(response, "model_dump"):
            self.observe(response)
        return response


def send(conv: Conversation, create: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Run one ``create`` call through ``conv`` (sync)."""
    plan = conv.plan(kwargs)
    try:
        response = create(**plan.kwargs)
    except openai.BadRequestError as exc:
        if plan.prepared is None or not is_leyline_refusal(exc):
            raise
        conv.refused(exc)
        plan = Plan(plan.without_leyline(), None, plan.user_extra_body)
        response = create(**plan.kwargs)
    return conv.finish(plan, response)


async def asend(
    conv: Conversation, create: Callable[..., Awaitable[Any]], kwargs: dict[str, Any]
) -> Any:
    """Run one ``create`` call through ``conv`` (async)."""
    plan = conv.plan(kwargs)
    try:
        response = await create(**plan.kwargs)
    except openai.BadRequestError as exc:
        if plan.prepared is None or not is_leyline_refusal(exc):
            raise
        conv.refused(exc)
        plan = Plan(plan.without_leyline(), None, plan.user_extra_body)
        response = await create(**plan.kwargs)
    return conv.finish(plan, response)


def _watch_stream(stream: openai.Stream[Any], conv: Conversation) -> openai.Stream[Any]:
    def watched(inner: Iterator[Any]) -> Iterator[Any]:
        for chunk in inner:
            if getattr(chunk, "leyline", None) is not None:
                conv.observe(chunk)
            yield chunk

    # NOTE: openai's Stream iterates `self._iterator`; swapping it keeps the Stream type (and its
    # close()/context manager) while we read the final chunk's accounting on the way through.
    stream._iterator = watched(stream._iterator)
    return stream


def _watch_async_stream(
    stream: openai.AsyncStream[Any], conv: Conversation
) -> openai.AsyncStream[Any]:
    async def watched(inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for chunk in inner:
            if getattr(chunk, "leyline", None) is not None:
                conv.observe(chunk)
            yield chunk

    stream._iterator = watched(stream._iterator)
    return stream
