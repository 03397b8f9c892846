"""The replay workload: seeded, scalable, and edits that do what their metadata says."""

from __future__ import annotations

import itertools

import pytest

from leyline.evals.workload import (
    AGENT_EDIT_KINDS,
    CHARS_PER_TOKEN,
    CLEARED,
    EDIT_KINDS,
    SLICE_MESSAGE,
    WorkloadConfig,
    build_workload,
)


def _texts(cfg: WorkloadConfig) -> list[list[list[str]]]:
    return [[[m["content"] for m in r.messages] for r in c.requests] for c in build_workload(cfg)]


def test_same_seed_same_workload_other_seed_differs() -> None:
    cfg = WorkloadConfig(seed=7, scale=0.05, conversations=3, turns=4)
    assert _texts(cfg) == _texts(WorkloadConfig(seed=7, scale=0.05, conversations=3, turns=4))
    other = _texts(WorkloadConfig(seed=8, scale=0.05, conversations=3, turns=4))
    assert other != _texts(cfg)
    assert other[0][0][0] != _texts(cfg)[0][0][0]  # the system prompt depends on the seed too


def test_full_scale_sizes_match_the_published_workload() -> None:
    cfg = WorkloadConfig(seed=1, scale=1.0, conversations=2, turns=6)
    convs = build_workload(cfg)
    first = convs[0].requests[0]
    system = first.messages[0]["content"]
    assert abs(len(system) / CHARS_PER_TOKEN - 4096) < 50
    assert convs[1].requests[0].messages[0]["content"] == system  # shared by conversations
    slice_chars = len(first.messages[SLICE_MESSAGE]["content"].split("Working context:\n")[1])
    assert abs(slice_chars / CHARS_PER_TOKEN - 3200) < 100
    for conv in convs:
        assert [r.turn for r in conv.requests] == [1, 2, 3, 4, 5, 6]
        last = conv.requests[-1]
        assert len(last.messages) == 2 + 2 * 6
        for k in range(1, 7):  # each turn is an assistant reply + a tool output, ~2,048 tokens
            turn = last.messages[2 * k]["content"] + last.messages[2 * k + 1]["content"]
            assert abs(len(turn) / CHARS_PER_TOKEN - 2048) < 60
        # alternation user/assistant after the system prompt (strict chat templates accept it)
        roles = [m["role"] for m in last.messages]
        assert roles[:2] == ["system", "user"]
        assert roles[2:] == ["assistant", "user"] * 6
        assert 17_000 < last.estimated_tokens < 21_000


@pytest.mark.parametrize("scale", [0.02, 0.1, 0.5])
def test_scale_multiplies_sizes(scale: float) -> None:
    big = build_workload(WorkloadConfig(seed=3, scale=1.0, conversations=1, turns=3))
    small = build_workload(WorkloadConfig(seed=3, scale=scale, conversations=1, turns=3))
    ratio = small[0].requests[-1].total_chars / big[0].requests[-1].total_chars
    assert scale * 0.7 < ratio < scale * 1.3


def test_edits_change_only_the_slice_and_metadata_matches() -> None:
    cfg = WorkloadConfig(seed=11, scale=0.2, conversations=4, turns=6)
    kinds = set()
    for conv in build_workload(cfg):
        reqs = conv.requests
        assert reqs[0].edit is None and reqs[0].new_fraction == 1.0 and reqs[0].forget == ()
        for prev, cur in itertools.pairwise(reqs):
            edit = cur.edit
            assert edit is not None and edit.kind in EDIT_KINDS
            kinds.add(edit.kind)
            assert cur.forget == (SLICE_MESSAGE,) and edit.message == SLICE_MESSAGE
            # everything but the slice and the appended turn is unchanged
            n = len(prev.messages)
            for i in range(n):
                if i != SLICE_MESSAGE:
                    assert cur.messages[i] == prev.messages[i]
            assert len(cur.messages) == n + 2
            old = prev.messages[SLICE_MESSAGE]["content"]
            new = cur.messages[SLICE_MESSAGE]["content"]
            assert old != new
            delta = len(new) - len(old)
            assert delta == edit.inserted_chars - edit.removed_chars
            if edit.kind == "move":
                assert sorted(old) == sorted(new)  # same characters, another order
            if edit.kind == "delete":
                assert edit.inserted_chars == 0 and delta < 0
            if edit.kind == "replace_shorter":
                assert 0 < edit.inserted_chars < edit.removed_chars and "truncated" in new
            if edit.kind == "replace_longer":
                assert edit.inserted_chars > edit.removed_chars
            appended = sum(len(m["content"]) for m in cur.messages[n:])
            assert cur.new_chars == appended + edit.inserted_chars
            assert 0 < cur.new_fraction < 1
    assert kinds == set(EDIT_KINDS)


