"""leyline.wrap around the real openai client, against the stub server (tests/middleware)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import openai
import pytest
from _modules import load_example
from stub_server import Reply, StubOpenAIServer

import leyline
from leyline import Accounting, Mode, Session, render_segments
from leyline.middleware import (
    DropFailedToolCalls,
    KeepAll,
    Redact,
    TruncateOlderThan,
    WrappedClient,
    check_valid,
    wrap,
)
from leyline.middleware.policies import (
    DropReasoning,
    FunctionPolicy,
    looks_like_debug_gym_failure,
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
        wrap(raw, policy="truncate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        wrap(raw, default_mode="sometimes")
    assert wrap(raw, default_mode="forget").default_mode is Mode.FORGET


def test_example_tool_loop_runs(stub: StubOpenAIServer, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("openai_tool_loop")
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


# -- default_mode, per-policy modes, plain functions --------------------------------------------
def _modes(body: dict[str, Any]) -> list[str]:
    return [d["mode"] for d in body["leyline"]["directives"]]


def test_default_mode_and_per_policy_modes(stub: StubOpenAIServer) -> None:
    """Truncation unmarked follows `default_mode`; a policy's own mode wins over it."""
    for policy, default, expected in [
        (TruncateOlderThan(n=2, max_chars=30), Mode.AMORTIZE, "amortize"),
        (TruncateOlderThan(n=2, max_chars=30), Mode.FORGET, "forget"),
        (TruncateOlderThan(n=2, max_chars=30, mode=Mode.AMORTIZE), Mode.FORGET, "amortize"),
        (TruncateOlderThan(n=2, max_chars=30, mode=Mode.FORGET), Mode.AMORTIZE, "forget"),
    ]:
        stub.requests.clear()
        wrapped = wrap(_client(stub), policy=policy, default_mode=default)
        assert wrapped.default_mode is default
        _agent_loop(wrapped, stub, rounds=5)
        modes = [m for body in stub.requests for m in _modes(body)]
        assert len(modes) == 3 and set(modes) == {expected}, (policy, default)


def test_plain_function_policy_and_its_deletions(stub: StubOpenAIServer) -> None:
    """A function policy's edits, here pure deletions, get `default_mode`."""

    def last_two_steps(messages: list[Msg]) -> list[Msg]:
        starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        head = messages[:2]
        return head + (messages[starts[-2] :] if len(starts) >= 2 else messages[2:])

    for default in (Mode.AMORTIZE, Mode.FORGET):
        stub.requests.clear()
        wrapped = wrap(_client(stub), policy=last_two_steps, default_mode=default)
        assert isinstance(wrapped.policy, FunctionPolicy)
        history = _agent_loop(wrapped, stub, rounds=4)
        for body in stub.requests:
            n = len(body["messages"])
            check_valid(body["messages"])
            assert n <= 6 and body["messages"][:2] == history[:2]
        assert len(stub.requests[-1]["messages"]) < len(history) - 1
        modes = [m for body in stub.requests for m in _modes(body)]
        assert modes and set(modes) == {default.value}
    wrapped.policy = lambda messages: messages  # the setter takes functions too
    assert isinstance(wrapped.policy, FunctionPolicy)


def _failing_tool_history() -> list[Msg]:
    """SCRIPTED tool calls whose outputs carry debug-gym 1.3.0's failure texts, each retried."""
    failures = {
        "view": "View failed. Error message:\nFailed to read `nope.py`.",
        "edit": "Edit failed. Error message:\nInvalid line number range.\n",
        "bash": "Command failed with output:\nls: cannot access 'x'",
        "pdb": "Failure calling pdb:\nEmpty commands are not allowed.",
    }
    msgs: list[Msg] = [
        {"role": "system", "content": "You are a debugging agent.\n" * 8},
        {"role": "user", "content": "Fix the bug in purr_code.py."},
    ]
    for tool, failure in failures.items():
        for attempt, output in enumerate([failure, f"{tool} ok\n" * 20]):
            cid = f"{tool}_{attempt}"
            call = {"id": cid, "type": "function",
                    "function": {"name": tool, "arguments": '{"path": "purr_code.py"}'}}  # fmt: skip
            msgs.append({"role": "assistant", "content": f"try {tool}", "tool_calls": [call]})
            msgs.append({"role": "tool", "tool_call_id": cid, "name": tool, "content": output})
    return msgs


