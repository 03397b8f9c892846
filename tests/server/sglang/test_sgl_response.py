"""The accounting reaches the client's top-level ``leyline`` object through SGLang's real
OpenAI serving layer (`OpenAIServingChat`: non-streaming response and the final usage chunk of a
stream), with the hooks applied by SGLang's own `HookRegistry`.

Stand-in: the tokenizer manager (it needs a running scheduler); it yields outputs in the shape
SGLang's tokenizer manager produces, with ``meta_info["leyline"]`` as the cache sets it."""

from __future__ import annotations

import asyncio
import json
import sys
from types import SimpleNamespace

import pytest
from _sglang_support import isolate_http_hooks, make_req, require_sglang, set_server_args

require_sglang()

from fastapi.encoders import jsonable_encoder  # noqa: E402
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest  # noqa: E402
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat  # noqa: E402
from sglang.srt.managers.io_struct import GenerateReqInput  # noqa: E402
from sglang.srt.managers.tokenizer_manager import TokenizerManager  # noqa: E402
from sglang.srt.parser.template_manager import TemplateManager  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: E402

from leyline import Accounting  # noqa: E402
from leyline.protocol import DirectiveOutcome, ResponseInfo, Status, TokenCounts  # noqa: E402
from leyline.server.sglang import plugin, response  # noqa: E402
from leyline.server.sglang.cache import LeylineRadixCache  # noqa: E402

WIRE = ResponseInfo(
    "9f1c2a", 3, TokenCounts(exact=512, spliced=270, chunk_reused=8, recomputed=22),
    (DirectiveOutcome(0, Status.APPLIED, None, 270),), ("a note",), {"windows": 1},
).to_wire()  # fmt: skip
DETAILS = {"cached_tokens": 790, "approximate_tokens": 278}  # SGLang's cached_tokens is kept


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> type[HookRegistry]:
    """SGLang's HookRegistry, empty, with every patched target restored afterwards."""
    isolate_http_hooks(monkeypatch)
    return HookRegistry


class FakeTokenizerManager:
    """What OpenAIServingChat reads of SGLang's TokenizerManager; outputs are canned."""

    def __init__(self, outs: list[dict]) -> None:
        self.server_args = set_server_args(enable_cache_report=True)
        hf = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
        self.model_config = SimpleNamespace(
            get_default_sampling_params=dict, hf_config=hf, is_multimodal=False
        )
        self.tokenizer = None
        self.outs = outs

    def config_value(self, name: str) -> object:  # 0.5.23 reads its config through this
        return getattr(self.server_args, name)

    async def _produce(self, obj, request=None):
        for out in self.outs:
            yield out

    def generate_request(self, obj, request=None):
        # The AROUND hook exactly as HookRegistry calls it on TokenizerManager.generate_request.
        return response.around_generate_request(FakeTokenizerManager._produce, self, obj, request)


def _meta(wire, **over) -> dict:
    meta = {"id": "chatcmpl-7", "finish_reason": {"type": "stop"}, "prompt_tokens": 812,
            "completion_tokens": 3, "cached_tokens": 790, "weight_version": "default"}  # fmt: skip
    if wire is not None:
        meta["leyline"] = [json.dumps(wire)]  # per-output-token list, the JSON first
    meta.update(over)
    return meta


def _serving(outs: list[dict]) -> OpenAIServingChat:
    return OpenAIServingChat(FakeTokenizerManager(outs), TemplateManager())


def _request(stream: bool) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return ChatCompletionRequest.model_validate(body)


def test_accounting_from_meta_info_shapes() -> None:
    assert response.accounting_from_meta_info(_meta(WIRE)) == WIRE
    assert response.accounting_from_meta_info({"leyline": [None, json.dumps(WIRE)]}) == WIRE
    assert response.accounting_from_meta_info({"leyline": WIRE}) == WIRE
    assert response.accounting_from_meta_info({"leyline": ["{not json"]}) is None
    assert response.accounting_from_meta_info(_meta(None)) is None
    assert response.accounting_from_meta_info(None) is None


