"""Property-based tests (hypothesis) for the diff, directive validation and segment CDC."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from leyline import Directive, DirectiveError, Mode, Session, validate_directives
from leyline.diff import diff_segments
from leyline.segments import render_segments, split_content

WORDS = ["def", "return", "x", "=", "1", "error", "ok", "import", "self", "(", ")"]


def _text(rng: random.Random, lines: int) -> str:
    return "".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) + "\n" for _ in range(lines)
    )


def _messages(seed: int, n: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    roles = ["user", "assistant"]
    msgs = [{"role": "system", "content": "system prompt"}]
    msgs += [{"role": roles[i % 2], "content": _text(rng, rng.randint(1, 80))} for i in range(n)]
    return msgs


def _apply(base: list[str], new: list[str], directives: list[Directive]) -> list[str]:
    """Apply segment directives to the base hash list (what the server does with tokens)."""
    out: list[str] = []
    prev = 0
    for d in sorted(directives, key=lambda d: d.start):
        out += base[prev : d.start] + new[d.replacement[0] : d.replacement[1]]
        prev = d.end
    return out + base[prev:]


edits = st.lists(
    st.tuples(st.sampled_from(["delete", "truncate", "replace", "insert", "move"]),
              st.integers(0, 10**6)),
    min_size=1, max_size=4,
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 14), ops=edits, append=st.booleans())
def test_diff_reconstructs_the_new_version(seed: int, n: int, ops: list, append: bool) -> None:
    base_msgs = _messages(seed, n)
    msgs = [dict(m) for m in base_msgs]
    for op, r in ops:
        if len(msgs) < 3:
            break
        i = 1 + r % (len(msgs) - 1)
        if op == "delete":
            del msgs[i]
        elif op == "truncate":
            msgs[i]["content"] = msgs[i]["content"][:50] + "[cut]"
        elif op == "replace":
            msgs[i]["content"] = f"new content {r}"
        elif op == "insert":
            msgs.insert(i, {"role": "user", "content": f"inserted {r}\n" * 3})
        else:
            msgs.insert(1 + (r // 7) % (len(msgs) - 1), msgs.pop(i))
    if append:
        msgs.append({"role": "user", "content": "a new turn"})
    base = render_segments(base_msgs)
    new = render_segments(msgs)
    directives = diff_segments(base, new)
    # the directives are valid and turn the base into the new version (appends excepted)
    validate_directives(directives, base_len=len(base), new_len=len(new))
    rebuilt = _apply([s.hash for s in base], [s.hash for s in new], directives)
    hashes = [s.hash for s in new]
    assert hashes[: len(rebuilt)] == rebuilt


@settings(max_examples=80, deadline=None)
@given(
    spans=st.lists(
        st.tuples(st.integers(-2, 12), st.integers(-2, 12), st.integers(-2, 12),
                  st.integers(-2, 12)),
        min_size=1, max_size=4,
    ),
    base_len=st.integers(0, 10),
    new_len=st.integers(0, 10),
)  # fmt: skip
def test_validation_accepts_exactly_well_formed_lists(
    spans: list[tuple[int, int, int, int]], base_len: int, new_len: int
) -> None:
    ds = [Directive(a, b, (c, d), Mode.AMORTIZE) for a, b, c, d in spans]
    ok = all(
        0 <= a <= b <= base_len and 0 <= c <= d <= new_len and (a, c) != (b, d)
        for a, b, c, d in spans
    )
    ordered = sorted(spans)
    ok = ok and all(
        x[1] <= y[0] and x[3] <= y[2] and not (x[0] == y[0] == x[1] == y[1])
        for x, y in itertools.pairwise(ordered)
    )
    try:
        validate_directives(ds, base_len=base_len, new_len=new_len)
    except DirectiveError:
        assert not ok
    else:
        assert ok


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), where=st.floats(0.0, 1.0), delete=st.booleans())
def test_cdc_keeps_segments_outside_an_edit(seed: int, where: float, delete: bool) -> None:
    """A ~32K-token history (~130K characters in tool outputs); insert or delete a span inside
    one message: at least 95% of the segments outside the edited region keep their hashes."""
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": "agent"}]
    msgs += [{"role": "user", "content": _text(rng, 400)} for _ in range(12)]
    m = 1 + int(where * 11.99)
    text = msgs[m]["content"]
    cut = int(len(text) * rng.random())
    edited = [dict(x) for x in msgs]
    if delete:
        edited[m]["content"] = text[:cut] + text[cut + 500 :]
    else:
        edited[m]["content"] = text[:cut] + _text(rng, 10) + text[cut:]
    before = render_segments(msgs)
    after = {s.hash for s in render_segments(edited)}
    # segments of other messages, and of the edited message away from the edit point
    outside = [s for s in before if s.message != m]
    pieces = split_content(text)
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    far = [
        h
        for h, start, p in zip(
            [s.hash for s in before if s.message == m], starts, pieces, strict=True
        )
        if start + len(p) < cut - 2048 or start > cut + 2048 + 500
    ]
    kept = sum(s.hash in after for s in outside) + sum(h in after for h in far)
    assert kept >= 0.95 * (len(outside) + len(far))


def test_agent_edit_patterns() -> None:
    """The edits agents make map to the directives the issue names."""
    tool_call = {"id": "c1", "type": "function", "function": {"name": "run", "arguments": "{}"}}
    history = [
        {"role": "system", "content": "agent"},
        {"role": "user", "content": "fix the bug"},
        {"role": "assistant", "content": "", "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Error: boom\n" * 40},
        {"role": "assistant", "content": "retrying"},
        {"role": "user", "content": "output\n" * 200},
        {"role": "assistant", "content": "done"},
    ]
    s = Session()
    s.commit(s.prepare(history))
    base = s.base_segments
    assert base is not None

    def touched(edited: list[dict], **kw: object) -> list[tuple[set[int], set[int], Mode]]:
        p = s.prepare(edited, **kw)  # type: ignore[arg-type]
        return [
            (
                {base[i].message for i in range(d.start, d.end)},
                {p.segments[j].message for j in range(*d.replacement)},
                d.mode,
            )
            for d in p.directives
        ]

    # drop a failed tool call and its result: one deletion over messages 2-3
    dropped = touched(history[:2] + history[4:])
    assert dropped and {2, 3} <= set().union(*(b for b, _, _ in dropped))
    # truncate an older tool output: a replacement of message 5
    trunc = [dict(m) for m in history]
    trunc[5]["content"] = "output\n[truncated]"
    assert touched(trunc) == [({5}, {5}, Mode.AMORTIZE)]
    # replace a message with FORGET
    red = [dict(m) for m in history]
    red[1]["content"] = "[redacted]"
    assert touched(red, forget={1}) == [({1}, {1}, Mode.FORGET)]
    # pivot: drop the tail
    (pivot,) = touched(history[:4])
    assert pivot[0] >= {4, 5, 6} and pivot[1] == set()
