"""leyline.wrap around the real openai client, against the stub server (tests/middleware)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from stub_server import Reply, StubOpenAIServer

import leyline
from leyline import Accounting, Mode, Session, render_segments
from leyline.middleware import (
    KeepAll,
    Redact,
    TruncateOlderThan,
    WrappedClient,
    check_valid,
    wrap,
)

Msg = dict[str, Any]


def _client(stub: StubOpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=stub.base_url, api_key="stub", max_retries=0)


def _tool_output(rng: random.Random, name: str) -> str:
    return "\n".join(f"{name}:{j} " + "v" * rng.randint(3, 70) for j in range(rng.randint(20, 45)))


def _agent_loop(
    wrapped: WrappedClient[Any], stub: StubOpenAIServer, rounds: int, seed: int = 0
) -> list[Msg]:
    """A plain tool loop: the stub asks for `rounds` tool calls, then answers."""
    rng = random.Random(seed)
    stub.queue(*[Reply(None, (("read", {"i": r}),)) for r in range(rounds)], Reply("all done"))
    history: list[Msg] = [
        {"role": "system", "content": "You are terse.\n" * 5},
        {"role": "user", "content": "Read the files."},
    ]
    while True:
        resp = wrapped.chat.completions.create(model="stub-model", messages=history)
        assert isinstance(resp, openai.types.chat.ChatCompletion)
        msg = resp.choices[0].message
        history.append(msg.model_dump(exclude_none=True))
        if not msg.tool_calls:
            return history
        for call in msg.tool_calls:
            history.append(
                {"role": "tool", "tool_call_id": call.id, "content": _tool_output(rng, call.id)}
            )


def _touched_base_messages(prev_sent: list[Msg], directive: dict[str, Any]) -> set[int]:
    segs = render_segments(prev_sent)
    return {segs[j].message for j in range(directive["start"], directive["end"])}


def test_tool_loop_sends_policy_output_and_amortize_directives(stub: StubOpenAIServer) -> None:
    policy = TruncateOlderThan(n=2, max_chars=30)
    wrapped = wrap(_client(stub), policy=policy)
    history = _agent_loop(wrapped, stub, rounds=5)
    assert len(stub.requests) == 6
    sid = stub.requests[0]["leyline"]["session"]
    for v, body in enumerate(stub.requests, start=1):
        ley = body["leyline"]
        assert (ley["session"], ley["version"]) == (sid, v)
        assert ley["base_version"] == (None if v == 1 else v - 1)
        check_valid(body["messages"])
        # what was sent is exactly the policy's output for the history at that point
        n = len(body["messages"])
        assert body["messages"] == list(policy.apply(history[:n]).messages)
    assert all(not b["leyline"]["directives"] for b in stub.requests[:3])
    # from request 4 on, one more tool output is older than the last two turns and gets cut:
    # one AMORTIZE directive over exactly that message's segments of the base version, whose
    # replacement is the single segment of the truncated text
    for v in range(4, 7):
        prev, body = stub.requests[v - 2], stub.requests[v - 1]
        (edited,) = [i for i, m in enumerate(prev["messages"]) if body["messages"][i] != m]
        assert prev["messages"][edited]["role"] == "tool"
        assert body["messages"][edited]["content"].endswith(policy.marker)
        (directive,) = body["leyline"]["directives"]
        assert directive["mode"] == Mode.AMORTIZE.value
        assert _touched_base_messages(prev["messages"], directive) == {edited}
        assert directive["end"] - directive["start"] >= 2  # the long output had several segments
        start, stop = directive["replacement"]
        new_segments = render_segments(body["messages"])
        assert stop - start == 1 and new_segments[start].message == edited
    last = wrapped.last_accounting
    assert isinstance(last, Accounting)
    assert (last.exact, last.spliced, last.recomputed, last.cached_tokens) == (60, 3, 7, 63)
    assert [d.status for d in last.directives] == ["applied"]
    totals = wrapped.totals
    assert (totals.requests, totals.exact, totals.spliced, totals.recomputed) == (6, 210, 9, 42)
    assert wrapped.session.version == 6


def test_redact_after_the_fact_is_a_forget_directive(stub: StubOpenAIServer) -> None:
    wrapped = wrap(_client(stub))
    history = [
        {"role": "system", "content": "sys " * 40},
        {"role": "user", "content": "my password is hunter2, log in"},
    ]
    wrapped.chat.completions.create(model="m", messages=history)
    history += [{"role": "assistant", "content": "logged in"}, {"role": "user", "content": "next"}]
    wrapped.policy = Redact("hunter2")
    resp = wrapped.chat.completions.create(model="m", messages=history)
    body = stub.requests[-1]
    assert body["messages"][1]["content"] == "my password is [REDACTED], log in"
    (directive,) = body["leyline"]["directives"]
    assert directive["mode"] == "forget"
    assert _touched_base_messages(stub.requests[0]["messages"], directive) == {1}
    assert resp.leyline["directives"][0]["status"] == "applied"  # raw dict passes through
    with pytest.raises(TypeError):
        wrapped.policy = "redact"  # type: ignore[assignment]


def test_user_extra_body_is_merged(stub: StubOpenAIServer) -> None:
    wrapped = wrap(_client(stub), session=Session("fixed-id"))
    wrapped.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"top_k": 3},
        temperature=0.5,
    )
    body = stub.requests[0]
    assert body["top_k"] == 3 and body["temperature"] == 0.5
    assert body["leyline"]["session"] == "fixed-id"


def test_plain_server_still_works(make_stub: Callable[..., StubOpenAIServer]) -> None:
    stub = make_stub(leyline=False)
    wrapped = wrap(_client(stub), policy=TruncateOlderThan(n=1, max_chars=10))
    history = _agent_loop(wrapped, stub, rounds=3, seed=4)
    assert history[-1]["content"] == "all done"
    assert wrapped.last_accounting is None and wrapped.totals.requests == 0
    assert not hasattr(wrapped.chat.completions.create(model="m", messages=history), "leyline")
    # the policy still applied: old tool outputs were cut
    assert stub.requests[-1]["messages"][3]["content"].endswith("[... truncated]")


def test_strict_server_refusal_falls_back_once(make_stub: Callable[..., StubOpenAIServer]) -> None:
    stub = make_stub(strict=True)
    wrapped = wrap(_client(stub), policy=TruncateOlderThan(n=1, max_chars=10))
    history = _agent_loop(wrapped, stub, rounds=3, seed=9)
    # first request: refused with leyline, retried once without; then never sent again
    assert "leyline" in stub.requests[0] and "leyline" not in stub.requests[1]
    assert len(stub.requests) == 5 and stub.bodies_with_leyline == stub.requests[:1]
    assert stub.requests[0]["messages"] == stub.requests[1]["messages"]
    assert not wrapped.leyline_enabled and wrapped.session.version == 0
    assert wrapped.totals.requests == 0
    assert history[-1]["content"] == "all done"
    assert stub.requests[-1]["messages"][3]["content"].endswith("[... truncated]")


def test_refusal_retry_keeps_user_extra_body(make_stub: Callable[..., StubOpenAIServer]) -> None:
    stub = make_stub(strict=True)
    wrapped = wrap(_client(stub))
    wrapped.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 2}
    )
    assert [sorted(b) for b in stub.requests] == [
        ["custom_params", "leyline", "messages", "model", "top_k"],
        ["messages", "model", "top_k"],
    ]


def test_other_errors_raise_and_do_not_commit(stub: StubOpenAIServer) -> None:
    wrapped = wrap(_client(stub))
    msgs = [{"role": "user", "content": "a " * 50}]
    wrapped.chat.completions.create(model="m", messages=msgs)
    stub.queue(Reply(error="maximum context length exceeded"))
    with pytest.raises(openai.BadRequestError, match="context length"):
        wrapped.chat.completions.create(
            model="m", messages=[*msgs, {"role": "user", "content": "b"}]
        )
    assert wrapped.session.version == 1 and wrapped.leyline_enabled
    wrapped.chat.completions.create(model="m", messages=[*msgs, {"role": "user", "content": "c"}])
    assert [b["leyline"]["version"] for b in stub.requests] == [1, 2, 2]
    assert stub.requests[-1]["leyline"]["base_version"] == 1


def test_streaming_keeps_stream_type_and_reads_final_chunk(stub: StubOpenAIServer) -> None:
    wrapped = wrap(_client(stub))
    stub.queue(Reply("streamed words come back"))
    msgs = [{"role": "user", "content": "stream please"}]
    stream = wrapped.chat.completions.create(model="m", messages=msgs, stream=True)
    assert isinstance(stream, openai.Stream)
    assert wrapped.session.version == 1  # accepted as soon as the server answered 200
    assert wrapped.last_accounting is None
    with stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed words come back"
    assert chunks[-1].choices == [] and wrapped.last_accounting is not None
    assert (wrapped.last_accounting.exact, wrapped.last_accounting.recomputed) == (10, 7)
    assert stub.requests[0]["stream"] is True


def test_async_client_and_async_stream(stub: StubOpenAIServer) -> None:
    async def main() -> tuple[list[Msg], WrappedClient[Any], str]:
        async with openai.AsyncOpenAI(base_url=stub.base_url, api_key="s", max_retries=0) as raw:
            wrapped = wrap(raw, policy=TruncateOlderThan(n=1, max_chars=8))
            stub.queue(Reply(None, (("ls", {}),)), Reply(None, (("ls", {}),)), Reply("fin"))
            history: list[Msg] = [{"role": "user", "content": "go"}]
            for _ in range(3):
                resp = await wrapped.chat.completions.create(model="m", messages=history)
                msg = resp.choices[0].message
                history.append(msg.model_dump(exclude_none=True))
                for call in msg.tool_calls or ():
                    history.append({"role": "tool", "tool_call_id": call.id, "content": "z" * 40})
            stream = await wrapped.chat.completions.create(model="m", messages=history, stream=True)
            assert isinstance(stream, openai.AsyncStream)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return history, wrapped, text

    history, wrapped, text = asyncio.run(main())
    assert history[-1]["content"] == "fin" and text == "ok"
    assert wrapped.totals.requests == 4 and wrapped.session.version == 4
    third = stub.requests[2]
    assert third["messages"][2]["content"] == "z" * 8 + "\n[... truncated]"
    assert [d["mode"] for d in third["leyline"]["directives"]] == ["amortize"]


def test_passthrough_and_validation(stub: StubOpenAIServer) -> None:
    raw = _client(stub)
    wrapped = leyline.wrap(raw, policy=KeepAll())
    assert wrapped.unwrapped is raw and wrapped.models is raw.models
    assert wrapped.base_url == raw.base_url
    assert wrapped.chat.completions.with_raw_response is not None
    assert wrapped.policy == KeepAll()
    with pytest.raises(TypeError, match=r"openai\.OpenAI"):
        wrap(object())  # type: ignore[type-var]
    with pytest.raises(TypeError, match="Policy"):
        wrap(raw, policy=json.dumps)  # type: ignore[arg-type]


def _load_example(name: str) -> Any:
    path = Path(__file__).parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_tool_loop_runs(stub: StubOpenAIServer, capsys: pytest.CaptureFixture[str]) -> None:
    example = _load_example("openai_tool_loop")
    stub.queue(
        Reply(None, (("list_files", {}),)),
        Reply(None, (("read_file", {"path": "parser.py"}),)),
        Reply("parser.py"),
        Reply(None, (("read_file", {"path": "tokenizer.py"}),)),
        Reply(None, (("read_file", {"path": "nope.py"}),)),
        Reply("skipped"),
        Reply("a toolkit"),
    )
    assert example.main(["--base-url", stub.base_url, "--model", "stub"]) == 0
    out = capsys.readouterr().out
    assert out.count("  request ") == 7 and "exact=70" in out and "total over 7" in out
    assert "Error: [Errno 2]" in stub.requests[5]["messages"][-1]["content"]
    # by request 5 the first read (parser.py) is older than two turns: truncated, amortized
    assert [d["mode"] for d in stub.requests[4]["leyline"]["directives"]] == ["amortize"]
    assert stub.requests[4]["tools"][1]["function"]["name"] == "read_file"


def test_history_may_hold_openai_message_objects(stub: StubOpenAIServer) -> None:
    """`history.append(resp.choices[0].message)` is the usual idiom: it must work unchanged."""
    wrapped = wrap(_client(stub), policy=TruncateOlderThan(n=1, max_chars=12))
    stub.queue(Reply(None, (("ls", {"d": "."}),)), Reply(None, (("ls", {"d": ".."}),)))
    history: list[Any] = [{"role": "user", "content": "list"}]
    for _ in range(3):
        msg = wrapped.chat.completions.create(model="m", messages=history).choices[0].message
        history.append(msg)  # a ChatCompletionMessage, not a dict
        for call in msg.tool_calls or ():
            history.append({"role": "tool", "tool_call_id": call.id, "content": "entry\n" * 9})
    sent = stub.requests[-1]["messages"]
    check_valid(sent)
    assert sent[1]["tool_calls"][0]["id"] == "call_1_0" and "refusal" not in sent[1]
    assert sent[2]["content"] == ("entry\n" * 9)[:12] + "\n[... truncated]"
    assert [d["mode"] for d in stub.requests[-1]["leyline"]["directives"]] == ["amortize"]
