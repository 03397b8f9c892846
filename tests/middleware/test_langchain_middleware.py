"""LeylineMiddleware under LangChain 1.x ``create_agent`` with a real ChatOpenAI, against the real
embedded engine (`leyline serve` on a tiny model).

The tiny model never calls tools, so tool use is history built here (AI tool calls and tool
messages) that each turn hands to ``create_agent``; the agent's middleware chain and its real
model call run on it. No scripted model anywhere in this file (the example's test uses the
example's own, named one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _engine_server import RunningServer, running_server
from _modules import load_example, load_module
from langchain.agents import create_agent
from langchain.agents.middleware import (
    ClearToolUsesEdit,
    ContextEditingMiddleware,
    PIIMiddleware,
    SummarizationMiddleware,
    wrap_model_call,
)
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph

import leyline.middleware
from leyline import Accounting, Mode
from leyline.errors import MissingExtraError
from leyline.middleware.langchain import LeylineMiddleware, accounting_of, is_redacted
from leyline.protocol import SESSION_ID, Payload, Status


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(model="tiny-llama", kv_tokens=16384) as s:
        yield s


@tool
def read_log(part: int) -> str:
    """Read one part of the log."""
    return _log(part)


def _log(part: int, salt: str = "x", extra: str = "") -> str:
    # `salt` on every line keeps tests apart in the engine's prefix cache and content index
    return extra + "".join(f"{salt} part {part} line {j}: ok\n" for j in range(40))


def _round(i: int, salt: str, output: str | None = None) -> list[AnyMessage]:
    call = {"id": f"c{i}", "name": "read_log", "args": {"part": i}}
    output = output or _log(i, salt)
    return [AIMessage("", tool_calls=[call]), ToolMessage(output, tool_call_id=f"c{i}")]


def _history(rounds: int, salt: str) -> list[AnyMessage]:
    """A user question and ``rounds`` tool calls with their outputs."""
    msgs: list[AnyMessage] = [HumanMessage(f"[{salt}] Inspect the logs.")]
    for i in range(rounds):
        msgs += _round(i, salt)
    return msgs


class Recorder:
    """Request bodies sent to /chat/completions, through httpx's public ``event_hooks``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def _record(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/chat/completions"):
            self.bodies.append(json.loads(request.content))

    async def _arecord(self, request: httpx.Request) -> None:
        self._record(request)

    def clients(self) -> dict[str, Any]:
        return {
            "http_client": httpx.Client(event_hooks={"request": [self._record]}),
            "http_async_client": httpx.AsyncClient(event_hooks={"request": [self._arecord]}),
        }

    def leyline(self, i: int) -> dict[str, Any] | None:
        raw = (self.bodies[i].get("custom_params") or {}).get("leyline")
        return None if raw is None else dict(json.loads(raw))


def _chat(srv: RunningServer, recorder: Recorder | None = None, **kwargs: Any) -> ChatOpenAI:
    clients = recorder.clients() if recorder is not None else {}
    return ChatOpenAI(
        base_url=srv.base_url, api_key="t", model=srv.model, max_tokens=3, temperature=0,
        max_retries=0, **clients, **kwargs,
    )  # fmt: skip


def _thread(name: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


@pytest.mark.parametrize(("call", "salt"), [("invoke", "s"), ("ainvoke", "a")])
def test_context_editing_clears_are_served_by_splicing(
    srv: RunningServer, call: str, salt: str
) -> None:
    mw = LeylineMiddleware()
    edits = ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=800, keep=2)])
    agent = create_agent(_chat(srv), [read_log], middleware=[edits, mw])
    states = [{"messages": _history(rounds, salt)} for rounds in range(1, 6)]
    if call == "invoke":
        outs = [agent.invoke(state, _thread(call)) for state in states]
    else:

        async def turns() -> list[Any]:  # one event loop: the async client is bound to it
            return [await agent.ainvoke(state, _thread(call)) for state in states]

        outs = asyncio.run(turns())
    accounts = [accounting_of(out["messages"][-1]) for out in outs]
    assert all(acc is not None for acc in accounts), outs
    assert accounts[-1] == mw.last_accounting
    # turns 1-3 only append (under the trigger): an exact prefix hit, no edit
    assert [a.directives for a in accounts[:3]] == [(), (), ()]
    assert accounts[1].exact > 0 and accounts[2].exact > accounts[1].exact
    # turns 4-5 clear the oldest outputs: the kept outputs after each clear keep their KV
    for acc in accounts[3:]:
        assert acc.spliced > 0, acc
        assert Status.APPLIED in [d.status for d in acc.directives], acc
    assert srv.engine.session_info(mw.session_for(call))["version"] == 5


