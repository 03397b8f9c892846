"""OpenAI Agents SDK adapter: a model provider that puts Agents-SDK runs on Leyline sessions.

Integration point: the model provider. ``LeylineModelProvider(base_url=...)`` goes where the SDK
takes any ``ModelProvider``; its models speak Chat Completions (the SDK's own
``OpenAIChatCompletionsModel`` does the item conversion, tools, streaming and usage)::

    from agents import Agent, RunConfig, Runner, SQLiteSession
    from agents.extensions import ToolOutputTrimmer
    from leyline.middleware import LeylineModelProvider, TruncateOlderThan

    provider = LeylineModelProvider(base_url="http://127.0.0.1:8000/v1")
    config = RunConfig(model_provider=provider, call_model_input_filter=ToolOutputTrimmer())
    result = await Runner.run(Agent(name="a", model="smollm2"), "hi",
                              session=SQLiteSession("user-1"), run_config=config)
    print(provider.last_accounting)

Sessions: one Leyline session per prompt-cache group of the runner, i.e. per SDK session
(``session=``), else per ``conversation_id`` or trace ``group_id``, else per ``Runner.run``. The
key is the ``prompt_cache_key`` the runner generates for every model call (or the one you set in
``ModelSettings.extra_args`` / ``extra_body``); a key that is not a valid session id is hashed
exactly as the server hashes a bare ``prompt_cache_key``. Every request carries the server-diff
payload ``{"session": key, "mode": "amortize"}`` in ``custom_params.leyline`` (SGLang drops
``prompt_cache_key``, so the session travels in the payload too); the server diffs the session's
last served tokens against the new prompt and serves each edit in that mode.

Edits: anything that changes an earlier part of the history becomes an edit the server
amortizes. That covers the SDK's own ``call_model_input_filter`` (``ToolOutputTrimmer``) and a
Leyline ``policy``, which this adapter applies to the Chat Completions message list right before
it is sent (after the SDK's filter and item conversion). Why there and not as a
``call_model_input_filter`` over the SDK's items: policies are defined on Chat Completions
messages (turns are assistant messages; one assistant message gathers several
``function_call`` items), which is also what the server tokenizes, so no item <-> message
mapping has to be inverted; and RunConfig's single filter slot stays free for
``ToolOutputTrimmer``.

Modes: the server-diff payload has one mode for all of a request's edits. It is FORGET when
the policy, with a FORGET mark, changes how a message the session's last request carried is
sent (a ``Redact`` newly applied to an old message, a ``mode=Mode.FORGET`` truncation of an old
output), else ``default_mode`` (AMORTIZE unless set). Marks on messages appended this turn or
already served as they are now change nothing, so redacting each new tool output does not make
the session's other edits FORGET.

Accounting: the Leyline server's ``leyline`` response object is read into
:class:`leyline.Accounting`: :attr:`LeylineModelProvider.last_accounting` and ``.totals`` over
every session, :meth:`LeylineModelProvider.conversation` per session. The SDK's ``Usage`` is
untouched. Streamed calls ask for the final usage chunk (which carries the accounting) unless
``ModelSettings.include_usage`` says otherwise.

Cloned clients: the runner (and the SDK model) may call ``client.with_options(...)`` per call,
e.g. to switch off the client's own retries under ``ModelSettings(retry=...)``. No Leyline state
lives on the ``AsyncOpenAI`` object: each model call gets a light proxy of the client that
holds that call's session, and ``with_options`` on it returns a proxy of the clone.

Needs ``pip install 'leyline[agents]'`` (openai-agents).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import openai
from openai import AsyncOpenAI, Omit

from leyline.errors import LeylineError, MissingExtraError

try:
    from agents import (
        AgentOutputSchemaBase,
        Handoff,
        Model,
        ModelProvider,
        ModelResponse,
        ModelRetryAdvice,
        ModelRetryAdviceRequest,
        ModelSettings,
        ModelTracing,
        OpenAIChatCompletionsModel,
        Tool,
        TResponseInputItem,
    )
    from agents.items import TResponseStreamEvent
    from openai.types.responses.response_prompt_param import ResponsePromptParam
except ImportError as exc:  # pragma: no cover - exercised by a test with the import blocked
    raise MissingExtraError("leyline.middleware.openai_agents", "agents", exc) from exc

from leyline._config import Environment
from leyline.accounting import Accounting
from leyline.directives import Mode, parse_mode
from leyline.middleware.conversation import Conversation, Plan, is_leyline_refusal
from leyline.middleware.messages import as_message_dicts
from leyline.middleware.policies import Policy, PolicyLike, PolicyResult, as_policy
from leyline.protocol import Payload, carries_payload, session_key
from leyline.session import Session

__all__ = ["LeylineChatCompletionsModel", "LeylineModelProvider", "session_key_of"]

_CACHE_KEY = "prompt_cache_key"


def session_key_of(model_settings: ModelSettings) -> str | None:
    """The Leyline session id for a model call: its ``prompt_cache_key`` (``extra_args`` first,
    then ``extra_body``, where the runner and users put it), hashed like the server hashes it
    when it is not a valid session id; ``None`` when the call has none.

    >>> session_key_of(ModelSettings(extra_args={"prompt_cache_key": "agents-sdk:run:ab12"}))
    'agents-sdk:run:ab12'
    >>> session_key_of(ModelSettings(extra_body={"prompt_cache_key": "user 7"}))[:4]
    'pck-'
    """
    for extras in (model_settings.extra_args, model_settings.extra_body):
        key = extras.get(_CACHE_KEY) if isinstance(extras, Mapping) else None
        if isinstance(key, str) and key:
            # why: the server's own mapping of prompt_cache_key, so both carriers name one session
            return session_key(key)
    return None


class LeylineModelProvider(ModelProvider):
    """Chat Completions models for a Leyline server, one Leyline session per SDK session.

    ``base_url`` / ``api_key`` default to ``LEYLINE_BASE_URL`` / ``LEYLINE_API_KEY``; or pass
    ``openai_client`` (an ``AsyncOpenAI``). ``policy`` (a
    :class:`~leyline.middleware.Policy` or a plain function ``messages -> messages``; default
    :class:`~leyline.middleware.KeepAll`) edits every request's messages; ``default_mode`` is the
    mode of the edits the server finds when the policy asks for no FORGET (AMORTIZE: the KV after
    an edit is kept, rotated). ``model`` names the model for agents that name none.

    >>> p = LeylineModelProvider(base_url="http://127.0.0.1:8000/v1", model="smollm2")
    >>> (p.get_model(None).model, p.totals.requests, p.last_accounting)
    ('smollm2', 0, None)
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        openai_client: AsyncOpenAI | None = None,
        policy: PolicyLike | None = None,
        default_mode: Mode | str = Mode.AMORTIZE,
        model: str | None = None,
    ) -> None:
        if openai_client is not None and (base_url is not None or api_key is not None):
            raise ValueError("pass either openai_client or base_url/api_key, not both")
        if openai_client is not None and not isinstance(openai_client, AsyncOpenAI):
            raise TypeError(
                f"openai_client must be an openai.AsyncOpenAI, got {type(openai_client).__name__}"
            )
        self.default_mode = parse_mode(default_mode, name="default_mode")
        #: The history policy (a ``Policy`` or a plain function ``messages -> messages``).
        self.policy: Policy = as_policy(policy)
        if openai_client is None:
            env = Environment.read()
            openai_client = AsyncOpenAI(
                base_url=base_url or env.base_url, api_key=api_key or env.api_key
            )
        self.client: AsyncOpenAI = openai_client
        self.model = model
        self._conversations: dict[str, Conversation] = {}
        # per session: how its last accepted request sent each message (see _request_mode)
        self._sent: dict[str, dict[str, str | None]] = {}
        self._latest: str | None = None

    def get_model(self, model_name: str | None) -> LeylineChatCompletionsModel:
        """The model ``model_name`` on this provider's server (``model`` when None)."""
        name = model_name or self.model
        if not name:
            raise ValueError(
                "no model name: give the agent a model (Agent(model=...)) or the provider one "
                "(LeylineModelProvider(model=...))"
            )
        return LeylineChatCompletionsModel(name, self)

    # -- per-session state ----------------------------------------------------------------------
    def conversation(self, session: str) -> Conversation:
        """The policy, flags and accounting of one Leyline session (created on first use).
        The server numbers this session's versions; ``conversation(s).session`` only names it."""
        conv = self._conversations.get(session)
        if conv is None:
            conv = Conversation(
                self.policy, Session(session), leyline=self.leyline_enabled,
                default_mode=self.default_mode,
            )  # fmt: skip
            self._conversations[session] = conv
        return conv

    @property
    def leyline_enabled(self) -> bool:
        """False once the server rejected the payload's carrier (``custom_params``): requests
        then go without it, in every session; the policy still applies."""
        return all(conv.leyline_enabled for conv in self._conversations.values())

    @property
    def sessions(self) -> tuple[str, ...]:
        """The Leyline sessions this provider has sent requests for, oldest first."""
        return tuple(self._conversations)

    @property
    def last_accounting(self) -> Accounting | None:
        """Accounting of the latest model call (any session), ``None`` before one carried it."""
        if self._latest is None:
            return None
        return self._conversations[self._latest].last_accounting

    @property
    def totals(self) -> Accounting:
        """Running sum over every session (``requests`` counts the accounted calls)."""
        total = Accounting.zero()
        for conv in self._conversations.values():
            total = total + conv.totals
        return total

    def _begin(self, session: str) -> Conversation:
        conv = self.conversation(session)
        conv.policy = self.policy  # why: assigning provider.policy takes effect on the next call
        self._latest = session
        return conv


