"""The OpenAI Agents SDK adapter with the real SDK (`Runner`, `SQLiteSession`,
`ToolOutputTrimmer`) against the real embedded engine on a tiny model.

The tiny model never calls tools, so no model here is scripted: every model call goes to the
engine, and the runner gets histories that already hold tool calls and their outputs (one more
call/output pair per turn), as an agent's history looks after its tool rounds. Two exceptions,
named: `test_the_request_on_the_wire` reads request bodies from the STUB server (the body SGLang
would get; a strict server that rejects the payload), and the example's tool *decisions* come
from its `ScriptedToolCalls` (its answers from the engine)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from _engine_server import RunningServer, running_server
from _modules import load_example, load_module
from agents import (
    Agent,
    ModelRetrySettings,
    ModelSettings,
    ModelTracing,
    RunConfig,
    Runner,
    RunResult,
    SQLiteSession,
    TResponseInputItem,
)
from agents.extensions import ToolOutputTrimmer
from stub_server import StubOpenAIServer

import leyline.middleware
from leyline import Accounting, Status
from leyline.errors import LeylineError, MissingExtraError
from leyline.middleware import Policy, Redact, TruncateOlderThan
from leyline.middleware.openai_agents import LeylineModelProvider

SDK_SESSION_KEY = "agents-sdk:session:"  # how openai-agents 0.24 names a session's cache key


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(model="tiny-llama", kv_tokens=16384) as s:
        yield s


def _turn(i: int) -> list[TResponseInputItem]:
    """One turn's new items: the user's request, the agent's tool call and the tool's output.
    Each test reads its own parts, so no test gets exact hits from another's cached prompts."""
    output = "".join(f"part {i} line {j}: ok\n" for j in range(40))
    return [
        {"role": "user", "content": f"Read part {i} of the log."},
        {"type": "function_call", "call_id": f"c{i}", "name": "read_log",
         "arguments": json.dumps({"part": i})},
        {"type": "function_call_output", "call_id": f"c{i}", "output": output},
    ]  # fmt: skip


def _agent(srv: RunningServer, **settings: Any) -> Agent[Any]:
    return Agent(
        name="log-reader",
        instructions="You read logs.",
        model=srv.model,
        model_settings=ModelSettings(max_tokens=4, temperature=0, **settings),
    )


async def _run(
    agent: Agent[Any], items: list[TResponseInputItem], config: RunConfig, **kw: Any
) -> RunResult:
    return await Runner.run(agent, input=items, run_config=config, **kw)


def _three_turns(agent: Agent[Any], first: int, config: RunConfig, session: SQLiteSession) -> None:
    """Turns ``first``, ``first + 1``, ``first + 2`` of one SDK session, in one event loop."""

    async def turns() -> None:
        for i in range(3):
            await _run(agent, _turn(first + i), config, session=session)

    asyncio.run(turns())


def _applied(acc: Accounting | None) -> bool:
    return acc is not None and any(d.status is Status.APPLIED for d in acc.directives)


# NOTE: each test runs its turns in one asyncio.run: a provider's AsyncOpenAI keeps connections
# bound to the event loop that opened them, as in an application with one loop.


def test_one_leyline_session_per_sdk_session_and_trimmer_edits_are_spliced(
    srv: RunningServer,
) -> None:
    provider = LeylineModelProvider(base_url=srv.base_url, api_key="t")
    trimmer = ToolOutputTrimmer(recent_turns=2, max_output_chars=300, preview_chars=60)
    config = RunConfig(model_provider=provider, call_model_input_filter=trimmer,
                       tracing_disabled=True)  # fmt: skip
    agent = _agent(srv)
    alice, bob = SQLiteSession("alice"), SQLiteSession("bob")
    accounting: list[Accounting | None] = []
    versions: list[int] = []

    async def turns() -> RunResult:
        for i in range(3):
            result = await _run(agent, _turn(i), config, session=alice)
            versions.append(srv.engine.session_info(provider.sessions[0])["version"])
            accounting.append(provider.last_accounting)
            if i == 0:  # another SDK session in between: its own Leyline session
                await _run(agent, _turn(50), config, session=bob)
        return result

    result = asyncio.run(turns())
    assert versions == [1, 2, 3]  # one request per run, all in alice's Leyline session
    assert len(provider.sessions) == 2 and provider.sessions[0] != provider.sessions[1]
    assert all(s.startswith(SDK_SESSION_KEY) for s in provider.sessions)  # the runner's key
    assert srv.engine.session_info(provider.sessions[1])["version"] == 1

    first, second, third = accounting
    assert first is not None and first.exact == 0 and not first.directives
    # turn 2 extends turn 1: its prompt is an exact hit, nothing trimmed yet (two user messages)
    assert second is not None and second.exact > 400 and not second.directives, second
    # turn 3: the trimmer shortens turn 1's output; the turns after it keep their KV (spliced)
    assert third is not None and _applied(third) and third.spliced > 400, third
    assert provider.conversation(provider.sessions[0]).totals.requests == 3
    assert provider.totals.requests == 4
    # the SDK's own usage is the server's usage, untouched
    usage = result.context_wrapper.usage
    assert usage.input_tokens == third.prompt_tokens
    assert usage.input_tokens_details.cached_tokens == third.cached_tokens


