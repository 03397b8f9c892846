"""History policies: exact edits, validity, determinism and idempotence on random trajectories."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from leyline import Mode, Session
from leyline.middleware import (
    Compose,
    DropFailedToolCalls,
    KeepAll,
    LastNObservations,
    Policy,
    PolicyResult,
    Redact,
    TruncateOlderThan,
    check_valid,
    looks_like_error,
    orphan_tool_messages,
    turn_of,
)
from leyline.middleware.policies import (
    POLICY_NAMES,
    DropReasoning,
    FunctionPolicy,
    as_policy,
    looks_like_debug_gym_failure,
    named_policy,
)

Msg = dict[str, Any]


def _call(cid: str, name: str, **args: Any) -> Msg:
    return {
        "id": cid,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


def _trajectory(seed: int, turns: int = 7) -> list[Msg]:
    """System + task, then `turns` assistant turns with 1-3 parallel calls and odd-sized outputs."""
    rng = random.Random(seed)
    msgs: list[Msg] = [
        {"role": "system", "content": "You fix bugs.\n" * rng.randint(3, 9)},
        {"role": "user", "content": "Fix test_parse in repo/ (" + "x" * rng.randint(5, 50) + ")"},
    ]
    for t in range(turns):
        calls = [
            _call(f"c{t}_{k}", rng.choice(["ls", "cat", "pytest"]), path=f"f{k}.py")
            for k in range(rng.randint(1, 3))
        ]
        msgs.append(
            {
                "role": "assistant",
                "content": None if rng.random() < 0.5 else f"step {t}",
                "tool_calls": calls,
            }
        )
        for c in calls:
            body = "\n".join(
                f"line {j} " + "y" * rng.randint(0, 40) for j in range(rng.randint(1, 40))
            )
            if rng.random() < 0.3:
                body = "Error: " + body
            msgs.append({"role": "tool", "tool_call_id": c["id"], "content": body})
        if rng.random() < 0.3:
            msgs.append({"role": "user", "content": f"hint {t}"})
    msgs.append({"role": "assistant", "content": "done"})
    return msgs


def _prefixes(msgs: list[Msg]) -> list[list[Msg]]:
    """The histories an agent sends: every prefix ending just before an assistant message."""
    return [
        msgs[:i]
        for i in range(1, len(msgs) + 1)
        if i == len(msgs) or msgs[i]["role"] == "assistant"
    ]


ALL = [
    KeepAll(),
    TruncateOlderThan(),
    TruncateOlderThan(n=1, max_chars=37),
    DropFailedToolCalls(),
    DropFailedToolCalls(same_tool=False),
    LastNObservations(n=3),
    Redact(r"line 1\d"),
    DropFailedToolCalls() | TruncateOlderThan(n=2, max_chars=50) | Redact(r"y{30,}"),
    DropFailedToolCalls.for_debug_gym(mode=Mode.FORGET) | DropReasoning(n=0),
]


@pytest.mark.parametrize("policy", ALL, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("seed", [1, 7, 23])
def test_valid_idempotent_pure(policy: Any, seed: int) -> None:
    msgs = _trajectory(seed)
    snapshot = json.dumps(msgs)
    for hist in _prefixes(msgs):
        check_valid(hist)
        out = policy.apply(hist)
        check_valid(out.messages)
        again = policy.apply(list(out.messages))
        assert again.messages == out.messages, "not idempotent"
        assert policy.apply(hist) == out, "not deterministic"
        assert all(
            hist[src].get("role") == m.get("role")
            for src, m in zip(out.sources, out.messages, strict=True)
        )
        # tool call ids of kept messages are the originals
        for src, m in zip(out.sources, out.messages, strict=True):
            if m.get("role") == "tool":
                assert m["tool_call_id"] == hist[src]["tool_call_id"]
    assert json.dumps(msgs) == snapshot, "policy mutated its input"


@pytest.mark.parametrize(
    "policy",
    [
        TruncateOlderThan(),
        TruncateOlderThan(n=1, max_chars=37),
        LastNObservations(n=3),
        Redact("y{9}"),
    ],
    ids=lambda p: type(p).__name__,
)
def test_edits_are_stable_as_history_grows(policy: Any) -> None:
    """An edited message must come out byte-identical on every later request (cache stability)."""
    hists = _prefixes(_trajectory(5, turns=9))
    first_seen: dict[int, Msg] = {}
    for hist in hists:
        out = policy.apply(hist)
        for src, m in zip(out.sources, out.messages, strict=True):
            if m != hist[src]:
                assert first_seen.setdefault(src, m) == m, f"message {src} re-edited differently"


def test_truncate_older_than_exact_rule() -> None:
    msgs = _trajectory(11, turns=6)
    policy = TruncateOlderThan(n=2, max_chars=53)
    out = policy.apply(msgs)
    turns = turn_of(msgs)
    n_turns = max(turns) + 1
    assert out.forget == frozenset() and out.sources == tuple(range(len(msgs)))
    changed = 0
    for i, (before, after) in enumerate(zip(msgs, out.messages, strict=True)):
        old_tool = before["role"] == "tool" and turns[i] < n_turns - 2
        if old_tool and len(before["content"]) > 53:
            assert after["content"] == before["content"][:53] + policy.marker
            changed += 1
        else:
            assert after == before
    assert changed >= 3
    # the last two turns (the final assistant message is one of them) keep their outputs
    assert all(m == msgs[i] for i, m in enumerate(out.messages) if turns[i] >= n_turns - 2)


def test_truncate_content_parts_and_forget_flag() -> None:
    msgs = [
        {"role": "assistant", "tool_calls": [_call("a", "cat")]},
        {
            "role": "tool",
            "tool_call_id": "a",
            "content": [{"type": "text", "text": "p" * 31}, {"type": "text", "text": "q" * 3}],
        },
        {"role": "assistant", "content": "x"},
    ]
    out = TruncateOlderThan(n=1, max_chars=5, marker="~", forget=True).apply(msgs)
    assert out.messages[1]["content"] == [
        {"type": "text", "text": "ppppp~"},
        {"type": "text", "text": "qqq"},
    ]
    assert out.forget == {1}
    assert msgs[1]["content"][0]["text"] == "p" * 31


def test_drop_failed_tool_calls() -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [_call("a", "cat", p=1), _call("b", "ls")],
        },
        {"role": "tool", "tool_call_id": "a", "content": "Error: no such file"},
        {"role": "tool", "tool_call_id": "b", "content": "f.py"},
        {"role": "assistant", "content": "retry", "tool_calls": [_call("c", "cat", p=2)]},
        {"role": "tool", "tool_call_id": "c", "content": "  Traceback (most recent call last):\n"},
        {"role": "assistant", "content": None, "tool_calls": [_call("d", "pytest")]},
        {"role": "tool", "tool_call_id": "d", "content": "ERROR collecting"},
        {"role": "assistant", "content": None, "tool_calls": [_call("e", "cat", p=3)]},
        {"role": "tool", "tool_call_id": "e", "content": "print(1)"},
    ]
    out = DropFailedToolCalls().apply(msgs)
    check_valid(out.messages)
    # a (failed cat) and c (failed cat) go, b stays in its assistant message, the text of the
    # retry message stays without tool_calls; d (pytest) has no later successful pytest: kept.
    assert out.sources == (0, 1, 2, 4, 5, 7, 8, 9, 10)
    assert [c["id"] for c in out.messages[2]["tool_calls"]] == ["b"]
    assert out.messages[4] == {"role": "assistant", "content": "retry"}
    assert out.messages[6]["content"] == "ERROR collecting"
    assert out.forget == frozenset()
    # any later success counts when same_tool=False: d goes too, and its empty assistant message
    loose = DropFailedToolCalls(same_tool=False).apply(msgs)
    assert loose.sources == (0, 1, 2, 4, 5, 9, 10)
    # custom failure predicate: nothing looks failed
    assert DropFailedToolCalls(is_failure=lambda text: False).apply(msgs).messages == tuple(msgs)


def test_last_n_observations() -> None:
    msgs = _trajectory(3, turns=5)
    tools = [i for i, m in enumerate(msgs) if m["role"] == "tool"]
    out = LastNObservations(n=2, placeholder="[gone]").apply(msgs)
    for i, m in enumerate(out.messages):
        if i in tools[:-2]:
            assert m == {**msgs[i], "content": "[gone]"}
        else:
            assert m == msgs[i]
    assert LastNObservations(n=len(tools)).apply(msgs).messages == tuple(msgs)


def test_redact_forgets_content_and_arguments() -> None:
    msgs = [
        {"role": "user", "content": "token sk-AAAA1234 please"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [_call("k1", "login", key="sk-BBBB99")],
        },
        {"role": "tool", "tool_call_id": "k1", "content": "ok"},
        {"role": "assistant", "content": "fine"},
    ]
    policy = Redact(r"sk-[A-Za-z0-9]+")
    out = policy.apply(msgs)
    assert out.forget == {0, 1}
    assert out.messages[0]["content"] == "token [REDACTED] please"
    call = out.messages[1]["tool_calls"][0]
    assert call["id"] == "k1" and json.loads(call["function"]["arguments"]) == {"key": "[REDACTED]"}
    assert out.messages[2:] == tuple(msgs[2:])
    assert Redact(r"sk-\w+", arguments=False).apply(msgs).forget == {0}


@pytest.mark.parametrize("pattern", ["a*", "RED", "(", r"\[REDACTED\]"])
def test_redact_rejects_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        Redact(pattern)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TruncateOlderThan(n=-1),
        lambda: TruncateOlderThan(max_chars=-3),
        lambda: LastNObservations(n=-2),
    ],
)
def test_config_validation(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_compose_maps_forget_through_deletions() -> None:
    msgs = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": [_call("a", "cat")]},
        {"role": "tool", "tool_call_id": "a", "content": "Error: boom"},
        {"role": "assistant", "content": None, "tool_calls": [_call("b", "cat")]},
        {"role": "tool", "tool_call_id": "b", "content": "secret=42 " + "z" * 80},
        {"role": "assistant", "content": "secret=7"},
    ]
    policy = Redact(r"secret=\d+") | DropFailedToolCalls() | TruncateOlderThan(n=1, max_chars=20)
    assert policy == Compose(
        Redact(r"secret=\d+"), DropFailedToolCalls(), TruncateOlderThan(n=1, max_chars=20)
    )
    assert len(policy.policies) == 3
    out = policy.apply(msgs)
    assert out.sources == (0, 3, 4, 5)
    # messages 4 and 5 of the input were redacted; after the deletion they are 2 and 3
    assert out.forget == {2, 3}
    assert out.messages[2]["content"] == ("[REDACTED] " + "z" * 80)[:20] + "\n[... truncated]"
    assert orphan_tool_messages(out.messages) == []


def test_policy_edit_becomes_directive() -> None:
    """Through the SDK session: a truncated old output is AMORTIZE, a redaction is FORGET."""
    msgs = _trajectory(2, turns=3)
    big = next(i for i, m in enumerate(msgs) if m["role"] == "tool" and len(m["content"]) > 300)
    # build a history where `big` becomes older than the last turn at the second request
    cut = next(i for i in range(big + 1, len(msgs)) if msgs[i]["role"] == "assistant")
    first, second = msgs[:cut], msgs[: cut + 1]
    truncate = TruncateOlderThan(n=1, max_chars=40)
    # truncation: the same policy on both requests; redaction: decided after the first request
    for before, after, mode in [
        (truncate, truncate, Mode.AMORTIZE),
        (KeepAll(), Redact(r"line 0 y*"), Mode.FORGET),
    ]:
        session = Session()
        session.commit(session.prepare(before.apply(first).messages))
        out = after.apply(second)
        prep = session.prepare(out.messages, forget=out.forget)
        assert prep.directives, type(after).__name__
        touched = {prep.segments[j].message for d in prep.directives for j in range(*d.replacement)}
        assert big in touched
        assert {d.mode for d in prep.directives} == {mode}


@pytest.mark.parametrize("seed", [5, 8])
def test_drop_failed_only_ever_drops_more(seed: int) -> None:
    """DropFailedToolCalls may edit a message again (a later retry succeeds), but never undoes."""
    policy = DropFailedToolCalls(same_tool=False)
    hists = _prefixes(_trajectory(seed, turns=9))
    outs = [policy.apply(h) for h in hists]
    grew = 0
    for hist, out, nxt in zip(hists, outs, outs[1:], strict=False):
        kept_now = set(out.sources)
        kept_next = {s for s in nxt.sources if s < len(hist)}
        assert kept_next <= kept_now
        grew += kept_next < kept_now
    assert grew >= 1


# -- modes, plain functions, debug-gym failures, reasoning -------------------------------------
_EDITING = [
    lambda mode: TruncateOlderThan(n=1, max_chars=20, mode=mode),
    lambda mode: LastNObservations(n=1, mode=mode),
    lambda mode: Redact(r"line 1\d", mode=mode),
    lambda mode: DropFailedToolCalls(same_tool=False, mode=mode),
    lambda mode: DropReasoning(n=1, mode=mode),
]


def _with_reasoning(msgs: list[Msg]) -> list[Msg]:
    """Every assistant message thinks: a reasoning field and a <think> block before its text."""
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            m = {**m, "reasoning_content": f"why {i}\n" * 3}
            m["content"] = f"<think>plan {i}\nstep by step</think>\n\n{m.get('content') or ''}"
        out.append(m)
    return out


@pytest.mark.parametrize("make", _EDITING, ids=lambda make: type(make(None)).__name__)
def test_every_editing_policy_takes_a_mode(make: Any) -> None:
    msgs = _with_reasoning(_trajectory(3, turns=6))
    unmarked = make(None).apply(msgs)
    assert unmarked.forget == unmarked.amortize == frozenset() and not unmarked.dropped
    edited = {j for j, src in enumerate(unmarked.sources) if unmarked.messages[j] != msgs[src]}
    removed = len(msgs) - len(unmarked.messages)
    assert edited or removed
    for mode, marks in [(Mode.FORGET, "forget"), (Mode.AMORTIZE, "amortize")]:
        out = make(mode).apply(msgs)
        assert out.messages == unmarked.messages and out.sources == unmarked.sources
        assert getattr(out, marks) == edited
        assert {m for _, m in out.dropped} <= {mode} and len(out.dropped) == removed
        assert make(mode.value) == make(mode)  # the mode's value string is accepted
    with pytest.raises(ValueError, match="mode must be"):
        make("sometimes")


def test_forget_flag_is_mode_forget() -> None:
    assert TruncateOlderThan(forget=True) == TruncateOlderThan(mode=Mode.FORGET)
    assert TruncateOlderThan(mode=Mode.FORGET).forget is True
    assert LastNObservations(forget=True).mode is Mode.FORGET
    with pytest.raises(ValueError, match="contradicts"):
        TruncateOlderThan(forget=True, mode=Mode.AMORTIZE)
    assert Redact("x").mode is Mode.FORGET  # redaction stays exact unless asked otherwise
    assert Redact("x", mode=None).apply([{"role": "user", "content": "x"}]).forget == frozenset()


# debug-gym 1.3.0's failure texts, as its tools and env word them (one per failing tool)
DEBUG_GYM_FAILURES = {
    "view": "View failed. Error message:\nFailed to read `nope.py` because it does not exist.",
    "edit": "Edit failed. Error message:\nInvalid line number range.\n",
    "listdir": "Unregistered tool: listdir",
    "bash": "Command failed with output:\nls: cannot access 'x': No such file or directory",
    "pdb": "Failure calling pdb:\nEmpty commands are not allowed.",
}


def _debug_gym_history() -> list[Msg]:
    """A SCRIPTED debug-gym-style history: each tool fails once, then (but listdir) succeeds."""
    msgs: list[Msg] = [
        {"role": "system", "content": "You are a debugging agent."},
        {"role": "user", "content": "Fix purr."},
    ]
    for k, (tool, failure) in enumerate(DEBUG_GYM_FAILURES.items()):
        for attempt, output in enumerate([failure, f"{tool} worked"]):
            if tool == "listdir" and attempt:
                continue
            cid = f"{tool}{attempt}"
            msgs.append({"role": "assistant", "content": "", "tool_calls": [_call(cid, tool, k=k)]})
            msgs.append({"role": "tool", "tool_call_id": cid, "name": tool, "content": output})
    return msgs


def test_debug_gym_failure_texts_are_failures() -> None:
    for text in DEBUG_GYM_FAILURES.values():
        assert looks_like_debug_gym_failure(text) and looks_like_debug_gym_failure("\n " + text)
        assert not looks_like_error(text)  # why the debug-gym preset exists
    assert looks_like_debug_gym_failure("Error while using tool view with action: ...")
    assert not looks_like_debug_gym_failure("Viewing `purr_code.py`, lines 1-52 of 52")
    msgs = _debug_gym_history()
    assert DropFailedToolCalls().apply(msgs).messages == tuple(msgs)  # the generic test misses
    out = DropFailedToolCalls.for_debug_gym().apply(msgs)
    check_valid(out.messages)
    texts = [m["content"] for m in out.messages]
    for tool, failure in DEBUG_GYM_FAILURES.items():
        # a retried failure goes; the unregistered tool was never retried, so it stays
        assert (failure in texts) == (tool == "listdir"), tool
    assert len(out.messages) == len(msgs) - 8
    assert named_policy("drop_failed") == DropFailedToolCalls.for_debug_gym()


def test_drop_reasoning_keeps_the_last_turns() -> None:
    msgs = _with_reasoning(_trajectory(4, turns=5))
    policy = DropReasoning(n=2)
    out = policy.apply(msgs)
    check_valid(out.messages)
    assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i, (before, after) in enumerate(zip(msgs, out.messages, strict=True)):
        if i in assistants[:-2]:
            assert "reasoning_content" not in after and "<think>" not in after["content"]
            assert after["content"] == (before["content"].split("</think>\n\n")[1])
            assert after.get("tool_calls") == before.get("tool_calls")
        else:
            assert after == before
    assert policy.apply(list(out.messages)).messages == out.messages  # idempotent
    assert policy.apply(msgs) == out
    # text parts, an unclosed block (left alone), n=0, and the text left alone with tag=None
    parts = [
        {"role": "assistant", "content": [{"type": "text", "text": "<think>a</think>b"}]},
        {"role": "assistant", "content": "<think>unfinished", "reasoning": "r"},
    ]
    dropped = DropReasoning(n=0).apply(parts).messages
    assert dropped == ({"role": "assistant", "content": [{"type": "text", "text": "b"}]},
                       {"role": "assistant", "content": "<think>unfinished"})  # fmt: skip
    assert DropReasoning(n=0, tag=None).apply(parts).messages[0] == parts[0]
    for bad in [{"n": -1}, {"tag": "<think>"}, {"fields": "reasoning"}]:
        with pytest.raises(ValueError):
            DropReasoning(**bad)


def test_drop_reasoning_edit_is_a_directive() -> None:
    """Removing a <think> block from an older answer is one edit of that message."""
    msgs = _with_reasoning(_trajectory(6, turns=3))
    session = Session()
    first = msgs[: len(msgs) - 1]
    session.commit(session.prepare(DropReasoning(n=3).apply(first).messages))
    out = DropReasoning(n=1).apply(msgs)
    prep = session.prepare(out.messages, forget=out.forget)
    touched = {prep.segments[j].message for d in prep.directives for j in range(*d.replacement)}
    edited = {i for i, m in enumerate(out.messages) if m != msgs[i]}
    assert prep.directives and touched <= edited


def test_dropping_reasoning_fields_is_a_directive_on_those_messages() -> None:
    """Reasoning fields enter their own message's segment hash (templates of reasoning models
    render them there), so dropping them alone is an edit of exactly those messages."""
    msgs = _with_reasoning(_trajectory(6, turns=3))
    session = Session()
    first = msgs[: len(msgs) - 1]
    session.commit(session.prepare(first))
    out = DropReasoning(n=1, tag=None).apply(msgs)
    edited = {i for i, m in enumerate(out.messages) if m != msgs[i]}
    prep = session.prepare(out.messages, forget=out.forget)
    touched = {prep.segments[j].message for d in prep.directives for j in range(*d.replacement)}
    assert edited and prep.directives
    assert touched == edited
    assert all("<think>" in out.messages[i]["content"] for i in edited)  # the text stayed


def _drop_old_tool_outputs(messages: list[Msg]) -> list[Msg]:
    """A plain policy function: old tool outputs become a marker (and it mutates its input)."""
    tools = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    for i in tools[:-1]:
        messages[i]["content"] = "[gone]"
    return messages


def test_plain_functions_are_policies() -> None:
    msgs = _trajectory(9, turns=4)
    snapshot = json.dumps(msgs)
    policy = as_policy(_drop_old_tool_outputs)
    assert isinstance(policy, FunctionPolicy) and as_policy(policy) is policy
    out = policy.apply(msgs)
    assert json.dumps(msgs) == snapshot  # the function got a copy
    assert out.sources == tuple(range(len(msgs))) and out.forget == out.amortize == frozenset()
    assert [m["content"] for m in out.messages if m["role"] == "tool"][:-1] == ["[gone]"] * (
        sum(m["role"] == "tool" for m in msgs) - 1
    )

    # removals are aligned back to their inputs, so marks survive composition either way round
    def no_user(messages: list[Msg]) -> list[Msg]:
        return [m for m in messages if m["role"] != "user"]

    for composed in (Redact(r"line 1\d") | no_user, Compose(Redact(r"line 1\d"), no_user)):
        step = composed.apply(msgs)
        assert step.sources == tuple(i for i, m in enumerate(msgs) if m["role"] != "user")
        redacted = Redact(r"line 1\d").apply(msgs).forget
        assert {step.sources[j] for j in step.forget} == redacted - {
            i for i, m in enumerate(msgs) if m["role"] == "user"
        }
    assert (no_user | KeepAll()).policies[0] == FunctionPolicy(no_user)
    for bad in ["truncate", None, 3]:
        with pytest.raises(TypeError):
            Compose(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Policy or a function"):
        as_policy("truncate")  # type: ignore[arg-type]
    for wrong in (lambda m: "text", lambda m: [{"content": "no role"}], lambda m: {"role": "x"}):
        with pytest.raises(TypeError, match="policy function"):
            as_policy(wrong).apply(msgs)


def test_named_policies() -> None:
    for name in POLICY_NAMES:
        assert isinstance(named_policy(name), Policy)
    assert named_policy("truncate_older_than") == TruncateOlderThan(n=2, max_chars=200)
    with pytest.raises(ValueError, match="keep_all, truncate, truncate_older_than"):
        named_policy("truncate_old")


def test_compose_carries_amortize_and_dropped() -> None:
    msgs = _debug_gym_history()
    policy = DropFailedToolCalls.for_debug_gym(mode=Mode.FORGET) | TruncateOlderThan(
        n=1, max_chars=5, mode=Mode.AMORTIZE
    )
    out = policy.apply(msgs)
    assert len(out.dropped) == 8 and {m for _, m in out.dropped} == {Mode.FORGET}
    assert {m["content"] for m, _ in out.dropped if m["role"] == "tool"} == {
        f for t, f in DEBUG_GYM_FAILURES.items() if t != "listdir"
    }
    truncated = {j for j, m in enumerate(out.messages) if str(m.get("content")).endswith("]")}
    assert truncated and out.amortize == truncated and out.forget == frozenset()
    with pytest.raises(ValueError, match=r"leyline\.Mode"):
        PolicyResult((), dropped=(({"role": "user"}, "forget"),))  # type: ignore[arg-type]