class LeylineChatCompletionsModel(Model):
    """One model of a :class:`LeylineModelProvider`. Each call runs the SDK's own
    ``OpenAIChatCompletionsModel`` over a proxy of the provider's client that carries the call's
    Leyline session (see the module docstring). Usable as ``Agent(model=...)`` too.

    >>> provider = LeylineModelProvider(base_url="http://127.0.0.1:8000/v1")
    >>> model = provider.get_model("smollm2")
    >>> (model.model, model.provider is provider)
    ('smollm2', True)
    """

    def __init__(self, model: str, provider: LeylineModelProvider) -> None:
        self.model = model
        self.provider = provider

    def _supports_default_prompt_cache_key(self) -> bool:
        # NOTE: private hook of openai-agents 0.24.0 (agents/run_internal/prompt_cache_key.py):
        # the runner generates a prompt_cache_key per SDK session only for models that answer
        # True, and OpenAIChatCompletionsModel answers True only for api.openai.com. That key is
        # the Leyline session; tests/middleware/test_openai_agents.py fails if the hook moves.
        return True

    def _for_call(self, model_settings: ModelSettings) -> OpenAIChatCompletionsModel:
        session = session_key_of(model_settings)
        if session is None:
            raise LeylineError(
                "this model call has no prompt_cache_key to name its Leyline session: the "
                "Agents SDK runner sets one per SDK session; outside the runner pass "
                "ModelSettings(extra_args={'prompt_cache_key': ...})"
            )
        call = _Call(self.provider, session)
        return OpenAIChatCompletionsModel(
            self.model, cast(AsyncOpenAI, _CallClient(self.provider.client, call))
        )

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: ResponsePromptParam | None = None,
    ) -> ModelResponse:
        return await self._for_call(model_settings).get_response(
            system_instructions, input, model_settings, tools, output_schema, handoffs, tracing,
            previous_response_id=previous_response_id, conversation_id=conversation_id,
            prompt=prompt,
        )  # fmt: skip

    def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: ResponsePromptParam | None = None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        return self._for_call(model_settings).stream_response(
            system_instructions, input, model_settings, tools, output_schema, handoffs, tracing,
            previous_response_id=previous_response_id, conversation_id=conversation_id,
            prompt=prompt,
        )  # fmt: skip

    def get_retry_advice(self, request: ModelRetryAdviceRequest) -> ModelRetryAdvice | None:
        return OpenAIChatCompletionsModel(self.model, self.provider.client).get_retry_advice(
            request
        )