def test_summarizer_calls_stay_out_of_the_agent_session(srv: RunningServer) -> None:
    questions = [f"[{{}}] Question {i}: " + f"tell me about topic {i}. " * 25 for i in range(3)]
    questions.append("[{}] Go on.")

    def run(agent: Any, salt: str) -> None:
        for q in questions:
            agent.invoke({"messages": [("user", q.format(salt))]}, _thread(salt))

    # LeylineMiddleware; the summarizer is the agent's own ChatOpenAI (same engine, same client)
    recorder = Recorder()
    chat = _chat(srv, recorder)
    summarize = SummarizationMiddleware(chat, trigger=("messages", 7), keep=("messages", 4))
    mw = LeylineMiddleware()
    run(create_agent(chat, [], middleware=[summarize, mw], checkpointer=InMemorySaver()), "new")
    new = mw.last_accounting
    # the summary request (the 4th) went to the engine without a payload
    assert len(recorder.bodies) == 5
    assert recorder.leyline(3) is None and "Messages to summarize" in str(recorder.bodies[3])
    sessions = {(recorder.leyline(i) or {}).get("session") for i in (0, 1, 2, 4)}
    assert sessions == {mw.session_for("new")}
    assert srv.engine.session_info(mw.session_for("new"))["version"] == 4
    # the agent's call after the summary: the kept messages spliced, little recomputed
    assert new is not None and new.spliced > 0, new
    assert new.recomputed < new.prompt_tokens / 3, new

    # the same run on the deprecated, thread-keyed leyline_model (the symptom): the
    # summary request lands in the agent's session, the next call is diffed against it
    from leyline.middleware.langgraph import leyline_model

    with pytest.warns(DeprecationWarning, match="LeylineMiddleware"):
        old_model = leyline_model(_chat(srv))
    old_summarize = SummarizationMiddleware(
        old_model, trigger=("messages", 7), keep=("messages", 4)
    )
    run(
        create_agent(old_model, [], middleware=[old_summarize], checkpointer=InMemorySaver()), "old"
    )
    old = old_model.last_accounting("old")
    assert old is not None and old_model.totals("old").requests == 5
    assert old.prompt_tokens == new.prompt_tokens
    assert new.recomputed * 3 < old.recomputed, (new, old)


def test_redaction_marker_makes_that_request_forget(srv: RunningServer) -> None:
    # the first tool output carries an e-mail address; a later turn carries it redacted exactly
    # as PIIMiddleware writes it (its own before_model on that output)
    def histories(salt: str) -> list[list[AnyMessage]]:
        leak = _round(0, salt, _log(0, salt, "owner: alice@example.com\n"))
        redacted = PIIMiddleware("email", apply_to_tool_results=True).before_model(
            {"messages": leak},
            None,  # type: ignore[arg-type]
        )
        assert redacted is not None and is_redacted(redacted["messages"][1])
        first = [HumanMessage(f"[{salt}] Inspect the logs."), *leak, *_round(1, salt)]
        second = [first[0], *redacted["messages"], *first[3:], *_round(2, salt)]
        return [first, second, [*second, *_round(3, salt)]]

    results: dict[str, list[Accounting]] = {}
    recorder = Recorder()
    for name, mw in (("q", LeylineMiddleware()),
                     ("z", LeylineMiddleware(forget_if=lambda m: False))):  # fmt: skip
        agent = create_agent(_chat(srv, recorder), [read_log], middleware=[mw])
        results[name] = []
        for messages in histories(name):
            out = agent.invoke({"messages": messages}, _thread(name))
            acc = accounting_of(out["messages"][-1])
            assert acc is not None
            results[name].append(acc)
    modes = [(recorder.leyline(i) or {}).get("mode") for i in range(6)]
    assert modes == ["amortize", "forget", "amortize"] + ["amortize"] * 3
    forget, control = results["q"][1], results["z"][1]
    # the same edit (same sizes): AMORTIZE splices the rest of the history, FORGET recomputes it
    assert forget.prompt_tokens == control.prompt_tokens
    assert control.spliced > 0, control
    assert forget.spliced == 0 and forget.approximate == 0, forget
    assert forget.recomputed >= control.recomputed + control.spliced, (forget, control)


