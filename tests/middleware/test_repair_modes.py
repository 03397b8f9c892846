"""Policies and adapters asking for REPAIR: per-policy marks, the strictest-mode rule, the
conversation's default mode and window (no server: the payload is read back)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from leyline import Mode
from leyline.middleware import Compose, Redact, TruncateOlderThan
from leyline.middleware.conversation import Conversation, apply_policy_modes
from leyline.session import Session


def _history(n_tools: int = 3) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "user", "content": "task"}]
    for i in range(n_tools):
        call = {"id": f"c{i}", "type": "function", "function": {"name": "cat", "arguments": "{}"}}
        out += [
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"output {i} " + "x" * 400},
        ]
    return [*out, {"role": "user", "content": "next"}]


def _directives(conv: Conversation, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    plan = conv.plan({"model": "m", "messages": messages})
    conv.accepted(plan)
    payload = json.loads(plan.kwargs["extra_body"]["custom_params"]["leyline"])
    directives: list[dict[str, Any]] = payload["directives"]
    return directives


def test_policy_mode_repair_marks_its_edits() -> None:
    result = TruncateOlderThan(n=1, max_chars=10, mode="repair").apply(_history())  # type: ignore[arg-type]
    assert result.repair == {2, 4} and not result.forget and not result.amortize
    with pytest.raises(ValueError, match="contradicts mode=REPAIR"):
        TruncateOlderThan(forget=True, mode=Mode.REPAIR)
    with pytest.raises(ValueError, match="'repair'"):
        TruncateOlderThan(mode="repare")  # type: ignore[arg-type]
    # marks survive a later policy; a FORGET mark on the same message wins
    both = Compose(TruncateOlderThan(n=1, max_chars=10, mode=Mode.REPAIR), Redact("output 2"))
    res = both.apply(_history())
    assert res.repair == {2, 4} and res.forget == {6}


def test_strictest_mode_wins_and_only_repair_carries_the_window() -> None:
    history = _history()
    session = Session()
    session.commit(session.prepare(history))
    result = Compose(
        TruncateOlderThan(n=1, max_chars=10, mode=Mode.REPAIR),
    ).apply(history)
    prep = session.prepare(result.messages)
    out = apply_policy_modes(prep, result, base=session.base_segments, previous=history,
                             window=24)  # fmt: skip
    assert [(d.mode, d.window) for d in out.directives] == [(Mode.REPAIR, 24)] * 2
    # a FORGET default does not override a policy's REPAIR mark; AMORTIZE marks lose to REPAIR
    prep = session.prepare(result.messages, default_mode=Mode.FORGET)
    out = apply_policy_modes(prep, result, base=session.base_segments, previous=history,
                             default_mode=Mode.FORGET, window=24)  # fmt: skip
    assert {d.mode for d in out.directives} == {Mode.REPAIR}


def test_conversation_default_mode_repair_and_window() -> None:
    conv = Conversation(
        TruncateOlderThan(n=1, max_chars=10), default_mode="repair", repair_window=8
    )
    h = _history(1)
    assert _directives(conv, h) == []
    h2 = _history(2)  # the first tool output is now older than the last turn
    (d,) = _directives(conv, h2)
    assert (d["mode"], d["window"]) == ("repair", 8)
    conv = Conversation(TruncateOlderThan(n=1, max_chars=10), default_mode="repair")
    _directives(conv, h)
    (d,) = _directives(conv, h2)
    assert d["mode"] == "repair" and "window" not in d  # the server's default
    with pytest.raises(ValueError, match="repair_window"):
        Conversation(repair_window=-1)
