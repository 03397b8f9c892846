"""REPAIR on the wire: the mode, its window ``k`` (per directive or per server-diff payload),
the errors a bad ``k`` gets, and the accounting fields it adds."""

from __future__ import annotations

import json

import pytest

from leyline import Directive, Mode, PayloadError, Session
from leyline.directives import MAX_WINDOW, parse_mode
from leyline.protocol import DirectiveOutcome, Payload, ResponseInfo, Status, TokenCounts

SEG = ["0123456789abcdef", 12]


def _payload(**directive: object) -> dict[str, object]:
    d = {"start": 0, "end": 1, "replacement": [0, 1], "mode": "repair", **directive}
    return {"session": "s", "version": 2, "base_version": 1, "segments": [SEG, SEG],
            "directives": [d]}  # fmt: skip


def test_repair_directive_round_trips_with_and_without_window() -> None:
    p = Payload.from_wire(_payload(window=64))
    assert p.directives == (Directive(0, 1, (0, 1), Mode.REPAIR, 64),)
    assert Payload.from_request(p.to_custom_params_body()) == p
    assert not p.forgets and p.modes == (Mode.REPAIR,)
    default = Payload.from_wire(_payload())
    assert default.directives[0].window is None
    assert "window" not in default.to_wire()["directives"][0]  # the server's default
    assert parse_mode("repair") is Mode.REPAIR
    assert repr(Directive(0, 1, (0, 1), Mode.REPAIR, 8)).endswith(
        "mode=<Mode.REPAIR: 'repair'>, window=8)"
    )


@pytest.mark.parametrize(
    ("directive", "match"),
    [
        ({"window": -1}, "integer 0"),
        ({"window": 1.5}, "integer 0"),
        ({"window": "64"}, "integer 0"),
        ({"window": True}, "integer 0"),
        ({"window": MAX_WINDOW + 1}, "integer 0"),
        ({"window": 8, "mode": "amortize"}, "only for mode 'repair'"),
        ({"window": 8, "mode": "forget"}, "only for mode 'repair'"),
        ({"mode": "repairs"}, "unknown mode"),
    ],
)
def test_bad_window_is_a_payload_error_naming_the_directive(directive: dict, match: str) -> None:
    with pytest.raises(PayloadError, match=match) as info:
        Payload.from_wire(_payload(**directive))
    assert info.value.param == "leyline.directives[0]" and info.value.code == "invalid_directive"
    # the same through the carrier both servers read
    with pytest.raises(PayloadError) as carried:
        Payload.from_request({"custom_params": {"leyline": json.dumps(_payload(**directive))}})
    assert carried.value.param == "custom_params.leyline.directives[0]"


def test_server_diff_payload_window() -> None:
    p = Payload.from_wire({"session": "s", "mode": "repair", "window": 32})
    assert (p.mode, p.window) == (Mode.REPAIR, 32)
    assert Payload.from_wire(p.to_wire()) == p
    assert Payload.from_wire({"session": "s", "mode": "repair"}).window is None
    for bad, param in [
        ({"session": "s", "mode": "amortize", "window": 32}, "leyline.window"),
        ({"session": "s", "mode": "repair", "window": -3}, "leyline.window"),
        ({"session": "s", "version": 1, "window": 3}, "leyline.window"),  # segment payload
    ]:
        with pytest.raises(PayloadError) as info:
            Payload.from_wire(bad)
        assert info.value.param == param and info.value.code == "invalid_payload"
    with pytest.raises(PayloadError, match="only for mode 'repair'"):
        Payload("s", mode=Mode.FORGET, window=4)


def test_directive_and_session_window_checks() -> None:
    with pytest.raises(ValueError, match="only for mode 'repair'"):
        Directive(0, 1, (0, 1), Mode.AMORTIZE, 4)
    with pytest.raises(ValueError, match="integer 0"):
        Session().prepare([{"role": "user", "content": "x"}], window=-1)
    s = Session()
    s.commit(s.prepare([{"role": "user", "content": c} for c in "abc"]))
    p = s.prepare([{"role": "user", "content": c} for c in "ac"], default_mode=Mode.REPAIR,
                  window=16)  # fmt: skip
    assert [(d.mode, d.window) for d in p.directives] == [(Mode.REPAIR, 16)]
    # a FORGET edit keeps no window
    p = s.prepare([{"role": "user", "content": c} for c in "aXc"], forget=(1,),
                  default_mode=Mode.REPAIR, window=16)  # fmt: skip
    assert [(d.mode, d.window) for d in p.directives] == [(Mode.FORGET, None)]


def test_accounting_reports_the_window() -> None:
    tokens = TokenCounts(exact=10, spliced=50, recomputed=20, repaired=16)
    wire = tokens.to_wire()
    assert wire["repaired"] == 16 and wire["approximate"] == 50
    assert TokenCounts.from_wire(wire) == tokens and tokens.total == 80
    assert "repaired" not in TokenCounts(exact=3, recomputed=1).to_wire()
    with pytest.raises(ValueError, match="part of recomputed"):
        TokenCounts(recomputed=2, repaired=3)
    out = DirectiveOutcome(0, Status.APPLIED, None, 50, 16)
    info = ResponseInfo("s", 2, tokens, (out,))
    back = ResponseInfo.from_wire(json.loads(json.dumps(info.to_wire())))
    assert back.directives == (out,) and back.tokens.repaired == 16 and not back.exact_kv
    assert "window_tokens" not in DirectiveOutcome(0, Status.APPLIED, None, 5).to_wire()