def test_salt_changes_every_text_but_not_the_edit_schedule() -> None:
    cfg = WorkloadConfig(seed=2, scale=0.2, conversations=2, turns=5)
    plain = build_workload(cfg)
    salted = build_workload(
        WorkloadConfig(seed=2, scale=0.2, conversations=2, turns=5, salt="arm-x")
    )
    assert salted[0].requests[0].messages[0]["content"].startswith("[run arm-x]\n")
    for a, b in zip(plain, salted, strict=True):
        for ra, rb in zip(a.requests, b.requests, strict=True):
            assert [m["role"] for m in ra.messages] == [m["role"] for m in rb.messages]
            assert (ra.edit and (ra.edit.kind, ra.edit.block)) == (
                rb.edit and (rb.edit.kind, rb.edit.block)
            )
            assert abs(ra.total_chars - rb.total_chars) < 0.05 * ra.total_chars
            # no long piece of text is shared (content-addressed reuse could find it)
            for ma, mb in zip(ra.messages, rb.messages, strict=True):
                lines_a = {x for x in ma["content"].splitlines() if len(x) > 40}
                lines_b = {x for x in mb["content"].splitlines() if len(x) > 40}
                assert len(lines_a & lines_b) <= 0.1 * max(1, len(lines_a))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": 0.0},
        {"scale": -1.0},
        {"conversations": 0},
        {"turns": 0},
        {"blocks": 1},
        {"system_tokens": 0},
    ],
)
def test_invalid_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WorkloadConfig(**kwargs)  # type: ignore[arg-type]


def test_agent_mix_edits_do_what_they_say() -> None:
    """clear, truncate, drop_failed, summarize and reread edit the history as declared: the
    edited request is the previous one with the edit applied plus one new turn."""
    cfg = WorkloadConfig(seed=5, scale=0.1, conversations=6, turns=6, mix="agent")
    kinds = set()
    for conv in build_workload(cfg):
        for prev, cur in itertools.pairwise(conv.requests):
            edit = cur.edit
            assert edit is not None and edit.kind in AGENT_EDIT_KINDS
            kinds.add(edit.kind)
            assert cur.messages[:2] == prev.messages[:2]  # system prompt and slice untouched
            before, after = prev.messages, cur.messages[: len(cur.messages) - 2]
            new_turn = cur.messages[-2:]
            i = edit.message
            assert before[:i] == after[:i]  # everything before the edit point is kept
            if edit.kind == "reread":
                assert after == before and cur.forget == ()
                assert edit.target is not None and i == len(before) + 1
                body = new_turn[1]["content"].removeprefix("Re-reading earlier output:\n")
                repeated = body[: body.rindex(f"\nTool output (step {cur.turn})")]
                # a whole earlier output or slice block comes back, verbatim
                assert len(repeated) > 100 and repeated in before[edit.target]["content"]
            elif edit.kind == "drop_failed":
                assert before[i + 1]["content"].startswith("Command failed with output")
                assert after == before[:i] + before[i + 2 :] and cur.forget == ()
            elif edit.kind == "summarize":
                assert after[i]["content"].startswith("Summary of steps")
                assert after[i + 1]["content"] == "Continue."
                assert after[i + 2 :] == before[i + 4 :] and cur.forget == (i,)
            else:
                shown = after[i]["content"]
                assert shown == CLEARED if edit.kind == "clear" else "truncated ..." in shown
                assert after[i + 1 :] == before[i + 1 :] and cur.forget == (i,)
            roles = [m["role"] for m in cur.messages[2:]]
            assert roles == ["assistant", "user"] * (len(roles) // 2)
            if edit.kind != "reread":  # a re-read inserts unchanged text that moved
                assert cur.total_chars == prev.total_chars - edit.removed_chars + cur.new_chars
    assert kinds == set(AGENT_EDIT_KINDS)
    again = build_workload(cfg)
    assert [r.messages for c in again for r in c.requests] == [
        r.messages for c in build_workload(cfg) for r in c.requests
    ]
    with pytest.raises(ValueError, match="mix"):
        WorkloadConfig(mix="chaos")
