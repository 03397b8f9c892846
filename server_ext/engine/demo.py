"""``leyline demo``: start the embedded engine and show what an edited history costs.

An agent-like conversation (a task, two long tool outputs, follow-ups) is sent turn by turn
through the real ``openai`` client with a Leyline session. Then the agent truncates the older
tool output (the published ``truncate_older_than`` rule) and sends the edited history three
ways: AMORTIZE (splice the cached suffix), FORGET (re-prefill from the edit, exact), and a plain
client without Leyline (exact-prefix caching only, what SGLang/vLLM do today). The table shows
where each prompt's tokens came from (`leyline.protocol.TokenCounts`) and the time to first
token, measured by the client.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from leyline import Accounting, Session
from leyline.server.engine.config import EngineConfig

HEADER = ["request", "prompt", "exact", "inherited", "spliced", "chunk", "recomputed", "TTFT ms",
          "reply"]  # fmt: skip


def _test_log(module: str, failing: int) -> str:
    lines = [f"tests/{module}.py::test_case_{i:02d} PASSED\n" for i in range(40)]
    lines[failing] = f"tests/{module}.py::test_case_{failing:02d} FAILED - AssertionError\n"
    return "".join(lines)


def _history(agent: str) -> list[dict[str, Any]]:
    system = f"You are {agent}, a careful software engineer. Answer briefly."
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "Run the test suite and tell me what fails."},
        {"role": "assistant", "content": "Running the parser tests first."},
        {"role": "user", "content": "Tool output:\n" + _test_log("test_parser", 17)},
        {"role": "assistant", "content": "Now the lexer tests."},
        {"role": "user", "content": "Tool output:\n" + _test_log("test_lexer", 3)},
        {"role": "assistant", "content": "Two tests fail: parser case 17 and lexer case 3."},
        {"role": "user", "content": "Which file should I open first?"},
    ]


def _truncated(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The published rule: old tool output is cut to 200 characters with a marker."""
    edited = [dict(m) for m in messages]
    edited[3]["content"] = edited[3]["content"][:200] + "\n[... output truncated ...]"
    return edited


def _row(label: str, body: dict[str, Any], ttft_ms: float, text: str) -> list[str]:
    usage = body.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    acc = Accounting.from_response(body)
    if acc is None:  # a plain client: only the exact-prefix hit is reported
        acc = Accounting(exact=cached, recomputed=prompt - cached, prompt_tokens=prompt)
    counts = [acc.exact, acc.inherited, acc.spliced, acc.chunk_reused, acc.recomputed]
    return [label, str(prompt), *map(str, counts), f"{ttft_ms:.0f}", text]


class _Demo:
    def __init__(self, client: Any, model: str, max_tokens: int) -> None:
        self.client = client
        self.model = model
        self.max_tokens = max_tokens
        self.rows: list[list[str]] = []

    def send(
        self,
        label: str,
        session: Session | None,
        messages: list[dict[str, Any]],
        forget: Sequence[int] = (),
    ) -> str:
        prepared = session.prepare(messages, forget=forget) if session is not None else None
        t0 = time.perf_counter()
        ttft: float | None = None
        text = ""
        last: dict[str, Any] = {}
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=0,
            stream=True,
            extra_body=prepared.extra_body() if prepared is not None else None,
        )
        for chunk in stream:
            piece = (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if ttft is None and piece:  # the first generated text, not the role header
                ttft = (time.perf_counter() - t0) * 1000
            text += piece
            last = chunk.model_dump()
        if session is not None and prepared is not None:
            session.commit(prepared)
        self.rows.append(_row(label, last, ttft or 0.0, text.strip().replace("\n", " ")[:36]))
        print(f"  {label}: {ttft or 0.0:.0f} ms to first token", flush=True)
        return text

    def run(self) -> None:
        for name in ("AMORTIZE", "FORGET"):
            session = Session(f"demo-{name.lower()}")
            # each arm is its own agent (own system prompt), so no arm reuses another's cache
            turns = _history("Ada" if name == "AMORTIZE" else "Grace")
            for upto in (2, 4, 6, 8):  # the agent's turns, each one an append
                reply = self.send(f"{name.lower()}: turn {upto // 2}", session, turns[:upto])
                if upto < 8:
                    turns[upto] = {"role": "assistant", "content": reply}
            edited = _truncated(turns)
            if name == "AMORTIZE":
                self.send("AMORTIZE: truncate old output", session, edited)
                # the same edit from a client without Leyline: exact-prefix reuse only
                self.send("no Leyline: same truncation", None, edited)
            else:
                self.send("FORGET: truncate old output", session, edited, forget=[3])

    def table(self) -> str:
        rows = [HEADER, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="leyline demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EngineConfig().model)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)

    import openai

    from leyline.server.engine.server import free_port, serve_in_thread

    cfg = EngineConfig(model=args.model, device=args.device, port=free_port(), kv_tokens=8192)
    print(f"loading {cfg.model} (a first run converts the checkpoint: ~1 min) ...", flush=True)
    with serve_in_thread(cfg) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="demo", max_retries=0)
        print(f"engine up at {srv.base_url} ({srv.engine.rope_note or 'splicing on'})\n")
        demo = _Demo(client, cfg.model, args.max_tokens)
        demo.run()
    print("\n" + demo.table())
    print(
        "\nAMORTIZE keeps the cached suffix after the edit and only rotates its RoPE part;"
        "\nFORGET re-prefills from the edit (exact); a plain client re-prefills as well."
        "\ninherited: a cached prefix whose KV descends from an earlier splice or chunk copy"
        "\n(approximate, like spliced and chunk); exact: KV equal to a fresh prefill."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