def test_payload_on_the_wire_merges_the_callers_extra_body(srv: RunningServer) -> None:
    recorder = Recorder()
    chat = _chat(
        srv, recorder, extra_body={"custom_params": {"trace": "abc"}, "metadata": {"run": "4"}}
    )

    @wrap_model_call
    def tenant(request: Any, handler: Any) -> Any:  # another middleware's model_settings
        extra = {"custom_params": {"tenant": "t7"}, "user": "x"}
        return handler(request.override(model_settings={"extra_body": extra}))

    mw = LeylineMiddleware()
    agent = create_agent(chat, [], middleware=[tenant, mw])
    thread = "ticket 42 / user 7"  # not a valid session id: hashed
    agent.invoke({"messages": [("user", "Hello there.")]}, _thread(thread))
    session = mw.session_for(thread)
    assert session.startswith("lc-") and SESSION_ID.match(session)
    body = recorder.bodies[-1]
    # fields leyline serve accepts (it refuses unknown ones: docs/security.md)
    assert body["metadata"] == {"run": "4"} and body["user"] == "x" and "leyline" not in body
    assert body["custom_params"]["trace"] == "abc" and body["custom_params"]["tenant"] == "t7"
    assert recorder.leyline(-1) == {"protocol": 1, "session": session, "mode": "amortize",
                                    "content_reuse": True, "approximate": True}  # fmt: skip
    assert Payload.from_request(body) == Payload(session, mode=Mode.AMORTIZE)
    assert srv.engine.session_info(session)["version"] == 1

    # a payload the caller set already wins
    mine = Payload("my-own-session", mode=Mode.FORGET).to_custom_params()
    agent = create_agent(_chat(srv, recorder, extra_body={"custom_params": mine}), [],
                         middleware=[mw])  # fmt: skip
    agent.invoke({"messages": [("user", "Hello again.")]}, _thread(thread))
    assert recorder.leyline(-1) == json.loads(mine["leyline"])


def test_sessions_follow_the_thread_and_the_calling_node(srv: RunningServer) -> None:
    recorder = Recorder()
    mw = LeylineMiddleware()
    planner = create_agent(_chat(srv, recorder), [], middleware=[mw])
    writer = create_agent(_chat(srv, recorder), [], middleware=[mw])
    graph = StateGraph(MessagesState)
    graph.add_node("planner", planner)
    graph.add_node("writer", writer)
    graph.add_edge(START, "planner")
    graph.add_edge("planner", "writer")
    graph.add_edge("writer", END)
    graph.compile().invoke({"messages": [("user", "Plan, then write.")]}, _thread("team"))
    sessions = [(recorder.leyline(i) or {})["session"] for i in range(2)]
    assert sessions == [mw.session_for("team", "planner.model"),
                        mw.session_for("team", "writer.model")]  # fmt: skip
    # no thread id: the conversation's first message names the session
    agent = create_agent(_chat(srv, recorder), [], middleware=[mw])
    out = agent.invoke({"messages": [("user", "No thread here.")]})
    assert (recorder.leyline(-1) or {})["session"] == mw.session_for(f"msg-{out['messages'][0].id}")


