"""``leyline.wrap`` (the real ``openai`` client, sync, streaming and async) against SGLang's
real OpenAI serving layer (0.5.16 and 0.5.23) over real HTTP.

Served by uvicorn on 127.0.0.1 (a free port, background thread): a FastAPI app whose
``/v1/chat/completions`` route is SGLang's own (``http_server.openai_v1_chat_completions``:
body validated into `ChatCompletionRequest`, then ``OpenAIServingChat.handle_request``), plus
the plugin's ``/v1/leyline`` routes. `OpenAIServingChat` is SGLang's, with the plugin's hooks
(`response.install_http_hooks`, what ``plugin.register`` installs in the HTTP process) applied
by SGLang's `HookRegistry`, and its template path is SGLang's `TemplateManager` over a real
``transformers`` tokenizer (byte-level, built here: no download).

Stand-in: SGLang's TokenizerManager (it needs a running scheduler). `StandInTokenizerManager`
records every `GenerateReqInput`, reads the Leyline payload the way the scheduler will
(``Payload.from_custom_params(sampling_params["custom_params"])``) and answers with canned
accounting in ``meta_info["leyline"]`` (`canned_info`), in the output shapes SGLang's tokenizer
manager produces for non-streaming and streaming requests.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from _sglang_support import isolate_http_hooks, require_sglang, set_server_args

require_sglang()

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest  # noqa: E402
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat  # noqa: E402
from sglang.srt.managers.io_struct import GenerateReqInput  # noqa: E402
from sglang.srt.parser.template_manager import TemplateManager  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import leyline  # noqa: E402
from leyline import Accounting  # noqa: E402
from leyline.directives import Mode  # noqa: E402
from leyline.errors import PayloadError  # noqa: E402
from leyline.middleware import TruncateOlderThan  # noqa: E402
from leyline.protocol import (  # noqa: E402
    DirectiveOutcome,
    Payload,
    ResponseInfo,
    Status,
    TokenCounts,
)
from leyline.server.sglang import response, routes  # noqa: E402

MODEL = "dummy"
_TM_GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
# ChatML with tool calls; the stand-in tokenizer is byte-level, so prompts decode exactly.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>\n{% endfor %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REPLY = "Reading the next file."


def canned_info(payload: Payload) -> ResponseInfo:
    """The stand-in's accounting, a function of the payload only (canned, not a cache's):
    exact = 10 * version, spliced = 3 per directive (each APPLIED), recomputed = 7."""
    n = len(payload.directives)
    return ResponseInfo(
        session=payload.session,
        version=payload.version,
        tokens=TokenCounts(exact=10 * payload.version, spliced=3 * n, recomputed=7),
        directives=tuple(DirectiveOutcome(i, Status.APPLIED, None, 3) for i in range(n)),
    )


def canned_accounting(payload: Payload) -> Accounting:
    """What the client should read for ``payload``: the canned tokens, and SGLang's usage
    (prompt_tokens, cached_tokens) as the stand-in reports them in meta_info."""
    tokens = canned_info(payload).tokens
    return Accounting.from_info(
        canned_info(payload), prompt_tokens=tokens.total, cached_tokens=tokens.cached
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real ``transformers`` fast tokenizer, one token per UTF-8 byte, with `CHAT_TEMPLATE`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE)


class StandInTokenizerManager:
    """Stand-in for SGLang's TokenizerManager: what `OpenAIServingChat` reads of it, and
    ``generate_request`` yielding canned outputs in the tokenizer manager's shapes."""

    def __init__(self) -> None:
        self.server_args = set_server_args(model_path=MODEL, enable_cache_report=True)
        hf = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
        self.model_config = SimpleNamespace(
            get_default_sampling_params=dict, hf_config=hf, is_multimodal=False
        )
        self.tokenizer = byte_tokenizer()
        self.processor = None
        self.request_logger = SimpleNamespace(log_requests=False, log_requests_level=0)
        self.received: list[GenerateReqInput] = []
        self.payloads: list[Payload | None] = []

    def config_value(self, name: str) -> Any:  # 0.5.23 reads its config through this
        return getattr(self.server_args, name)

    def create_abort_task(self, obj: GenerateReqInput) -> None:
        return None  # the real one aborts the scheduler request on disconnect

    async def _outputs(self, obj: GenerateReqInput, request: Any = None) -> AsyncIterator[dict]:
        self.received.append(obj)
        # The scheduler reads the payload from the flat custom_params of the sampling params.
        payload = Payload.from_custom_params(obj.sampling_params.get("custom_params"))
        self.payloads.append(payload)
        rid = f"chatcmpl-{len(self.received)}"
        meta = {"id": rid, "finish_reason": {"type": "stop"}, "completion_tokens": 2,
                "weight_version": "default"}  # fmt: skip
        if payload is not None:
            info = canned_info(payload)
            meta["prompt_tokens"] = info.tokens.total
            meta["cached_tokens"] = info.tokens.cached
            # customized_info is per output token: the JSON sits in the first entry.
            meta["leyline"] = [json.dumps(info.to_wire())]
        if not obj.stream:
            yield {"text": REPLY, "output_ids": [1, 2], "meta_info": meta, "index": 0}
            return
        # Streamed meta_info carries customized_info in the first chunk only.
        first = {**meta, "finish_reason": None, "completion_tokens": 1}
        yield {"text": REPLY[:7], "output_ids": [1], "meta_info": first, "index": 0}
        rest = {k: v for k, v in meta.items() if k != "leyline"}
        yield {"text": REPLY, "output_ids": [1, 2], "meta_info": rest, "index": 0}

    def generate_request(self, obj: GenerateReqInput, request: Any = None) -> AsyncIterator:
        # The AROUND hook HookRegistry applies to TokenizerManager.generate_request, called
        # as the registry's wrapper calls it (the stand-in is not a TokenizerManager).
        return response.around_generate_request(
            StandInTokenizerManager._outputs, self, obj, request
        )