@pytest.mark.parametrize("mode", [None, Mode.FORGET])
def test_drop_failed_debug_gym_texts_send_fewer_messages_with_directives(
    stub: StubOpenAIServer, mode: Mode | None
) -> None:
    """The policy + `leyline.wrap` path of a debug-gym run: every request sends the history so
    far; once a failed call is retried, it is dropped and the drop is a directive."""
    history = _failing_tool_history()
    policy = DropFailedToolCalls.for_debug_gym(mode=mode)
    wrapped = wrap(_client(stub), policy=policy)
    ends = [i for i in range(3, len(history) + 1) if history[i - 1]["role"] == "tool"]
    for end in ends:
        wrapped.chat.completions.create(model="m", messages=history[:end])
    sent = [body["messages"] for body in stub.requests]
    assert len(sent[-1]) < len(history)
    assert not any(m.get("content", "").startswith("View failed") for m in sent[-1])
    directives = [d for body in stub.requests for d in body["leyline"]["directives"]]
    assert len(directives) == 4  # one per retried failure
    assert {d["mode"] for d in directives} == {(mode or Mode.AMORTIZE).value}
    # each directive removes a failed call and its error from the version before
    for prev, body in zip(stub.requests, stub.requests[1:], strict=False):
        for d in body["leyline"]["directives"]:
            gone = [prev["messages"][b] for b in _touched_base_messages(prev["messages"], d)]
            assert any(looks_like_debug_gym_failure(m["content"]) for m in gone)
    assert wrapped.last_accounting is not None and wrapped.totals.spliced == 3 * 4
    # the generic failure test does not know these texts: nothing dropped, no directive
    stub.requests.clear()
    plain = wrap(_client(stub), policy=DropFailedToolCalls())
    for end in ends:
        plain.chat.completions.create(model="m", messages=history[:end])
    assert stub.requests[-1]["messages"] == history
    assert not any(body["leyline"]["directives"] for body in stub.requests)


def test_drop_reasoning_is_amortized(stub: StubOpenAIServer) -> None:
    wrapped = wrap(_client(stub), policy=DropReasoning(n=1))
    history: list[Msg] = [{"role": "user", "content": "go"}]
    for k in range(3):
        wrapped.chat.completions.create(model="m", messages=history)
        history.append(
            {
                "role": "assistant",
                "content": f"<think>{'consider ' * 40}{k}</think>\nanswer {k}",
                "reasoning_content": "hidden",
            }
        )
        history.append({"role": "user", "content": f"next {k}"})
    wrapped.chat.completions.create(model="m", messages=history)
    last = stub.requests[-1]["messages"]
    assert [m["content"] for m in last if m["role"] == "assistant"] == [
        "answer 0",
        "answer 1",
        history[-2]["content"],
    ]
    assert "reasoning_content" in last[-2] and "reasoning_content" not in last[1]
    assert _modes(stub.requests[2]) == _modes(stub.requests[3]) == ["amortize"]


def test_example_tool_loop_scripted(
    stub: StubOpenAIServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--scripted`: the example's own scripted tool calls, whatever the server answers."""
    example = load_example("openai_tool_loop")
    argv = ["--base-url", stub.base_url, "--model", "stub", "--scripted", "--policy", "drop_failed"]
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "SCRIPTED" in out and out.count("  request ") == 8
    assert all(body["max_tokens"] == 1 for body in stub.requests)
    # the failed read (tokenize.py) is dropped once tokenizer.py was read
    assert [len(b["leyline"]["directives"]) for b in stub.requests] == [0] * 5 + [1, 0, 0]
    (directive,) = stub.requests[5]["leyline"]["directives"]
    gone = _touched_base_messages(stub.requests[4]["messages"], directive)
    assert any("Errno 2" in str(stub.requests[4]["messages"][b]["content"]) for b in gone)
    assert "Errno 2" not in json.dumps(stub.requests[5]["messages"])
    assert "directives=['applied']" in out