def test_streamed_calls_carry_the_payload_and_are_left_alone(srv: RunningServer) -> None:
    recorder = Recorder()
    mw = LeylineMiddleware()
    agent = create_agent(_chat(srv, recorder), [], middleware=[mw], checkpointer=InMemorySaver())
    chunks = [
        msg
        for msg, _ in agent.stream(
            {"messages": [("user", "Stream this.")]}, _thread("stream"), stream_mode="messages"
        )
    ]
    assert any(isinstance(c, AIMessageChunk) and c.content for c in chunks), chunks
    assert recorder.bodies[-1]["stream"] is True
    assert (recorder.leyline(-1) or {})["session"] == mw.session_for("stream")
    assert srv.engine.session_info(mw.session_for("stream"))["version"] == 1
    final = agent.get_state(_thread("stream")).values["messages"][-1]
    assert "leyline" not in final.response_metadata and mw.last_accounting is None


def test_accounting_comes_from_the_usage_langchain_keeps(srv: RunningServer) -> None:
    """The server repeats ``leyline`` under ``usage``; ChatOpenAI keeps usage as ``token_usage``,
    so no HTTP hook is needed, and a plain ChatOpenAI (no http_client given) gets accounting."""
    chat = _chat(srv)
    mw = LeylineMiddleware()
    agent = create_agent(chat, [], middleware=[mw])
    for _ in range(2):
        out = agent.invoke({"messages": [("user", "Count the tokens.")]}, _thread("usage"))
    final = out["messages"][-1]
    acc = accounting_of(final)
    assert acc is not None and acc == mw.last_accounting and acc.exact > 0
    assert final.response_metadata["leyline"] == final.response_metadata["token_usage"]["leyline"]
    assert final.response_metadata["leyline"]["session"] == mw.session_for("usage")


def test_other_models_pass_through(caplog: pytest.LogCaptureFixture) -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage("fine")]))
    mw = LeylineMiddleware()
    with caplog.at_level(logging.WARNING, logger="leyline.middleware"):
        out = create_agent(model, [], middleware=[mw]).invoke({"messages": [("user", "hi")]})
    assert out["messages"][-1].content == "fine" and mw.last_accounting is None
    assert "not a ChatOpenAI model" in caplog.text


def test_pii_middleware_placeholders_are_markers() -> None:
    samples = {"email": "bob@example.com", "credit_card": "4111 1111 1111 1111",
               "ip": "192.168.1.23", "mac_address": "00:1A:2B:3C:4D:5E",
               "url": "https://example.com/private"}  # fmt: skip
    for pii_type, value in samples.items():
        for strategy in ("redact", "mask", "hash"):
            pii = PIIMiddleware(pii_type, strategy=strategy)  # type: ignore[arg-type]
            update = pii.before_model({"messages": [HumanMessage(f"see {value} now")]}, None)  # type: ignore[arg-type]
            assert update is not None, (pii_type, strategy)
            assert is_redacted(update["messages"][0]), update
    assert not is_redacted(HumanMessage("a plain message with **bold** and [links]"))
    with pytest.raises(ValueError, match="mode"):
        LeylineMiddleware(mode="sometimes")
    with pytest.raises(ValueError, match="session_prefix"):
        LeylineMiddleware(session_prefix="a b")


def test_leyline_model_is_deprecated() -> None:
    from leyline.middleware.langgraph import leyline_model

    chat = ChatOpenAI(model="m", base_url="http://127.0.0.1:1/v1", api_key="x")
    with pytest.warns(DeprecationWarning, match="LeylineMiddleware"):
        leyline_model(chat)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langchain.agents.middleware", None)
    path = Path(leyline.middleware.__file__).with_name("langchain.py")
    with pytest.raises(MissingExtraError, match=r"leyline\[langchain\]"):
        load_module(path, "_leyline_langchain_blocked")


def test_example_langchain_agent_prints_applied_directives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = load_example("langchain_agent")
    assert example.main(["--model", "tiny-llama", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    turns = [line for line in out.splitlines() if line.startswith("  turn ")]
    assert len(turns) == 4, out
    assert "applied" not in turns[0] and any("applied" in t for t in turns[2:]), out
    assert "4 accounted requests" in out
