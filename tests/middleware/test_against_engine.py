"""The middleware against the real embedded engine (`leyline serve` on a tiny model): a policy's
edit becomes a directive the engine applies, through the sync and async `openai` clients and a
real LangGraph react agent."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from _engine_server import RunningServer, running_server
from _modules import load_example

import leyline
from leyline.middleware import Redact, TruncateOlderThan


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(model="tiny-llama", kv_tokens=8192) as s:
        yield s


def _tool_turns(n: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Inspect the logs."},
    ]
    for i in range(n):
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": "read_log", "arguments": f'{{"part": {i}}}'}}  # fmt: skip
        msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        msgs.append({"role": "tool", "tool_call_id": f"c{i}",
                     "content": "".join(f"part {i} line {j}: ok\n" for j in range(40))})  # fmt: skip
    return msgs


def test_truncation_policy_is_served_by_splicing(srv: RunningServer) -> None:
    client = leyline.wrap(
        openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0),
        policy=TruncateOlderThan(n=2, max_chars=200),
    )
    history = _tool_turns(2)
    client.chat.completions.create(model=srv.model, messages=history, max_tokens=2)
    first = client.last_accounting
    assert first is not None and first.recomputed > 100
    # two more turns: the oldest tool output falls out of the window and gets truncated
    history = _tool_turns(4)
    client.chat.completions.create(model=srv.model, messages=history, max_tokens=2)
    acc = client.last_accounting
    assert acc is not None
    assert acc.spliced > 0, acc  # the output after the truncated one kept its KV
    assert client.totals.requests == 2


def test_streaming_reads_the_accounting_of_the_final_chunk(srv: RunningServer) -> None:
    client = leyline.wrap(
        openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0),
        policy=TruncateOlderThan(n=1, max_chars=100),
    )
    for turns in (2, 3):
        stream = client.chat.completions.create(
            model=srv.model, messages=_tool_turns(turns), max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        assert isinstance(stream, openai.Stream)
        chunks = list(stream)
        assert chunks[-1].usage is not None
    acc = client.last_accounting
    assert acc is not None and acc.spliced > 0 and not acc.exact_kv, acc
    assert client.session.version == 2 and client.totals.requests == 2
    # the usage details carry how many reused tokens are approximate
    details = chunks[-1].usage.prompt_tokens_details  # type: ignore[union-attr]
    assert (
        details is not None and (details.model_extra or {})["approximate_tokens"] == acc.approximate
    )


def test_async_client_with_forget_policy(srv: RunningServer) -> None:
    async def run() -> leyline.Accounting | None:
        client = leyline.wrap(
            openai.AsyncOpenAI(base_url=srv.base_url, api_key="t", max_retries=0),
            policy=Redact(r"line 3\d"),
        )
        history = [{"role": "system", "content": "agent"}, {"role": "user", "content": "hi"}]
        await client.chat.completions.create(model=srv.model, messages=history, max_tokens=2)
        history += _tool_turns(1)[2:]
        await client.chat.completions.create(model=srv.model, messages=history, max_tokens=2)
        return client.last_accounting

    acc = asyncio.run(run())
    assert acc is not None and acc.spliced == 0  # redaction is FORGET: nothing approximate


def test_langgraph_react_agent_keeps_one_session_per_thread(srv: RunningServer) -> None:
    pytest.importorskip("langgraph")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    from leyline.middleware.langgraph import leyline_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from langgraph.prebuilt import create_react_agent

    @tool
    def read_log(part: int) -> str:
        """Read one part of the log."""
        return f"part {part}: ok"

    model = leyline_model(
        ChatOpenAI(
            base_url=srv.base_url,
            api_key="t",
            model=srv.model,
            max_tokens=3,
            temperature=0,
            max_retries=0,
        )
    )
    with warnings.catch_warnings():  # deprecated in langgraph 1.x, still the documented agent
        warnings.simplefilter("ignore")
        agent = create_react_agent(model, [read_log])
    config = {"configurable": {"thread_id": "t1"}}
    msgs = [("user", "Look at the logs. " * 20)]
    agent.invoke({"messages": msgs}, config)
    agent.invoke({"messages": [*msgs, ("assistant", "ok"), ("user", "And now?")]}, config)
    totals = model.totals("t1")
    assert totals.requests == 2
    last = model.last_accounting("t1")
    assert last is not None and last.exact > 50  # the second turn extended the first's cache


@pytest.mark.parametrize("policy", ["truncate", "drop_failed"])
def test_example_tool_loop_scripted_shows_applied_directives(
    srv: RunningServer, policy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/openai_tool_loop.py --scripted on the engine (tiny-llama never calls tools):
    the SCRIPTED tool calls make the policy edit, and the engine reports the directives applied."""
    example = load_example("openai_tool_loop")
    argv = ["--base-url", srv.base_url, "--model", srv.model, "--scripted", "--policy", policy]
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    applied = [line for line in out.splitlines() if "directives=['applied']" in line]
    assert applied, out
    if policy == "truncate":  # the outputs after the cut one keep their KV: spliced
        assert all("spliced=0 " not in line for line in applied), out