class _CountingClient(openai.AsyncOpenAI):
    """The real client, counting its clones (``with_options`` is ``copy``)."""

    clones = 0

    def copy(self, **options: Any) -> Any:
        type(self).clones += 1
        return super().copy(**options)

    with_options = copy


def test_policy_edits_are_spliced_through_cloned_clients(srv: RunningServer) -> None:
    client = _CountingClient(base_url=srv.base_url, api_key="t", max_retries=2)
    provider = LeylineModelProvider(
        openai_client=client, policy=TruncateOlderThan(n=3, max_chars=100)
    )
    config = RunConfig(model_provider=provider, tracing_disabled=True)
    # runner-managed retries: the SDK model calls client.with_options(max_retries=0) per call
    agent = _agent(srv, retry=ModelRetrySettings(max_retries=0))
    _three_turns(agent, 10, config, SQLiteSession("clones"))
    assert _CountingClient.clones >= 3
    (key,) = provider.sessions
    assert srv.engine.session_info(key)["version"] == 3
    acc = provider.last_accounting
    # turn 3 holds 5 assistant messages: the policy truncates turn 1's output
    assert _applied(acc) and acc is not None and acc.spliced > 300, acc


def test_streamed_runs_apply_trimmer_and_policy_together(srv: RunningServer) -> None:
    trimmer = ToolOutputTrimmer(recent_turns=2, max_output_chars=300, preview_chars=60)
    agent = _agent(srv)

    async def third_turn(policy: TruncateOlderThan | None) -> Accounting | None:
        provider = LeylineModelProvider(base_url=srv.base_url, api_key="t", policy=policy)
        config = RunConfig(model_provider=provider, call_model_input_filter=trimmer,
                           tracing_disabled=True)  # fmt: skip
        session = SQLiteSession("streamed")
        for i in range(3):
            run = Runner.run_streamed(
                agent, input=_turn(20 + i), run_config=config, session=session
            )
            async for _ in run.stream_events():
                pass
        return provider.last_accounting

    trimmed = asyncio.run(third_turn(None))
    both = asyncio.run(third_turn(TruncateOlderThan(n=1, max_chars=50)))
    # the accounting comes from the streams' final chunks
    assert _applied(trimmed) and _applied(both), (trimmed, both)
    assert trimmed is not None and both is not None
    # the policy also cut turn 2's output (the trimmer keeps it: two user messages back)
    assert both.prompt_tokens < trimmed.prompt_tokens - 200, (both, trimmed)


def test_forget_policy_edits_are_recomputed(srv: RunningServer) -> None:
    policy = TruncateOlderThan(n=3, max_chars=100, forget=True)
    provider = LeylineModelProvider(base_url=srv.base_url, api_key="t", policy=policy)
    config = RunConfig(model_provider=provider, tracing_disabled=True)
    _three_turns(_agent(srv), 30, config, SQLiteSession("forget"))
    acc = provider.last_accounting
    # the same edit as in the AMORTIZE test, sent as FORGET: the prefix before it is an exact
    # hit, everything after it is recomputed, nothing approximate is served
    assert _applied(acc) and acc is not None, acc
    assert acc.exact > 0 and acc.spliced == 0 and acc.exact_kv and acc.recomputed > 400, acc


def test_redacting_new_outputs_leaves_later_edits_amortized(srv: RunningServer) -> None:
    # every turn's new tool output has a redaction (FORGET marks on appended messages); the
    # trimmer's edit of turn 1's output is still served AMORTIZE: no marked message changed
    trimmer = ToolOutputTrimmer(recent_turns=2, max_output_chars=300, preview_chars=60)
    provider = LeylineModelProvider(base_url=srv.base_url, api_key="t", policy=Redact(r"line 3\d"))
    config = RunConfig(model_provider=provider, call_model_input_filter=trimmer,
                       tracing_disabled=True)  # fmt: skip
    _three_turns(_agent(srv), 60, config, SQLiteSession("redacted"))
    acc = provider.last_accounting
    assert _applied(acc) and acc is not None and acc.spliced > 300, acc


