"""leyline_model under a real LangGraph ReAct agent and a real ChatOpenAI, against the stub."""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _modules import load_module
from langchain_core.messages import AIMessage, RemoveMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from stub_server import Reply, StubOpenAIServer

import leyline.middleware
from leyline import render_segments
from leyline.errors import MissingExtraError
from leyline.middleware import Redact, TruncateOlderThan, check_valid
from leyline.middleware.langgraph import LeylineChatModel, leyline_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # create_react_agent is deprecated in langgraph 1.x
    from langgraph.prebuilt import create_react_agent


@tool
def read_file(path: str) -> str:
    """Read a file of the project."""
    return "\n".join(f"{path}:{i} " + "w" * (7 + (i * 13) % 53) for i in range(37))


@tool
def run_tests() -> str:
    """Run the test suite."""
    return "Error: 3 failed\n" + "trace line\n" * 25


def _agent(stub: StubOpenAIServer, policy: Any) -> tuple[Any, LeylineChatModel]:
    chat = ChatOpenAI(model="stub-model", base_url=stub.base_url, api_key="stub", max_retries=0)
    with pytest.warns(DeprecationWarning, match="LeylineMiddleware"):
        model = leyline_model(chat, policy=policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = create_react_agent(model, [read_file, run_tests], checkpointer=InMemorySaver())
    return graph, model


def _reads(*paths: str) -> list[Reply]:
    return [Reply(None, (("read_file", {"path": p}),)) for p in paths]


def _cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


def test_react_agent_one_session_per_thread(stub: StubOpenAIServer) -> None:
    policy = TruncateOlderThan(n=1, max_chars=25)
    graph, model = _agent(stub, policy)
    stub.queue(*_reads("a.py", "b.py", "c.py"), Reply("fixed"))
    out = graph.invoke({"messages": [("user", "fix a.py")]}, _cfg("t1"))
    assert out["messages"][-1].content == "fixed"
    stub.queue(*_reads("z.py"), Reply("other"))
    graph.invoke({"messages": [("user", "look at z.py")]}, _cfg("t2"))

    t1, t2 = stub.requests[:4], stub.requests[4:]
    assert len({b["leyline"]["session"] for b in t1}) == 1
    assert len({b["leyline"]["session"] for b in t2}) == 1
    assert t1[0]["leyline"]["session"] != t2[0]["leyline"]["session"]
    assert [b["leyline"]["version"] for b in stub.requests] == [1, 2, 3, 4, 1, 2]
    for body in stub.requests:
        check_valid(body["messages"])
        assert [t["function"]["name"] for t in body["tools"]] == ["read_file", "run_tests"]
        # what was sent is the policy's output (policies are idempotent, so re-applying is a no-op)
        assert body["messages"] == list(policy.apply(body["messages"]).messages)
    # request 3 truncates the first read (older than the last turn): one AMORTIZE directive
    # over the segments of that tool message in request 2
    (directive,) = t1[2]["leyline"]["directives"]
    assert directive["mode"] == "amortize"
    segs = render_segments(t1[1]["messages"], tools=t1[1]["tools"])
    touched = {segs[j].message for j in range(directive["start"], directive["end"])}
    assert touched == {2} and t1[1]["messages"][2]["role"] == "tool"
    assert t1[2]["messages"][2]["content"].endswith(policy.marker)
    # accounting per thread; the raw object rides on the AIMessage
    assert model.totals("t1").requests == 4 and model.totals("t2").requests == 2
    assert model.totals("t1").exact == 10 * (1 + 2 + 3 + 4)
    assert model.last_accounting("t2").recomputed == 7
    assert out["messages"][-1].response_metadata["leyline"]["version"] == 4


def test_remove_message_becomes_a_directive(stub: StubOpenAIServer) -> None:
    graph, _ = _agent(stub, None)
    stub.queue(Reply(None, (("run_tests", {}),)), Reply("tests fail"))
    state = graph.invoke({"messages": [("user", "run the tests")]}, _cfg("t"))
    call, result = state["messages"][1], state["messages"][2]
    assert isinstance(call, AIMessage) and isinstance(result, ToolMessage)
    stub.queue(*_reads("src.py"), Reply("read it"))
    graph.invoke({"messages": [("user", "read src.py")]}, _cfg("t"))
    # the graph drops the failed test run from its own state
    graph.update_state(
        _cfg("t"), {"messages": [RemoveMessage(id=call.id), RemoveMessage(id=result.id)]}
    )
    graph.invoke({"messages": [("user", "summarize")]}, _cfg("t"))
    before, after = stub.requests[3], stub.requests[4]
    roles = ["user", "assistant", "user", "assistant", "tool", "assistant", "user"]
    assert [m["role"] for m in after["messages"]] == roles
    assert after["messages"][1]["content"] == "tests fail"
    check_valid(after["messages"])
    (directive,) = after["leyline"]["directives"]
    assert directive["mode"] == "amortize"
    old = render_segments(before["messages"], tools=before["tools"])
    new = render_segments(after["messages"], tools=after["tools"])
    # base messages 1-2 (call + error) are gone; the answer after them is re-rendered (its
    # template glue names the previous message), everything after it is matched, not re-sent
    assert {old[j].message for j in range(directive["start"], directive["end"])} == {1, 2, 3}
    start, stop = directive["replacement"]
    assert {new[j].message for j in range(start, stop)} == {1}
    assert directive["end"] < len(old)


def test_async_graph_and_forget(stub: StubOpenAIServer) -> None:
    graph, model = _agent(stub, None)
    stub.queue(*_reads("secret.env"), Reply("the key is KEY-123"))

    async def run() -> None:
        await graph.ainvoke({"messages": [("user", "read secret.env")]}, _cfg("a"))
        model.policy = Redact(r"secret\.env:1\d")
        await graph.ainvoke({"messages": [("user", "thanks")]}, _cfg("a"))

    asyncio.run(run())
    last = stub.requests[-1]
    assert last["messages"][2]["content"].count("[REDACTED]") == 10  # lines 10-19 of the read
    assert last["messages"][3]["content"] == "the key is KEY-123"
    assert [d["mode"] for d in last["leyline"]["directives"]] == ["forget"]
    assert model.totals("a").requests == 3


def test_strict_server_fallback(make_stub: Callable[..., StubOpenAIServer]) -> None:
    stub = make_stub(strict=True)
    graph, model = _agent(stub, TruncateOlderThan(n=1, max_chars=10))
    stub.queue(*_reads("a", "b"), Reply("ok"))
    out = graph.invoke({"messages": [("user", "go")]}, _cfg("s1"))
    graph.invoke({"messages": [("user", "again")]}, _cfg("s2"))
    assert out["messages"][-1].content == "ok"
    assert stub.bodies_with_leyline == stub.requests[:1]  # refused once, never sent again
    assert len(stub.requests) == 5 and model.totals("s1").requests == 0
    assert stub.requests[3]["messages"][2]["content"].endswith("[... truncated]")


def test_plain_invoke_without_thread_and_lazy_export(stub: StubOpenAIServer) -> None:
    chat = ChatOpenAI(model="m", base_url=stub.base_url, api_key="x", max_retries=0)
    with pytest.warns(DeprecationWarning, match="LeylineMiddleware"):
        model = leyline.middleware.leyline_model(chat)
    assert model.invoke("hello").content == "ok"
    assert model.totals(None).requests == 1 and stub.requests[0]["leyline"]["version"] == 1
    assert leyline.middleware.LeylineChatModel is LeylineChatModel
    # a thread id in a plain invoke's config selects that thread's session too
    model.invoke("again", config={"configurable": {"thread_id": "q"}})
    assert model.totals("q").requests == 1 and stub.requests[1]["leyline"]["version"] == 1
    assert stub.requests[1]["leyline"]["session"] != stub.requests[0]["leyline"]["session"]
    assert "leyline_thread_id" not in stub.requests[1]


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langchain_openai", None)
    path = Path(leyline.middleware.__file__).with_name("langgraph.py")
    with pytest.raises(MissingExtraError, match=r"leyline\[langgraph\]"):
        load_module(path, "_leyline_langgraph_blocked")
