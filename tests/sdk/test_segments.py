import random

import pytest

from leyline.segments import SegmentParams, render_segments, split_content


def _text(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "x = 1", "return y", "# note", "{", "}"]
    return "".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) + "\n" for _ in range(lines)
    )


def test_pieces_concatenate_and_cut_on_line_ends() -> None:
    text = _text(0, 600)
    pieces = split_content(text)
    assert "".join(pieces) == text
    assert len(pieces) > 5
    assert all(p.endswith("\n") for p in pieces[:-1])


def test_bounds_respected() -> None:
    params = SegmentParams()
    pieces = split_content(_text(1, 2000), params)
    assert all(len(p) <= params.max_chars for p in pieces)
    assert all(len(p) >= params.min_chars for p in pieces[:-1])
    mean = sum(map(len, pieces)) / len(pieces)
    assert 250 < mean < 1100, mean


def test_long_line_is_hard_cut() -> None:
    text = "x" * 5000
    pieces = split_content(text)
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [2048, 2048, 904]


def test_shift_invariance_after_first_cut() -> None:
    body = _text(2, 800)
    a = split_content(body)
    b = split_content(_text(3, 37) + body)
    # after resynchronising, the same content gives the same pieces
    common = set(a) & set(b)
    assert sum(len(p) for p in common) > 0.9 * len(body)


def test_identical_content_same_hash_anywhere() -> None:
    tool_output = _text(4, 300)
    first = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "go"},
        {"role": "tool", "content": tool_output, "tool_call_id": "c1"},
    ]
    second = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "other question first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "go"},
        {"role": "tool", "content": tool_output, "tool_call_id": "c1"},
    ]
    h1 = [s.hash for s in render_segments(first) if s.message == 2]
    h2 = [s.hash for s in render_segments(second) if s.message == 4]
    # the first piece carries the previous message's glue, the rest is content alone
    assert h1[1:] == h2[1:] and len(h1) > 2


def test_hash_depends_on_role_and_tools() -> None:
    user = render_segments([{"role": "user", "content": "same"}])
    system = render_segments([{"role": "system", "content": "same"}])
    tooled = render_segments([{"role": "user", "content": "same"}], tools=[{"type": "function"}])
    assert user[0].hash != system[0].hash != tooled[0].hash != user[0].hash


def test_reasoning_enters_its_own_message_hash_only() -> None:
    answer = {"role": "assistant", "content": "ls\n" * 200}
    thought = {**answer, "reasoning_content": "list the files first"}
    after = {"role": "tool", "tool_call_id": "c1", "content": "a.py"}
    plain = render_segments([answer, after])
    thinking = render_segments([thought, after])
    assert plain[0].hash != thinking[0].hash  # the glue in front of the answer
    assert [s.hash for s in plain[1:]] == [s.hash for s in thinking[1:]]


def test_bad_messages_raise() -> None:
    with pytest.raises(TypeError, match="role"):
        render_segments([{"content": "x"}])
    with pytest.raises(TypeError, match="content"):
        render_segments([{"role": "user", "content": 3}])


def test_params_validated() -> None:
    with pytest.raises(ValueError):
        SegmentParams(expected_chars=10, min_chars=20)
