"""`leyline.wrap` driving a real server through a multi-turn agent conversation with edits.

The agent is scripted (tool calls are simulated in the history; the model's replies are only
read back), the client is the real `openai` client under `leyline.wrap` with a
`TruncateOlderThan` policy, so every turn after the third truncates an old tool output
(an AMORTIZE directive) and appends a new one. Sync, streaming and async requests are mixed.
Prints one line per request and writes the accounting to ``--out`` (JSON).

    python scripts/gpu/wrap_conversation.py --base-url http://127.0.0.1:30000/v1 --out wrap.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from typing import Any

import openai

import leyline
from leyline.middleware import TruncateOlderThan


def _tool_output(rng: random.Random, step: int) -> str:
    lines = [f"step {step} line {i}: value={rng.randint(0, 10**6)} status=ok" for i in range(150)]
    return "\n".join(lines)


def _record(kind: str, step: int, wrapped: Any, usage: Any) -> dict[str, Any]:
    acc = wrapped.last_accounting
    details = getattr(usage, "prompt_tokens_details", None)
    extra = getattr(details, "model_extra", None) or {}
    row = {
        "request": step, "kind": kind, "version": wrapped.session.version,
        "prompt_tokens": getattr(usage, "prompt_tokens", None),
        "cached_tokens": getattr(details, "cached_tokens", None),
        "approximate_tokens": extra.get("approximate_tokens"),
        "accounting": None if acc is None else {
            "exact": acc.exact, "inherited": acc.inherited, "spliced": acc.spliced,
            "chunk_reused": acc.chunk_reused, "recomputed": acc.recomputed,
            "exact_kv": acc.exact_kv,
            "directives": [(d.status.value, d.spliced_tokens) for d in acc.directives],
        },
    }  # fmt: skip
    a = row["accounting"] or {}
    print(
        f"{step:>2} {kind:<6} v{row['version']} prompt={row['prompt_tokens']} "
        f"cached={row['cached_tokens']} approx={row['approximate_tokens']} "
        f"exact={a.get('exact')} inherited={a.get('inherited')} spliced={a.get('spliced')} "
        f"chunk={a.get('chunk_reused')} recomputed={a.get('recomputed')} "
        f"directives={a.get('directives')}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = random.Random(0)
    policy = TruncateOlderThan(n=2, max_chars=200)
    wrapped = leyline.wrap(openai.OpenAI(base_url=args.base_url, api_key="x"), policy=policy)
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a debugging agent. " * 40},
        {"role": "user", "content": "Find the failing test and fix it."},
    ]
    rows = []
    for step in range(1, args.turns + 1):
        kwargs = {"model": args.model, "messages": history, "max_tokens": 8, "temperature": 0}
        if step % 3 == 2:  # streaming: the accounting rides on the final usage chunk
            stream = wrapped.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
            text, usage = "", None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            rows.append(_record("stream", step, wrapped, usage))
        else:
            resp = wrapped.chat.completions.create(**kwargs)
            text, usage = resp.choices[0].message.content or "", resp.usage
            rows.append(_record("sync", step, wrapped, usage))
        call = f"call_{step}"
        history.append({"role": "assistant", "content": text[:40] or None, "tool_calls": [
            {"id": call, "type": "function", "function": {"name": "run", "arguments": "{}"}}]})  # fmt: skip
        history.append({"role": "tool", "tool_call_id": call, "content": _tool_output(rng, step)})

    async def one_async() -> None:
        client = leyline.wrap(openai.AsyncOpenAI(base_url=args.base_url, api_key="x"),
                              policy=policy, session=wrapped.session)  # fmt: skip
        resp = await client.chat.completions.create(
            model=args.model, messages=history, max_tokens=8, temperature=0
        )
        rows.append(_record("async", args.turns + 1, client, resp.usage))

    asyncio.run(one_async())
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "totals": str(wrapped.totals)}, f, indent=1)


if __name__ == "__main__":
    main()
