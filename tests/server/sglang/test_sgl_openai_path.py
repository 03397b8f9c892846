"""A chat request with a Leyline payload through SGLang's real OpenAI protocol classes, the
msgpack IPC of its SamplingParams, up to the scheduler-side Req and the plugin's parser."""

from __future__ import annotations

import json

import pytest
from _sglang_support import make_req, require_sglang

require_sglang()

import msgspec  # noqa: E402
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from leyline.server.sglang.payload import parse_custom_params, to_custom_params  # noqa: E402

PAYLOAD = {
    "session": "9f1c2a", "version": 3, "base_version": 2,
    "segments": [["a1b2c3d4e5f60718", 812], ["0011223344556677", 95]],
    "directives": [{"start": 4, "end": 5, "replacement": [4, 4], "mode": "amortize"},
                   {"start": 7, "end": 8, "replacement": [6, 7], "mode": "forget"}],
    "content_reuse": True, "approximate": True,
}  # fmt: skip


def _ipc(sp: SamplingParams) -> SamplingParams:
    """The tokenizer -> scheduler hop: SGLang sends SamplingParams as msgpack."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(sp), type=SamplingParams)


def test_payload_arrives_intact_and_flat_at_the_scheduler_req() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        "max_tokens": 8,
        **{"custom_params": to_custom_params(PAYLOAD)},  # what extra_body adds to the JSON body
    }
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    sp_dict = request.to_sampling_params(stop=[], model_generation_config={})
    sp = _ipc(SamplingParams(**sp_dict))
    assert set(sp.custom_params) == {"leyline"} and isinstance(sp.custom_params["leyline"], str)
    req = make_req("r", [5, 6, 7], None)
    req.sampling_params = sp
    opts = parse_custom_params(req.sampling_params.custom_params)
    assert opts is not None
    assert (opts.session, opts.version, opts.base_version) == ("9f1c2a", 3, 2)
    assert opts.modes == ("amortize", "forget") and opts.deletions == (True, False)
    assert json.loads(sp.custom_params["leyline"]) == PAYLOAD


def test_nested_payload_is_what_the_json_string_avoids() -> None:
    nested = SamplingParams(max_new_tokens=1, custom_params={"leyline": PAYLOAD})
    with pytest.raises(msgspec.ValidationError):
        _ipc(nested)


def test_requests_without_payload_parse_to_none() -> None:
    assert parse_custom_params(None) is None
    assert parse_custom_params({"other": 1}) is None