@dataclass(frozen=True, slots=True)
class _Call:
    """One model call: the provider and the Leyline session the call belongs to."""

    provider: LeylineModelProvider
    session: str

    async def send(self, create: Callable[..., Awaitable[Any]], kwargs: dict[str, Any]) -> Any:
        """``chat.completions.create`` with the policy applied and the server-diff payload."""
        if "messages" not in kwargs:
            raise TypeError("chat.completions.create() needs messages=")
        conv = self.provider._begin(self.session)
        history = as_message_dicts(kwargs["messages"])
        result = conv.policy.apply(history)
        sent = dict(kwargs, messages=list(result.messages))
        if sent.get("stream") is True and _unset(sent.get("stream_options")):
            sent["stream_options"] = {"include_usage": True}  # the final chunk has the accounting
        user_extra = kwargs.get("extra_body")
        ours = conv.leyline_enabled and not carries_payload(user_extra)  # the caller's payload wins
        if ours:
            previous = self.provider._sent.get(self.session, {})
            mode = _request_mode(history, result, previous, conv.default_mode)
            sent["extra_body"] = Payload(self.session, mode=mode).attach(
                user_extra if isinstance(user_extra, Mapping) else None
            )
        plan = Plan(sent, None, user_extra)
        try:
            response = await create(**sent)
        except openai.BadRequestError as exc:
            if not ours or not is_leyline_refusal(exc):
                raise
            conv.refused(exc)
            response = await create(**plan.without_leyline())
        self.provider._sent[self.session] = _forms(history, result)
        return conv.finish(plan, response)


