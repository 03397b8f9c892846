"""``leyline demo``: start the embedded engine and show what an edited history costs.

An agent-like conversation (system prompt, a task, a long tool output, follow-ups) is sent turn
by turn through the real ``openai`` client with a Leyline session. Then the agent truncates the
old tool output (the published ``truncate_older_than`` rule) and sends the edited history three
ways: AMORTIZE (splice), FORGET (re-prefill from the edit), and a plain client without Leyline
(exact-prefix caching only, like SGLang/vLLM today). The table shows where each prompt's tokens
came from and the time to first token.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from leyline import Accounting, Session
from leyline.server.engine.config import EngineConfig

_TOOL_OUTPUT = (
    "".join(
        f"tests/test_module_{i:02d}.py::test_case_{j} PASSED\n" for i in range(12) for j in range(4)
    )
    + "tests/test_parser.py::test_unicode FAILED - AssertionError: 'é' != 'e'\n"
)


def _history() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are a careful software engineer. Answer briefly."},
        {"role": "user", "content": "Run the test suite and tell me what fails."},
        {"role": "assistant", "content": "Running pytest."},
        {"role": "user", "content": f"Tool output:\n{_TOOL_OUTPUT}"},
        {"role": "assistant", "content": "One test fails: test_unicode in tests/test_parser.py."},
        {"role": "user", "content": "Which file should I open to fix it?"},
    ]


def _truncated(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    edited = [dict(m) for m in messages]
    edited[3]["content"] = edited[3]["content"][:200] + "\n[... output truncated ...]"
    return edited


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _row(label: str, acc: Accounting | None, ttft_ms: float, text: str) -> list[str]:
    if acc is None:
        return [label, "-", "-", "-", "-", "-", f"{ttft_ms:8.0f}", text]
    return [
        label,
        str(acc.exact + acc.spliced + acc.chunk_reused + acc.recomputed),
        str(acc.exact),
        str(acc.spliced),
        str(acc.chunk_reused),
        str(acc.recomputed),
        f"{ttft_ms:8.0f}",
        text,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="leyline demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EngineConfig().model)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)

    import openai
    import uvicorn

    from leyline.server.engine.server import build_server

    port = _free_port()
    cfg = EngineConfig(model=args.model, device=args.device, port=port, kv_tokens=8192)
    print(f"loading {cfg.model} (first run converts the checkpoint; ~30 s) ...", flush=True)
    engine, app = build_server(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="demo")
    print(f"engine up at {base_url} ({engine.rope_note or 'splicing on'})\n", flush=True)

    rows: list[list[str]] = []

    def send(
        label: str,
        session: Session | None,
        messages: list[dict[str, Any]],
        forget: Sequence[int] = (),
    ) -> str:
        extra = None
        prepared = None
        if session is not None:
            prepared = session.prepare(messages, forget=forget)
            extra = prepared.extra_body()
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model=cfg.model,
            messages=messages,
            max_tokens=args.max_tokens,
            temperature=0,  # type: ignore[arg-type]
            extra_body=extra,
        )
        elapsed = (time.perf_counter() - t0) * 1000
        body = r.model_dump()
        if session is not None and prepared is not None:
            session.commit(prepared)
        acc = Accounting.from_response(body)
        ttft = float((body.get("leyline") or {}).get("ttft_ms", elapsed))
        text = (r.choices[0].message.content or "").strip().replace("\n", " ")[:40]
        rows.append(_row(label, acc, ttft, text))
        print(f"  {label}: done", flush=True)
        return r.choices[0].message.content or ""

    try:
        history = _history()
        arms = {"amortize": Session("demo-amortize"), "forget": Session("demo-forget")}
        for name, session in arms.items():
            turns = history[:2]
            reply = send(f"{name}: turn 1", session, turns)
            turns = history[:4]
            turns[2] = {"role": "assistant", "content": reply}
            send(f"{name}: turn 2 (tool output)", session, turns)
            full = history[:]
            full[2] = turns[2]
            send(f"{name}: turn 3", session, full)
            edited = _truncated(full)
            if name == "amortize":
                send("AMORTIZE: truncate old output", session, edited)
            else:
                send("FORGET: truncate old output", session, edited, forget=[3])
        send("no Leyline: truncated history", None, _truncated(full))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()

    header = ["request", "prompt", "exact", "spliced", "chunk", "recomputed", "ttft_ms", "reply"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(
        "\nAMORTIZE keeps the cached suffix after the edit (rotating only its RoPE part);"
        "\nFORGET re-prefills from the edit (exact); a plain client re-prefills as well."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
