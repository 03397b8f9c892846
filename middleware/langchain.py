"""LangChain 1.x adapter: an agent middleware that puts ``create_agent`` model calls on Leyline.

Integration point: ``AgentMiddleware.wrap_model_call`` / ``awrap_model_call``, LangChain's public
hook around every model call of an agent. Put :class:`LeylineMiddleware` last (innermost), so
it sees the messages exactly as the other middleware leave them::

    from langchain.agents import create_agent
    from langchain.agents.middleware import ClearToolUsesEdit, ContextEditingMiddleware
    from langchain_openai import ChatOpenAI
    from leyline.middleware.langchain import LeylineMiddleware

    agent = create_agent(
        ChatOpenAI(model="smollm2", base_url="http://127.0.0.1:8000/v1", api_key="x"),
        tools, checkpointer=InMemorySaver(),
        middleware=[ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=2000, keep=2)]),
                    LeylineMiddleware()])
    agent.invoke({"messages": [("user", "...")]}, {"configurable": {"thread_id": "t1"}})

Payload: every call carries the server-diff payload ``{"session": id, "mode": ...}`` in
``extra_body["custom_params"]["leyline"]`` (docs/protocol.md), passed as
``request.override(model_settings={"extra_body": ...})``; ``create_agent`` binds the settings to
the model, and ``ChatOpenAI`` sends call-time ``extra_body`` instead of its own, so the model's
``extra_body`` and any earlier ``model_settings["extra_body"]`` are merged in. A payload the
caller already put there wins. The server diffs the session's last served tokens against the
new prompt, so whatever the other middleware edit (``ContextEditingMiddleware`` clearing old
tool outputs, ``SummarizationMiddleware`` replacing old messages) becomes an edit it serves in
``mode`` without any segment bookkeeping here.

Session: the run's thread id (``configurable.thread_id``; without one, the id of the
conversation's first message) plus the calling node's path in the graph (``model``, or
``tools.model`` for an agent run inside a tool), hashed when it is not a valid session id.
``SummarizationMiddleware`` calls its summarizer from ``before_model``, outside
``wrap_model_call``, so the summary requests carry no payload and never touch the agent's
session (the old thread-keyed ``leyline_model`` diffed the next agent call against the summary
prompt). A server serves one request per session at a time (a concurrent one gets ``409
session_busy``): agents that share a thread and a node path and run in parallel need their own
``session_prefix``.

Mode: AMORTIZE (``mode=`` changes it for every call), except on a request where a message
first shows a redaction marker (``forget_if``, default :func:`is_redacted`: the placeholders
``PIIMiddleware`` writes): that request is FORGET, so nothing computed while the redacted text
was in the prompt is reused. Later requests go back to ``mode``.

Accounting: ``ChatOpenAI`` keeps a response's ``usage`` in
``AIMessage.response_metadata["token_usage"]`` but drops its other top-level fields, so both
Leyline servers repeat the ``leyline`` object as ``usage.leyline`` (docs/protocol.md). The
middleware copies it to ``AIMessage.response_metadata["leyline"]`` (plain JSON, so checkpointers
keep it); :func:`accounting_of` parses it into :class:`leyline.Accounting`, and
:attr:`LeylineMiddleware.last_accounting` holds the latest. Streamed calls are left alone (the
payload is sent; LangChain keeps no raw usage of a stream, so no accounting is read).

Needs ``pip install 'leyline[langchain]'`` (langchain, langchain-openai). Models other than
``ChatOpenAI`` / ``AzureChatOpenAI`` are passed through untouched.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from leyline.errors import MissingExtraError

try:
    from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_openai.chat_models.base import BaseChatOpenAI
    from langgraph.config import get_config
except ImportError as exc:  # pragma: no cover - exercised by a test with the import blocked
    raise MissingExtraError("leyline.middleware.langchain", "langchain", exc) from exc

from leyline.accounting import Accounting
from leyline.directives import Mode, parse_mode
from leyline.protocol import PAYLOAD_KEY, SESSION_ID, Payload, carries_payload

__all__ = ["LeylineMiddleware", "accounting_of", "is_redacted"]

log = logging.getLogger("leyline.middleware")

# What PIIMiddleware (langchain 1.5) writes: `redact`, `hash` and the built-in `mask` shapes.
_REDACTION = re.compile(
    r"\[REDACTED_[A-Z0-9_]+\]|\[MASKED_URL\]|<[\w-]+_hash:[0-9a-f]{8}>"
    r"|\*{4}[- ]?\*{4}[- ]?\*{4}[- ]?\d{4}|\*{12}\d{4}|@\*{4}|\*\.\*\.\*\.\d{1,3}"
    r"|(?:\*\*[:-]){5}[0-9A-Fa-f]{2}"
)
_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_MAX_SESSIONS = 4096  # sessions whose markers are remembered (oldest forgotten first)


def is_redacted(message: BaseMessage) -> bool:
    """Whether ``message``'s text carries a ``PIIMiddleware`` placeholder (``[REDACTED_EMAIL]``,
    ``<email_hash:1a2b3c4d>``, ``****-****-****-1234``, ...). The ``mask`` strategy's shape for a
    custom PII type (``****`` + last 4 characters) is not recognised; pass ``forget_if=``.

    >>> from langchain_core.messages import ToolMessage
    >>> is_redacted(ToolMessage("mail [REDACTED_EMAIL] now", tool_call_id="c1"))
    True
    """
    return bool(_REDACTION.search(message.text))


def accounting_of(message: BaseMessage) -> Accounting | None:
    """The Leyline accounting of an ``AIMessage`` answered through :class:`LeylineMiddleware`
    (None for a streamed call, another server, or a message it did not answer).

    >>> acc = accounting_of(AIMessage("hi", response_metadata={"leyline": {"tokens": {"exact": 3}}}))
    >>> acc.exact, acc.exact_kv
    (3, True)
    """
    meta = message.response_metadata
    usage = meta.get("token_usage") or {}
    return Accounting.from_response(
        {"usage": usage, PAYLOAD_KEY: meta.get(PAYLOAD_KEY) or usage.get(PAYLOAD_KEY)}
    )


@dataclass(frozen=True, slots=True)
class _Call:
    """One model call on its way: the request as sent, its session and its redaction marks."""

    request: ModelRequest[Any]
    session: str
    marked: frozenset[str]


class LeylineMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Attach a Leyline server-diff payload to every model call of a LangChain agent.

    ``mode``: how edits of the history are served (AMORTIZE: the tokens after an edit keep
    their KV, rotated; FORGET: they are recomputed). ``forget_if``: a message predicate; a
    request where a message it matches first appears is FORGET (default :func:`is_redacted`).
    ``session_prefix``: the first part of every session id (one per agent when several agents
    share a thread and a node path).

    >>> mw = LeylineMiddleware()
    >>> mw.session_for("thread-1"), mw.last_accounting
    ('lc:thread-1:model', None)
    """

    def __init__(
        self,
        *,
        mode: Mode | str = Mode.AMORTIZE,
        forget_if: Callable[[BaseMessage], bool] = is_redacted,
        session_prefix: str = "lc",
    ) -> None:
        super().__init__()
        self.mode = parse_mode(mode)
        if not _PREFIX.match(session_prefix):
            raise ValueError(
                f"session_prefix must be 1-32 of [A-Za-z0-9._-], got {session_prefix!r}"
            )
        self.forget_if = forget_if
        self.session_prefix = session_prefix
        #: Accounting of the latest non-streamed call that carried one.
        self.last_accounting: Accounting | None = None
        self._marked: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()
        self._warned = False

    def session_for(self, thread_id: str, node: str = "model") -> str:
        """The session id of ``thread_id``'s calls from graph node path ``node``."""
        raw = f"{self.session_prefix}:{thread_id}:{node}"
        if SESSION_ID.match(raw):
            return raw
        return f"{self.session_prefix}-{hashlib.sha256(raw.encode()).hexdigest()[:32]}"

    # -- the hooks ------------------------------------------------------------------------------
    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any]:
        call = self._prepare(request)
        if call is None:
            return handler(request)
        return self._finish(call, handler(call.request))

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any]:
        call = self._prepare(request)
        if call is None:
            return await handler(request)
        return self._finish(call, await handler(call.request))

    # -- one call -------------------------------------------------------------------------------
    def _prepare(self, request: ModelRequest[Any]) -> _Call | None:
        model = request.model
        if not isinstance(model, BaseChatOpenAI):
            if not self._warned:
                self._warned = True
                name = type(model).__name__
                log.warning("LeylineMiddleware: %s is not a ChatOpenAI model; its calls go "
                            "without a Leyline payload", name)  # fmt: skip
            return None
        extra = _merged_extra_body(model.extra_body, request.model_settings.get("extra_body"))
        if carries_payload(extra):
            return None  # the caller's own payload wins
        session = self._session(request)
        if session is None:
            return None
        messages = (
            [request.system_message, *request.messages]
            if request.system_message
            else request.messages
        )
        marked = frozenset(_fingerprint(m) for m in messages if self.forget_if(m))
        with self._lock:
            seen = self._marked.get(session, frozenset())
        mode = Mode.FORGET if marked - seen else self.mode
        settings = {
            **request.model_settings,
            "extra_body": Payload(session, mode=mode).attach(extra),
        }
        return _Call(request.override(model_settings=settings), session, marked)

    def _finish(self, call: _Call, response: ModelResponse[Any]) -> ModelResponse[Any]:
        with self._lock:
            self._marked[call.session] = call.marked
            self._marked.move_to_end(call.session)
            while len(self._marked) > _MAX_SESSIONS:
                self._marked.popitem(last=False)
        result: list[BaseMessage] = []
        for m in response.result:
            usage = m.response_metadata.get("token_usage") if isinstance(m, AIMessage) else None
            raw = usage.get(PAYLOAD_KEY) if isinstance(usage, Mapping) else None
            if isinstance(raw, Mapping) and raw.get("session") == call.session:
                self.last_accounting = Accounting.from_response({"usage": usage, PAYLOAD_KEY: raw})
                meta = {**m.response_metadata, PAYLOAD_KEY: dict(raw)}
                m = m.model_copy(update={"response_metadata": meta})
            result.append(m)  # streamed, or a server without Leyline accounting: as it came
        return replace(response, result=result)

    def _session(self, request: ModelRequest[Any]) -> str | None:
        try:
            config = get_config()
        except RuntimeError:  # called outside a graph (a hand-built ModelRequest)
            config = {}
        configurable = config.get("configurable") or {}
        info = request.runtime.execution_info if request.runtime is not None else None
        thread = configurable.get("thread_id")
        if thread is None and info is not None:
            thread = info.thread_id
        if thread is None:
            first = request.messages[0].id if request.messages else None
            if first is None:
                return None
            thread = f"msg-{first}"
        ns = info.checkpoint_ns if info is not None else str(configurable.get("checkpoint_ns", ""))
        # NOTE: LangGraph namespaces read "node:task_id|node:task_id" (langgraph 1.2); the task
        # ids change every step, the node names do not.
        node = ".".join(part.split(":", 1)[0] for part in ns.split("|") if part) or "model"
        return self.session_for(str(thread), node)


def _merged_extra_body(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``extra_body`` layers merged (later wins), ``custom_params`` merged one level down."""
    out: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        custom = {**(out.get("custom_params") or {}), **(layer.get("custom_params") or {})}
        out.update(layer)
        if custom:
            out["custom_params"] = custom
    return out


def _fingerprint(message: BaseMessage) -> str:
    key = f"{message.type}\0{getattr(message, 'tool_call_id', '')}\0{message.text}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
