"""LangGraph / LangChain adapter (deprecated): a chat model that puts a policy and Leyline
sessions under an agent.

Deprecated: use :class:`leyline.middleware.langchain.LeylineMiddleware` with
``langchain.agents.create_agent(model, tools, middleware=[..., LeylineMiddleware()])``. It goes
through LangChain's public middleware hooks instead of two private ``ChatOpenAI`` methods, keys
sessions by thread *and* calling node (here a ``SummarizationMiddleware`` whose summarizer is
this model sends its requests into the agent's session, and the agent's next call is diffed
against the summary prompt), and leaves history edits to LangChain's own middleware
(``ContextEditingMiddleware``, ``SummarizationMiddleware``, ``PIIMiddleware``). ``leyline_model``
keeps working and warns with a ``DeprecationWarning``.

Integration point: the chat model. ``leyline_model(ChatOpenAI(...), policy=...)`` returns a
LangChain ``BaseChatModel`` that any LangGraph agent takes where it takes ``ChatOpenAI``::

    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent
    from leyline.middleware import TruncateOlderThan, leyline_model

    agent = create_react_agent(
        leyline_model(ChatOpenAI(model="smollm2", base_url=URL, api_key="x"), TruncateOlderThan()),
        tools, checkpointer=InMemorySaver())

Why the model and not a ``pre_model_hook``: a hook can edit the messages but cannot add
``extra_body`` to the request or read the ``leyline`` accounting of the response; the model sees
both. Per call it lets ``ChatOpenAI`` build its own request payload (so LangChain messages become
OpenAI dicts exactly as ``ChatOpenAI`` would send them, with its tools and parameters), applies
the policy, attaches the session payload, sends it through the same core as :func:`leyline.wrap`
and parses the answer with ``ChatOpenAI`` again.

Sessions: one per LangGraph thread (``config["configurable"]["thread_id"]``, read from the
running graph's config); calls outside a thread share one session. Edits the graph makes to its
own state (``RemoveMessage``, trimmed lists in a ``pre_model_hook``) change what is sent, and
the session's diff turns them into directives like any policy edit.

Accounting: each ``AIMessage`` carries the server's raw ``leyline`` object in
``response_metadata["leyline"]``; :meth:`LeylineChatModel.totals` sums a thread's accounting.

Needs ``pip install 'leyline[langgraph]'`` (langchain-openai, langgraph). Only the Chat
Completions API is supported (not ``ChatOpenAI(use_responses_api=True)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from leyline.errors import MissingExtraError

try:
    from langchain_core.language_models import LanguageModelInput
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import ChatResult
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.config import ensure_config
    from langchain_openai import ChatOpenAI
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised by a test with the import blocked
    raise MissingExtraError("leyline.middleware.langgraph", "langgraph", exc) from exc

from leyline.accounting import Accounting
from leyline.middleware.conversation import Conversation, asend, send
from leyline.middleware.policies import KeepAll, Policy

__all__ = ["LeylineChatModel", "leyline_model", "thread_id_of"]

_THREAD_KWARG = "leyline_thread_id"


def thread_id_of(config: RunnableConfig | None = None) -> str | None:
    """The LangGraph thread id of ``config`` (default: the config of the running graph)."""
    merged = ensure_config(config)  # why: merges the config LangGraph set for the current node
    thread = (merged.get("configurable") or {}).get("thread_id")
    return None if thread is None else str(thread)


def leyline_model(chat_model: ChatOpenAI, policy: Policy | None = None) -> LeylineChatModel:
    """Wrap a ``ChatOpenAI`` so its calls go through ``policy`` and one session per thread id.

    Deprecated: use ``create_agent(model, tools, middleware=[LeylineMiddleware()])``
    (:mod:`leyline.middleware.langchain`); this warns with a ``DeprecationWarning``.

    >>> import warnings
    >>> from langchain_openai import ChatOpenAI
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     m = leyline_model(ChatOpenAI(model="m", base_url="http://127.0.0.1:1/v1", api_key="x"))
    >>> m.totals("thread-1").requests
    0
    """
    warnings.warn(
        "leyline_model is deprecated: use leyline.middleware.langchain.LeylineMiddleware with "
        "langchain.agents.create_agent(model, tools, middleware=[LeylineMiddleware()]) "
        "(pip install 'leyline[langchain]')",
        DeprecationWarning,
        stacklevel=2,
    )
    return LeylineChatModel(chat_model=chat_model, policy=policy or KeepAll())


class LeylineChatModel(BaseChatModel):
    """A LangChain chat model: ``chat_model`` (a ``ChatOpenAI``) behind ``policy`` and Leyline."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    chat_model: ChatOpenAI
    policy: Policy = Field(default_factory=KeepAll)
    _conversations: dict[str | None, Conversation] = PrivateAttr(default_factory=dict)
    _leyline_enabled: bool = PrivateAttr(default=True)

    @property
    def _llm_type(self) -> str:
        return f"leyline-{self.chat_model._llm_type}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**self.chat_model._identifying_params, "leyline_policy": repr(self.policy)}

    # -- per-thread state ---------------------------------------------------------------------
    def conversation(self, thread_id: str | None = None) -> Conversation:
        """The session, policy and accounting of one thread (created on first use)."""
        conv = self._conversations.get(thread_id)
        if conv is None:
            conv = Conversation(self.policy, leyline=self._leyline_enabled)
            self._conversations[thread_id] = conv
        return conv

    def totals(self, thread_id: str | None = None) -> Accounting:
        """Running accounting of one thread (``requests == 0`` before any answer carried one)."""
        conv = self._conversations.get(thread_id)
        return conv.totals if conv is not None else Accounting.zero()

    def last_accounting(self, thread_id: str | None = None) -> Accounting | None:
        """Accounting of the thread's latest response that carried one."""
        conv = self._conversations.get(thread_id)
        return conv.last_accounting if conv is not None else None

    def end_thread(self, thread_id: str | None) -> None:
        """Forget a finished thread's client-side session (its memory is otherwise kept)."""
        self._conversations.pop(thread_id, None)

    # -- LangChain surface --------------------------------------------------------------------
    def bind_tools(
        self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any], **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools exactly as ``ChatOpenAI.bind_tools`` would (same formats and options)."""
        binding = self.chat_model.bind_tools(tools, **kwargs)
        return self.bind(**binding.kwargs)  # type: ignore[attr-defined]

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        # why: BaseChatModel does not hand `config` to _generate; carry the thread id along.
        kwargs.setdefault(_THREAD_KWARG, thread_id_of(config))
        return super().invoke(input, config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        kwargs.setdefault(_THREAD_KWARG, thread_id_of(config))
        return await super().ainvoke(input, config, stop=stop, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        conv, payload = self._payload(messages, stop, kwargs)
        response = send(conv, self.chat_model.root_client.chat.completions.create, payload)
        return self._result(conv, response)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        conv, payload = self._payload(messages, stop, kwargs)
        create = self.chat_model.root_async_client.chat.completions.create
        response = await asend(conv, create, payload)
        return self._result(conv, response)

    def _payload(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Conversation, dict[str, Any]]:
        # NOTE: `_get_request_payload` / `_create_chat_result` are ChatOpenAI's own request and
        # response converters (stable since langchain-openai 0.1); reusing them keeps messages,
        # tools and sampling parameters byte-identical to what ChatOpenAI itself sends.
        thread = kwargs.pop(_THREAD_KWARG, None)
        payload = self.chat_model._get_request_payload(messages, stop=stop, **kwargs)
        if "messages" not in payload:
            raise ValueError(
                "leyline_model supports the Chat Completions API only; "
                "construct ChatOpenAI with use_responses_api=False"
            )
        payload.pop("stream", None)
        payload.pop("stream_options", None)
        conv = self.conversation(thread if thread is not None else thread_id_of())
        conv.policy = self.policy
        return conv, payload

    def _result(self, conv: Conversation, response: Any) -> ChatResult:
        self._leyline_enabled = self._leyline_enabled and conv.leyline_enabled
        result: ChatResult = self.chat_model._create_chat_result(response)
        raw = getattr(response, "leyline", None)
        if raw is not None:
            for generation in result.generations:
                generation.message.response_metadata["leyline"] = raw
        return result