def _request_mode(
    history: Sequence[Mapping[str, Any]],
    result: PolicyResult,
    previous: Mapping[str, str | None],
    default: Mode,
) -> Mode:
    """The one mode of a server-diff request: FORGET when the policy changes, with a FORGET
    mark, how a message of ``history`` that the session's last request already carried is sent
    (edited differently, or removed); else ``default``. ``previous`` is :func:`_forms` of the
    last request. Marks on new messages (appended this turn) or on edits already served change
    nothing, so one redaction does not make the rest of the session FORGET.

    >>> from leyline.middleware import Redact
    >>> old = [{"role": "user", "content": "a secret"}]
    >>> new = [*old, {"role": "user", "content": "another secret"}]
    >>> keep, redact = Redact("nothing"), Redact("secret")
    >>> _request_mode(new, redact.apply(new), _forms(old, keep.apply(old)), Mode.AMORTIZE).value
    'forget'
    >>> _request_mode(new, redact.apply(new), _forms(old, redact.apply(old)), Mode.AMORTIZE).value
    'amortize'
    """
    for i in result.forget:
        source = _fingerprint(history[result.sources[i]])
        if source in previous and previous[source] != _fingerprint(result.messages[i]):
            return Mode.FORGET
    for message, mode in result.dropped:
        if mode is Mode.FORGET and previous.get(_fingerprint(message)) is not None:
            return Mode.FORGET
    return default


def _forms(history: Sequence[Mapping[str, Any]], result: PolicyResult) -> dict[str, str | None]:
    """How each message of ``history`` was sent: its fingerprint to the fingerprint of what the
    policy made of it (``None``: removed)."""
    forms: dict[str, str | None] = {_fingerprint(m): None for m, _ in result.dropped}
    for i, message in enumerate(result.messages):
        forms[_fingerprint(history[result.sources[i]])] = _fingerprint(message)
    return forms


def _fingerprint(message: Mapping[str, Any]) -> str:
    return json.dumps(message, sort_keys=True, default=str)


class _CallClient:
    """An ``AsyncOpenAI`` as one model call sees it: ``chat.completions.create`` goes through
    the call's :class:`_Call`; ``with_options``/``copy`` keep the call on the clone; everything
    else is the real client's."""

    def __init__(self, client: AsyncOpenAI, call: _Call) -> None:
        self._client = client
        self._call = call

    def with_options(self, **options: Any) -> _CallClient:
        return _CallClient(self._client.with_options(**options), self._call)

    copy = with_options

    @property
    def chat(self) -> _Chat:
        return _Chat(self._client.chat, self._call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Chat:
    def __init__(self, chat: Any, call: _Call) -> None:
        self._chat = chat
        self._call = call

    @property
    def completions(self) -> _Completions:
        return _Completions(self._chat.completions, self._call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chat, name)


class _Completions:
    def __init__(self, completions: Any, call: _Call) -> None:
        self._completions = completions
        self._call = call

    async def create(self, **kwargs: Any) -> Any:
        return await self._call.send(self._completions.create, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)


def _unset(value: Any) -> bool:
    return value is None or isinstance(value, Omit)
