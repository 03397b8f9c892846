import json

import pytest

from leyline import Mode, Session, StaleVersionError
from leyline.diff import diff_segments
from leyline.protocol import Payload
from leyline.segments import render_segments


def _history(n: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You fix bugs."}]
    for i in range(n):
        msgs.append({"role": "user", "content": f"step {i}\n" + f"output line {i}\n" * 40})
        msgs.append({"role": "assistant", "content": f"answer {i}"})
    return msgs


def test_append_only_gives_no_directives() -> None:
    s = Session("a")
    p1 = s.prepare(_history(2))
    assert (p1.version, p1.base_version, p1.directives) == (1, None, ())
    s.commit(p1)
    p2 = s.prepare(_history(3))
    assert (p2.version, p2.base_version, p2.directives) == (2, 1, ())


def test_truncation_becomes_amortize_directive() -> None:
    s = Session()
    history = _history(3)
    s.commit(s.prepare(history))
    edited = [dict(m) for m in history]
    edited[1]["content"] = "step 0\n[truncated]"
    p = s.prepare(edited)
    assert len(p.directives) == 1
    d = p.directives[0]
    base = s.base_segments
    assert base is not None
    assert {base[i].message for i in range(d.start, d.end)} == {1}
    assert {p.segments[j].message for j in range(*d.replacement)} == {1}
    assert d.mode is Mode.AMORTIZE


def test_forget_mode_and_deletion() -> None:
    s = Session()
    history = _history(3)
    s.commit(s.prepare(history))
    redacted = [dict(m) for m in history]
    redacted[3]["content"] = "[redacted]"
    assert s.prepare(redacted, forget={3}).directives[0].mode is Mode.FORGET
    deleted = history[:1] + history[3:]
    (d,) = s.prepare(deleted).directives
    assert d.replacement[0] == d.replacement[1]


def test_commit_checks_version_and_session() -> None:
    s = Session()
    p1 = s.prepare(_history(1))
    p1b = s.prepare(_history(1))
    s.commit(p1)
    with pytest.raises(StaleVersionError):
        s.commit(p1b)
    with pytest.raises(ValueError, match="session"):
        Session("other").commit(p1)


def test_payload_shape_and_reset() -> None:
    s = Session("sid")
    p = s.prepare(_history(1))
    carried = p.extra_body()["custom_params"]["leyline"]
    body = json.loads(carried)
    assert body["session"] == "sid" and body["version"] == 1 and body["protocol"] == 1
    assert all(len(h) == 16 and isinstance(c, int) for h, c in body["segments"])
    assert Payload.from_wire(body) == p.to_payload()  # the schema reads what the SDK writes
    s.commit(p)
    s.reset()
    assert s.prepare(_history(1)).directives == ()


def test_diff_move_is_delete_plus_insert() -> None:
    msgs = _history(3)
    moved = [msgs[0], msgs[3], msgs[4], msgs[1], msgs[2], msgs[5], msgs[6]]
    ds = diff_segments(render_segments(msgs), render_segments(moved))
    assert ds and all(d.mode is Mode.AMORTIZE for d in ds)


def test_default_mode_covers_pure_deletions() -> None:
    s = Session()
    history = _history(3)
    s.commit(s.prepare(history))
    (d,) = s.prepare(history[:1] + history[3:], default_mode=Mode.FORGET).directives
    assert d.mode is Mode.FORGET and d.replacement[0] == d.replacement[1]