async def openai_v1_chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Any:
    """SGLang's ``http_server.openai_v1_chat_completions`` (its content-type check
    dependency is left out: the openai client always sends JSON)."""
    return await raw_request.app.state.openai_serving_chat.handle_request(request, raw_request)


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The plugin's HTTP hooks applied by SGLang's HookRegistry; the registry's table and every
    patched target are restored afterwards. Returns the targets registered."""
    isolate_http_hooks(monkeypatch)
    installed = response.install_http_hooks()
    HookRegistry.apply_hooks()
    return installed


@dataclass
class Server:
    base_url: str
    manager: StandInTokenizerManager


@pytest.fixture
def server(hooks: list[str]) -> Iterator[Server]:
    """The app on uvicorn in a background thread; stopped (and joined) at teardown."""
    # The stand-in mirrors a hook the plugin really registers on the real class.
    assert _TM_GENERATE in hooks
    manager = StandInTokenizerManager()
    templates = TemplateManager()
    templates.load_chat_template(manager, None, MODEL)  # SGLang's HF-template fallback
    app = FastAPI()
    app.state.openai_serving_chat = OpenAIServingChat(manager, templates)
    app.add_api_route("/v1/chat/completions", openai_v1_chat_completions, methods=["POST"])
    assert routes.install_routes(app)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="uvicorn-sgl-wrap", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            uv.should_exit = True
            pytest.fail("uvicorn did not start")
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}/v1", manager)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "uvicorn thread did not stop"


def _tool_turn(k: int, name: str) -> list[dict[str, Any]]:
    """The agent's scripted tool call after a reply, and the tool's long output."""
    call = {"id": f"call_{k}", "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps({"path": name})}}  # fmt: skip
    output = f"# {name}\n" + "".join(f"line {i} of {name}\n" for i in range(12))
    return [
        {"role": "assistant", "content": REPLY, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"call_{k}", "content": output},
    ]


def _check_arrival(server: Server, sent: Payload, k: int) -> Payload:
    """Request ``k`` (1-based) reached the stand-in with ``sent``, intact and flat."""
    assert len(server.manager.received) == k
    obj, got = server.manager.received[-1], server.manager.payloads[-1]
    assert set(obj.sampling_params["custom_params"]) == {"leyline"}
    assert got == sent
    assert got.version == k and got.base_version == (k - 1 or None)
    return got


def test_wrap_conversation_through_sglang_serving(server: Server) -> None:
    policy = TruncateOlderThan(n=1, max_chars=20)
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    wrapped = leyline.wrap(client, policy=policy)
    session = wrapped.session
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a careful coding agent."},
        {"role": "user", "content": "Find the bug in the parser."},
    ]
    expected: list[Accounting] = []

    def planned() -> Payload:
        # What the wrapper will send for this history (plan() is pure: nothing is committed).
        prepared = wrapped.conversation.plan({"model": MODEL, "messages": history}).prepared
        assert prepared is not None
        return prepared.to_payload()

    # Three sync turns: the third is the first whose history the policy truncates.
    names = ["parser.py", "lexer.py", "tokens.py"]
    for k, name in enumerate(names, start=1):
        sent = planned()
        reply = wrapped.chat.completions.create(model=MODEL, messages=history)
        got = _check_arrival(server, sent, k)
        assert reply.choices[0].message.content == REPLY
        assert reply.model_dump().get("leyline") == canned_info(got).to_wire()
        expected.append(canned_accounting(got))
        assert wrapped.last_accounting == expected[-1]
        assert wrapped.totals.requests == k
        assert session.version == k
        assert tuple((s.hash, s.chars) for s in session.base_segments) == got.segments
        # The prompt SGLang rendered holds the latest tool output in full, older ones cut.
        prompt = server.manager.tokenizer.decode(server.manager.received[-1].input_ids)
        assert prompt.endswith("<|im_start|>assistant\n")
        assert k == 1 or f"line 11 of {names[k - 2]}" in prompt
        assert prompt.count("[... truncated]") == max(k - 2, 0)
        if k < 3:
            assert got.directives == ()
        else:  # parser.py's output is older than the last turn: cut, sent as AMORTIZE
            assert got.directives and {d.mode for d in got.directives} == {Mode.AMORTIZE}
            assert "line 11 of parser.py" not in prompt
        history += _tool_turn(k, name)

    # One streaming turn: the accounting is read from the final usage chunk.
    sent = planned()
    assert sent.directives
    stream = wrapped.chat.completions.create(
        model=MODEL, messages=history, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    got = _check_arrival(server, sent, 4)
    assert server.manager.received[-1].stream
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].choices == []
    assert usage[0].model_dump().get("leyline") == canned_info(got).to_wire()
    expected.append(canned_accounting(got))
    assert Accounting.from_response(usage[0].model_dump()) == expected[-1]
    assert wrapped.last_accounting == expected[-1]
    assert wrapped.totals.requests == 4
    assert wrapped.totals == sum(expected, Accounting.zero())
    assert session.version == 4
    history += _tool_turn(4, "ast.py")

    # One async turn: AsyncOpenAI wrapped over the same session (and policy).
    async def async_turn() -> tuple[Payload, Any, Any]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="x", max_retries=0
        ) as aclient:
            awrapped = leyline.wrap(aclient, policy=policy, session=session)
            prepared = awrapped.conversation.plan({"model": MODEL, "messages": history}).prepared
            assert prepared is not None
            reply = await awrapped.chat.completions.create(model=MODEL, messages=history)
            return prepared.to_payload(), reply, awrapped

    sent, reply, awrapped = asyncio.run(async_turn())
    assert sent.directives
    got = _check_arrival(server, sent, 5)
    assert got.session == session.id and session.version == 5
    assert reply.model_dump().get("leyline") == canned_info(got).to_wire()
    assert awrapped.last_accounting == canned_accounting(got)
    assert awrapped.totals.requests == 1 and wrapped.totals.requests == 4
    assert {p.session for p in server.manager.payloads} == {session.id}


def test_malformed_payload_is_a_400_from_sglangs_serving_layer(server: Server) -> None:
    if getattr(response, "validate_payload", None) is None or not any(
        t.endswith("OpenAIServingChat._validate_request") for t, _k, _h in response.HOOK_TARGETS
    ):
        pytest.skip("the plugin registers no _validate_request hook yet")
    with pytest.raises(PayloadError) as want:
        Payload.from_custom_params({"leyline": "{bad"})
    plain = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        plain.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"custom_params": {"leyline": "{bad"}},
        )
    assert exc.value.status_code == 400
    assert exc.value.body["message"] == str(want.value)
    assert server.manager.received == []  # refused before the tokenizer manager


def test_leyline_info_route(server: Server) -> None:
    resp = httpx.get(f"{server.base_url}/leyline/info", timeout=5)
    if resp.status_code == 404:
        pytest.skip("the plugin's routes have no GET /v1/leyline/info yet")
    assert resp.status_code == 200
    assert resp.json()["server"] == "sglang"