def test_cache_wire_is_what_the_response_carries() -> None:
    """The JSON the cache puts in customized_info parses to the client's Accounting."""
    cache = LeylineRadixCache.create_simulated()
    req = make_req("r", [5, 6, 7, 8], {"session": "s", "version": 1})
    from _sglang_support import match

    match(cache, req)
    meta = _meta(None, leyline=req.customized_info["leyline"])
    wire = response.accounting_from_meta_info(meta)
    assert wire["session"] == "s" and wire["notes"] == []
    assert wire["tokens"] == {"exact": 0, "inherited": 0, "spliced": 0, "chunk_reused": 0,
                              "recomputed": 4, "approximate": 0}  # fmt: skip
    assert ResponseInfo.from_wire(wire).tokens == TokenCounts(recomputed=4)


def test_non_streaming_response_has_top_level_leyline(hooks) -> None:
    assert response.install_http_hooks() == [t for t, _k, _h in response.HOOK_TARGETS]
    assert response.install_http_hooks() == []  # idempotent
    hooks.apply_hooks()
    assert OpenAIServingChat._build_chat_response.__wrapped__ is not None
    assert TokenizerManager.generate_request.__wrapped__ is not None
    out = {"text": "hello", "output_ids": [1, 2, 3], "meta_info": _meta(WIRE), "index": 0}
    serving = _serving([out])
    adapted = GenerateReqInput(input_ids=[1, 2, 3], sampling_params={})
    resp = asyncio.run(serving._handle_non_streaming_request(adapted, _request(False), None))
    body = jsonable_encoder(resp)  # what FastAPI sends for the route's return value
    assert body["leyline"] == WIRE == body["usage"]["leyline"]
    assert body["usage"]["prompt_tokens_details"] == DETAILS
    assert body["choices"][0]["message"]["content"] == "hello"
    acct = Accounting.from_response(body)
    assert (acct.exact, acct.spliced, acct.chunk_reused, acct.recomputed) == (512, 270, 8, 22)
    assert (acct.prompt_tokens, acct.cached_tokens) == (812, 790)


def test_requests_without_accounting_are_unchanged(hooks) -> None:
    response.install_http_hooks()
    hooks.apply_hooks()
    out = {"text": "x", "output_ids": [1], "meta_info": _meta(None), "index": 0}
    adapted = GenerateReqInput(input_ids=[1], sampling_params={})
    resp = asyncio.run(
        _serving([out])._handle_non_streaming_request(adapted, _request(False), None)
    )
    body = jsonable_encoder(resp)
    assert "leyline" not in body and "leyline" not in body["usage"]
    assert body["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 790
    }  # fmt: skip
    chunks = asyncio.run(_collect(_serving([out]), adapted))
    assert all('"leyline"' not in c for c in chunks)


async def _collect(serving: OpenAIServingChat, adapted: GenerateReqInput) -> list[str]:
    return [c async for c in serving._generate_chat_stream(adapted, _request(True), None)]


def test_final_usage_chunk_of_a_stream_has_leyline(hooks) -> None:
    response.install_http_hooks()
    hooks.apply_hooks()
    # SGLang's streamed meta_info carries the accounting in the first chunk only.
    outs = [
        {"text": "hel", "output_ids": [1, 2], "index": 0,
         "meta_info": _meta(WIRE, finish_reason=None, completion_tokens=2)},
        {"text": "hello", "output_ids": [1, 2, 3], "index": 0, "meta_info": _meta(None)},
    ]  # fmt: skip
    adapted = GenerateReqInput(input_ids=[1, 2, 3], sampling_params={}, stream=True)
    chunks = asyncio.run(_collect(_serving(outs), adapted))
    assert chunks[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(c[len("data: ") :]) for c in chunks[:-1]]
    usage = [b for b in bodies if b.get("usage")]
    assert len(usage) == 1 and usage[0]["choices"] == []
    assert usage[0]["leyline"] == WIRE == usage[0]["usage"]["leyline"]
    assert usage[0]["usage"]["prompt_tokens_details"] == DETAILS
    assert all("leyline" not in b for b in bodies if b is not usage[0])
    acct = Accounting.from_response(usage[0])
    assert (acct.spliced, acct.cached_tokens) == (270, 790)


def test_register_installs_hooks_and_defers_routes_until_launch(hooks, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "sglang.srt.entrypoints.http_server", raising=False)
    plugin._register_http()
    target = "sglang.srt.entrypoints.http_server.launch_server"
    assert [(t, h) for t, h, _s in hooks._hooks[target]] == [
        (HookType.BEFORE, plugin._install_routes_before_launch)
    ]
    assert all(t in hooks._hooks for t, _k, _h in response.HOOK_TARGETS)
    plugin._register_http()  # idempotent
    assert len(hooks._hooks[target]) == 1
