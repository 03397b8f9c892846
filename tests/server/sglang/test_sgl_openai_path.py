"""A chat request with a Leyline payload through SGLang's real OpenAI protocol classes: the
msgpack IPC of its SamplingParams up to the scheduler-side Req and `leyline.protocol.Payload`,
and malformed payloads answered 400 by SGLang's real `OpenAIServingChat` /
`OpenAIServingCompletion` through the plugin's ``_validate_request`` hook."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from _sglang_support import isolate_http_hooks, make_req, require_sglang, set_server_args

require_sglang()

import msgspec  # noqa: E402
from sglang.srt.entrypoints.openai.protocol import (  # noqa: E402
    ChatCompletionRequest,
    CompletionRequest,
)
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat  # noqa: E402
from sglang.srt.entrypoints.openai.serving_completions import (  # noqa: E402
    OpenAIServingCompletion,
)
from sglang.srt.parser.template_manager import TemplateManager  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from leyline.directives import Mode  # noqa: E402
from leyline.errors import PayloadError  # noqa: E402
from leyline.protocol import Payload  # noqa: E402
from leyline.server.sglang import response  # noqa: E402

PAYLOAD = {
    "session": "9f1c2a", "version": 3, "base_version": 2,
    "segments": [["a1b2c3d4e5f60718", 812], ["0011223344556677", 95]],
    "directives": [{"start": 4, "end": 5, "replacement": [1, 1], "mode": "amortize"},
                   {"start": 7, "end": 8, "replacement": [1, 2], "mode": "forget"}],
    "content_reuse": True, "approximate": True,
}  # fmt: skip
GOOD = {"session": "s", "version": 1}
MALFORMED = {
    "non-JSON string": "{not json",
    "unknown field": json.dumps({**GOOD, "sesion": "s"}),
    "bad mode": json.dumps({**GOOD, "version": 2, "base_version": 1, "segments": [["0" * 16, 3]],
                            "directives": [{"start": 0, "end": 1, "replacement": [0, 1],
                                            "mode": "compress"}]}),
    "version 0": json.dumps({**GOOD, "version": 0}),
    "negative window": json.dumps({**GOOD, "version": 2, "base_version": 1,
                                   "segments": [["0" * 16, 3]],
                                   "directives": [{"start": 0, "end": 1, "replacement": [0, 1],
                                                   "mode": "repair", "window": -1}]}),
    "window on amortize": json.dumps({**GOOD, "version": 2, "base_version": 1,
                                      "segments": [["0" * 16, 3]],
                                      "directives": [{"start": 0, "end": 1, "replacement": [0, 1],
                                                      "mode": "amortize", "window": 8}]}),
    "server-diff window not an integer": json.dumps({"session": "s", "mode": "repair",
                                                     "window": "64"}),
    "directives without base_version": json.dumps(
        {**GOOD, "segments": [["0" * 16, 3]],
         "directives": [{"start": 0, "end": 1, "replacement": [0, 1]}]}),
}  # fmt: skip


def _ipc(sp: SamplingParams) -> SamplingParams:
    """The tokenizer -> scheduler hop: SGLang sends SamplingParams as msgpack."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(sp), type=SamplingParams)


def _chat(custom_params: dict | None, **over) -> ChatCompletionRequest:
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        "max_tokens": 8,
        **({"custom_params": custom_params} if custom_params is not None else {}),
        **over,
    }
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def test_payload_arrives_intact_and_flat_at_the_scheduler_req() -> None:
    sent = Payload.from_wire(PAYLOAD)
    request = _chat(sent.to_custom_params())  # what extra_body adds to the JSON body
    sp_dict = request.to_sampling_params(stop=[], model_generation_config={})
    sp = _ipc(SamplingParams(**sp_dict))
    assert set(sp.custom_params) == {"leyline"} and isinstance(sp.custom_params["leyline"], str)
    req = make_req("r", [5, 6, 7], None)
    req.sampling_params = sp
    got = Payload.from_custom_params(req.sampling_params.custom_params)
    assert got == sent
    assert (got.session, got.version, got.base_version) == ("9f1c2a", 3, 2)
    assert got.modes == (Mode.AMORTIZE, Mode.FORGET) and got.forgets
    assert json.loads(sp.custom_params["leyline"]) == sent.to_wire()


def test_nested_payload_is_what_the_json_string_avoids() -> None:
    nested = SamplingParams(max_new_tokens=1, custom_params={"leyline": PAYLOAD})
    with pytest.raises(msgspec.ValidationError):
        _ipc(nested)


def test_requests_without_payload_parse_to_none() -> None:
    assert Payload.from_custom_params(None) is None
    assert Payload.from_custom_params({"other": 1}) is None
    assert response.validate_payload(None, None, _chat(None)) is None
    assert response.validate_payload(None, None, _chat({"leyline": json.dumps(GOOD)})) is None


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payload_is_the_hooks_error_message(raw: str) -> None:
    with pytest.raises(PayloadError) as exc:
        Payload.from_custom_params({"leyline": raw})
    assert response.validate_payload(None, None, _chat({"leyline": raw})) == str(exc.value)
    # SGLang's own verdict stands.
    assert (
        response.validate_payload("Messages cannot be empty.", None, _chat({"leyline": raw}))
        is None
    )


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> type[HookRegistry]:
    """The plugin's HTTP hooks applied by SGLang's HookRegistry, undone afterwards."""
    isolate_http_hooks(monkeypatch)
    response.install_http_hooks()
    HookRegistry.apply_hooks()
    return HookRegistry


def _manager() -> SimpleNamespace:
    """What the serving classes read of SGLang's TokenizerManager before validating (0.5.23
    also reads its ``config_value`` and the process's published config)."""
    hf = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
    args = set_server_args()
    return SimpleNamespace(
        server_args=args, tokenizer=None, config_value=lambda name: getattr(args, name),
        model_config=SimpleNamespace(
            get_default_sampling_params=dict, hf_config=hf, is_multimodal=False
        ),
    )  # fmt: skip


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payload_is_a_400_from_sglangs_serving_classes(hooks, raw: str) -> None:
    with pytest.raises(PayloadError) as exc:
        Payload.from_custom_params({"leyline": raw})
    want = str(exc.value)
    chat = OpenAIServingChat(_manager(), TemplateManager())
    resp = asyncio.run(chat.handle_request(_chat({"leyline": raw}), None))
    assert resp.status_code == 400
    body = json.loads(resp.body)
    assert body["message"] == want and body["object"] == "error"
    completion = OpenAIServingCompletion(_manager(), None)
    request = CompletionRequest(model="m", prompt="hi", custom_params={"leyline": raw})
    resp = asyncio.run(completion.handle_request(request, None))
    assert resp.status_code == 400 and json.loads(resp.body)["message"] == want
    # SGLang's own validation still runs first.
    resp = asyncio.run(chat.handle_request(_chat({"leyline": raw}, messages=[]), None))
    assert json.loads(resp.body)["message"] == "Messages cannot be empty."