def test_session_keys_without_sdk_sessions_and_user_keys(srv: RunningServer) -> None:
    provider = LeylineModelProvider(base_url=srv.base_url, api_key="t")
    agent = _agent(srv)
    plain = RunConfig(model_provider=provider, tracing_disabled=True)
    grouped = RunConfig(model_provider=provider, tracing_disabled=True, group_id="thread-9")
    user_key = "ticket 42 / user 7"  # not a valid session id
    keyed = _agent(srv, extra_args={"prompt_cache_key": user_key})

    async def runs() -> None:
        await _run(agent, _turn(40), plain)
        await _run(agent, _turn(40), plain)
        await _run(agent, _turn(40), grouped)
        await _run(agent, _turn(40) + _turn(41), grouped)
        await _run(keyed, _turn(40), plain)

    asyncio.run(runs())
    assert len(provider.sessions) == 4
    # no SDK session: one Leyline session per run; a trace group joins its runs
    assert srv.engine.session_info(provider.sessions[0])["version"] == 1
    assert srv.engine.session_info(provider.sessions[1])["version"] == 1
    assert srv.engine.session_info(provider.sessions[2])["version"] == 2
    # the user's key is hashed as the server hashes a bare prompt_cache_key: the same session
    key = provider.sessions[3]
    assert key.startswith("pck-")
    bare = openai.OpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
    bare.chat.completions.create(
        model=srv.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
        prompt_cache_key=user_key,
    )  # fmt: skip
    assert srv.engine.session_info(key)["version"] == 2


def test_the_request_on_the_wire(make_stub: Callable[..., StubOpenAIServer]) -> None:
    """Against the STUB server (it records bodies): what SGLang would be sent, and a strict
    server that rejects the payload's carrier."""
    stub = make_stub()
    provider = LeylineModelProvider(
        base_url=stub.base_url, api_key="t", policy=TruncateOlderThan(n=1, max_chars=10)
    )
    config = RunConfig(model_provider=provider, tracing_disabled=True)
    agent = Agent(name="a", model="stub-model",
                  model_settings=ModelSettings(extra_body={"custom_params": {"trace": "t1"}}))  # fmt: skip
    session = SQLiteSession("wire")

    async def runs() -> None:
        await _run(agent, _turn(0) + _turn(1), config, session=session)
        streamed = Runner.run_streamed(agent, input="and?", run_config=config, session=session)
        async for _ in streamed.stream_events():
            pass

    asyncio.run(runs())
    plain, streamed = stub.raw_requests
    key = plain["prompt_cache_key"]
    assert key.startswith(SDK_SESSION_KEY) and provider.sessions == (key,)
    for body in (plain, streamed):
        # the server-diff payload, with the session in it (SGLang drops prompt_cache_key),
        # next to the caller's own custom_params
        assert body["custom_params"]["trace"] == "t1"
        assert json.loads(body["custom_params"]["leyline"]) == {
            "protocol": 1, "session": key, "mode": "amortize",
            "content_reuse": True, "approximate": True,
        }  # fmt: skip
    # the policy ran on the Chat Completions messages: turn 1's tool output is truncated
    tools = [m["content"] for m in plain["messages"] if m["role"] == "tool"]
    assert tools[0].endswith("[... truncated]") and len(tools[1]) > 500
    assert "stream_options" not in plain
    assert streamed["stream_options"] == {"include_usage": True}  # the accounting's chunk
    assert provider.totals.requests == 2  # the streamed accounting was read too

    strict = make_stub(strict=True)
    provider = LeylineModelProvider(base_url=strict.base_url, api_key="t")
    config = RunConfig(model_provider=provider, tracing_disabled=True)

    async def strict_runs() -> None:
        for _ in range(2):
            await _run(Agent(name="a", model="stub-model"), _turn(0), config)

    asyncio.run(strict_runs())  # retried once without the payload, then never sent again
    assert ["custom_params" in r for r in strict.raw_requests] == [True, False, False]
    assert not provider.leyline_enabled and provider.last_accounting is None


def test_errors_name_the_fix_and_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = LeylineModelProvider(base_url="http://127.0.0.1:1/v1", model="m")
    model = provider.get_model(None)
    assert model.model == "m"
    # outside the runner a call needs a key to name its session (raised before any I/O)
    call = model.get_response(None, "hi", ModelSettings(), [], None, [], ModelTracing.DISABLED)
    with pytest.raises(LeylineError, match="prompt_cache_key"):
        asyncio.run(call)
    assert provider.sessions == ()
    with pytest.raises(ValueError, match="no model name"):
        LeylineModelProvider(base_url="http://127.0.0.1:1/v1").get_model(None)
    # a plain function is a policy too; anything else is refused up front
    function = LeylineModelProvider(base_url="http://127.0.0.1:1/v1", policy=lambda m: m[-5:])
    assert isinstance(function.policy, Policy)
    with pytest.raises(TypeError, match="policy must be"):
        LeylineModelProvider(base_url="http://127.0.0.1:1/v1", policy="truncate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="default_mode"):
        LeylineModelProvider(base_url="http://127.0.0.1:1/v1", default_mode="sometimes")
    monkeypatch.setitem(sys.modules, "agents", None)
    path = Path(leyline.middleware.__file__).with_name("openai_agents.py")
    with pytest.raises(MissingExtraError, match=r"leyline\[agents\]"):
        load_module(path, "_leyline_agents_blocked")


def test_example_openai_agents_loop_runs(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("openai_agents_loop")
    assert example.main(["--model", "tiny-llama", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    turns = [line for line in out.splitlines() if line.startswith("  turn ")]
    assert len(turns) == 4, out
    assert "applied" not in turns[0] and "applied" in turns[2], out  # turn 1's read trimmed
    assert "4 accounted requests" in out
