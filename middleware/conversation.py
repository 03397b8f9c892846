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

Modes: the session's diff gives every edit FORGET when it produces a message the policy marked
``forget``, else the conversation's ``default_mode``. :func:`apply_policy_modes` then applies the
policy's other marks: a directive takes the strictest mode of what it touches (FORGET, then
REPAIR, then AMORTIZE), a removal counting with the mode the policy gave it; REPAIR directives
carry the conversation's ``repair_window`` (``None``: the server's default).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from leyline.accounting import Accounting
from leyline.directives import Mode, parse_mode, validate_window
from leyline.middleware.messages import Message, as_message_dicts
from leyline.middleware.policies import Policy, PolicyLike, PolicyResult, as_policy
from leyline.protocol import carries_payload
from leyline.segments import Segment
from leyline.session import Prepared, Session

__all__ = [
    "Conversation",
    "Plan",
    "apply_policy_modes",
    "asend",
    "is_leyline_refusal",
    "send",
]

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


def apply_policy_modes(
    prepared: Prepared,
    result: PolicyResult,
    *,
    base: Sequence[Segment] | None,
    previous: Sequence[Mapping[str, Any]] | None,
    default_mode: Mode = Mode.AMORTIZE,
    window: int | None = None,
) -> Prepared:
    """``prepared`` with each directive's mode set from the policy's marks in ``result``.

    ``base`` is the session's committed segments (``session.base_segments`` before the commit)
    and ``previous`` the messages of that version, so a removed base message can be matched to
    ``result.dropped``. A directive is FORGET when a message it produces is marked FORGET (or
    unmarked, under a FORGET default) or it removes a message dropped with FORGET; else REPAIR
    when anything it touches is REPAIR (marked, dropped, or unmarked under a REPAIR default);
    AMORTIZE when everything it touches is marked AMORTIZE; ``default_mode`` when nothing it
    touches is marked (e.g. the caller deleted messages itself). REPAIR directives get
    ``window``.

    >>> from leyline.middleware import TruncateOlderThan
    >>> call = {"id": "a", "type": "function", "function": {"name": "cat", "arguments": "{}"}}
    >>> history = [{"role": "assistant", "tool_calls": [call]},
    ...            {"role": "tool", "tool_call_id": "a", "content": "x" * 900},
    ...            {"role": "user", "content": "next"}]
    >>> session = Session()
    >>> session.commit(session.prepare(history))
    >>> result = TruncateOlderThan(n=0, max_chars=10, mode=Mode.AMORTIZE).apply(history)
    >>> prep = session.prepare(result.messages, default_mode=Mode.FORGET)
    >>> [d.mode.value for d in prep.directives]
    ['forget']
    >>> prep = apply_policy_modes(prep, result, base=session.base_segments, previous=history,
    ...                           default_mode=Mode.FORGET)
    >>> [d.mode.value for d in prep.directives]
    ['amortize']
    """
    if not prepared.directives or base is None:
        return prepared
    if not (result.amortize or result.repair or result.dropped):
        return prepared
    if previous is not None and (not base or len(previous) != base[-1].message + 1):
        previous = None  # why: not the messages of the base version (a swapped session)
    directives = []
    for d in prepared.directives:
        modes: set[Mode] = set()
        for j in {prepared.segments[k].message for k in range(*d.replacement)}:
            if j in result.forget:
                modes.add(Mode.FORGET)
            elif j in result.repair:
                modes.add(Mode.REPAIR)
            else:
                modes.add(Mode.AMORTIZE if j in result.amortize else default_mode)
        if previous is not None:
            for b in {base[k].message for k in range(d.start, d.end)}:
                modes.update(mode for msg, mode in result.dropped if msg == previous[b])
        mode = next((m for m in _STRICTEST if m in modes), default_mode)
        directives.append(
            dataclasses.replace(d, mode=mode, window=window if mode is Mode.REPAIR else None)
        )
    return dataclasses.replace(prepared, directives=tuple(directives))


_STRICTEST = (Mode.FORGET, Mode.REPAIR, Mode.AMORTIZE)


class Conversation:
    """One session, one policy, the latest and running accounting.

    ``policy`` may be a :class:`~leyline.middleware.Policy` or a plain function
    ``messages -> messages`` (:func:`~leyline.middleware.as_policy`); ``default_mode`` is the
    mode of edits the policy does not mark, pure deletions included; ``repair_window`` the
    recompute window of REPAIR edits (``None``: the server's default).

    >>> conv = Conversation(lambda messages: messages[-1:])
    >>> plan = conv.plan({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    >>> sorted(plan.kwargs["extra_body"]["custom_params"])
    ['leyline']
    """

    def __init__(
        self,
        policy: PolicyLike | None = None,
        session: Session | None = None,
        *,
        leyline: bool = True,
        default_mode: Mode | str = Mode.AMORTIZE,
        repair_window: int | None = None,
    ) -> None:
        self._policy: Policy = as_policy(policy)
        self.session = session if session is not None else Session()
        #: Mode of edits the policy does not mark (pure deletions included).
        self.default_mode = parse_mode(default_mode, name="default_mode")
        #: Recompute window of REPAIR edits (``None``: the server's default).
        self.repair_window = validate_window(repair_window, Mode.REPAIR, name="repair_window")
        #: False once a server refused the ``leyline`` field: requests go without it.
        self.leyline_enabled = leyline
        self.last_accounting: Accounting | None = None
        self.totals = Accounting.zero()
        # the messages of the version the session last committed (removals are matched to them)
        self._committed: list[Message] | None = None

    @property
    def policy(self) -> Policy:
        """The history policy (assign a ``Policy`` or a plain function)."""
        return self._policy

    @policy.setter
    def policy(self, policy: PolicyLike) -> None:
        self._policy = as_policy(policy)

    def plan(self, kwargs: dict[str, Any]) -> Plan:
        """Apply the policy to ``kwargs["messages"]`` and attach the session payload."""
        if "messages" not in kwargs:
            raise TypeError("chat.completions.create() needs messages=")
        result = self.policy.apply(as_message_dicts(kwargs["messages"]))
        sent = dict(kwargs, messages=list(result.messages))
        user_extra = kwargs.get("extra_body")
        user_has_leyline = carries_payload(user_extra)
        if not self.leyline_enabled or user_has_leyline:
            # why: an explicit leyline payload from the caller wins over ours.
            return Plan(sent, None, user_extra)
        tools = kwargs.get("tools")
        prepared = self.session.prepare(
            result.messages,
            forget=result.forget,
            tools=tools if isinstance(tools, list) else None,
            default_mode=self.default_mode,
            window=self.repair_window,
        )
        prepared = apply_policy_modes(
            prepared,
            result,
            base=self.session.base_segments,
            previous=self._committed,
            default_mode=self.default_mode,
            window=self.repair_window,
        )
        sent["extra_body"] = prepared.to_payload().attach(
            user_extra if isinstance(user_extra, dict) else None
        )
        return Plan(sent, prepared, user_extra)

    def refused(self, exc: BaseException) -> None:
        """Stop sending the ``leyline`` field after a server rejected it."""
        log.warning("server rejected the leyline field; continuing without directives: %s", exc)
        self.leyline_enabled = False

    def accepted(self, plan: Plan) -> None:
        """The server took the request: advance the session to the plan's version."""
        if plan.prepared is not None:
            self.session.commit(plan.prepared)
            self._committed = list(plan.kwargs["messages"])

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
