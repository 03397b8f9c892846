"""The one wire schema (`leyline.protocol`): what it accepts, what it rejects and how."""

from __future__ import annotations

import json

import pytest

from leyline import Directive, Mode, PayloadError
from leyline.protocol import DirectiveOutcome, Payload, ResponseInfo, Status, TokenCounts

SEG = ["0123456789abcdef", 12]
GOOD = {"session": "s", "version": 2, "base_version": 1, "segments": [SEG, SEG],
        "directives": [{"start": 0, "end": 1, "replacement": [0, 1], "mode": "forget"}]}  # fmt: skip


def test_segment_payload_round_trips_through_both_carriers() -> None:
    p = Payload.from_wire(GOOD)
    assert p.directives == (Directive(0, 1, (0, 1), Mode.FORGET),) and p.forgets
    assert Payload.from_request(p.to_custom_params_body()) == p
    assert Payload.from_request({"leyline": p.to_wire()}) == p
    assert Payload.from_request({"messages": []}) is None


@pytest.mark.parametrize(
    ("obj", "param", "code"),
    [
        ({**GOOD, "extra": 1}, "leyline", "invalid_payload"),
        ({**GOOD, "protocol": 2}, "leyline.protocol", "unsupported_protocol"),
        ({**GOOD, "session": "has space"}, "leyline.session", "invalid_payload"),
        ({**GOOD, "version": True}, "leyline.version", "invalid_payload"),
        ({**GOOD, "base_version": 2}, "leyline.base_version", "invalid_payload"),
        ({**GOOD, "segments": [["XYZ", 1]]}, "leyline.segments[0]", "invalid_payload"),
        ({**GOOD, "directives": [{"start": 0, "end": 1, "replacement": [0, 9]}]},
         "leyline.directives[0]", "invalid_directive"),
        ({**GOOD, "base_version": None}, "leyline.base_version", "invalid_directive"),
        ({**GOOD, "approximate": "yes"}, "leyline.approximate", "invalid_payload"),
        ({"session": "s", "mode": "squash"}, "leyline.mode", "invalid_payload"),
        ({"session": "s", "mode": "amortize", "version": 3}, "leyline.version", "invalid_payload"),
        ({"version": 1}, "leyline.session", "invalid_payload"),
        ({"session": "s"}, "leyline", "invalid_payload"),
    ],
)  # fmt: skip
def test_malformed_payloads_name_the_field(obj: dict, param: str, code: str) -> None:
    with pytest.raises(PayloadError) as info:
        Payload.from_wire(obj)
    assert (info.value.param, info.value.code) == (param, code), str(info.value)


def test_carrier_errors() -> None:
    with pytest.raises(PayloadError, match="not valid JSON"):
        Payload.from_request({"custom_params": {"leyline": "{nope"}})
    both = {"leyline": GOOD, "custom_params": {"leyline": json.dumps(GOOD)}}
    with pytest.raises(PayloadError, match="not both"):
        Payload.from_request(both)


def test_server_diff_payload_and_prompt_cache_key() -> None:
    p = Payload.from_request({"custom_params": {"leyline": '{"session":"a","mode":"amortize"}'}})
    assert p is not None and p.server_diff and p.version is None and p.mode is Mode.AMORTIZE
    assert p.to_wire() == {"protocol": 1, "session": "a", "mode": "amortize",
                           "content_reuse": True, "approximate": True}  # fmt: skip
    # the key names the session when the payload does not; a key that is not a valid id is hashed
    named = Payload.from_request(
        {"prompt_cache_key": "run/7", "custom_params": {"leyline": '{"mode":"forget"}'}}
    )
    assert named is not None and named.session.startswith("pck-") and len(named.session) == 36
    # a key alone opts into an exact session (FORGET), never into approximate KV
    alone = Payload.from_request({"prompt_cache_key": "agent-7"})
    assert alone == Payload("agent-7", mode=Mode.FORGET)


def test_response_info_round_trip_and_counts() -> None:
    tokens = TokenCounts(exact=5, inherited=2, spliced=3, chunk_reused=1, recomputed=4)
    assert (tokens.approximate, tokens.cached, tokens.total) == (6, 11, 15)
    info = ResponseInfo("s", 2, tokens, (DirectiveOutcome(0, Status.NOT_NEEDED, "why", 0),),
                        ("n",), {"windows": 1})  # fmt: skip
    wire = info.to_wire()
    assert wire["exact_kv"] is False and wire["tokens"]["approximate"] == 6
    assert ResponseInfo.from_wire(json.loads(json.dumps(wire))) == info
