"""Time to first token after an edit: AMORTIZE vs FORGET vs exact-prefix vs a cold prefill.

The workload of BRIEF §6: an agent history of ``--prefix`` tokens, one tool output of
``--edit`` tokens, then ``--suffix`` tokens of later turns. The agent deletes the old tool output
and asks a new ``--new``-token question. Four arms, each on its own cache-isolated history (a
per-arm, per-repeat tag in every message):

- ``amortize``: a Leyline session; the deletion directive splices the cached suffix;
- ``forget``: the same directive in FORGET mode (exact re-prefill from the edit);
- ``exact``: a plain OpenAI client, exact-prefix caching only (SGLang/vLLM today);
- ``cold``: the edited prompt with nothing cached (a full re-prefill).

TTFT is measured twice: by the engine (queue to first sampled token, ``leyline.ttft_ms``; the
plain arms read it from ``/metrics``-free timing: the engine's ``Finished`` record via an
observer) and by the client (request sent to first streamed text, which adds HTTP and chat
template tokenization). Ratios are taken within one run.

    python benchmarks/engine_ttft.py                                   # CPU, tiny model, small
    python benchmarks/engine_ttft.py --model random-llama-3.1-8b --device cuda \\
        --prefix 512 --edit 1024 --suffix 16384 --new 256 --repeats 3 --out results/
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import openai
import torch

from leyline import Mode, Session
from leyline.server.engine.config import EngineConfig
from leyline.server.engine.server import free_port, serve_in_thread

ARMS = ("amortize", "forget", "exact", "cold")


def _text(tokenizer: Any, tag: str, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of log-like text, unique to ``tag``."""
    line = f"[{tag}] worker=7 step=%d loss=0.%04d grad_norm=1.%03d status=ok\n"
    per_line = len(tokenizer.encode(line % (1, 1, 1), add_special_tokens=False))
    return "".join(
        line % (i, i * 37 % 10000, i % 1000) for i in range(max(1, n_tokens // per_line))
    )


def _history(tokenizer: Any, tag: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": f"Agent {tag}.\n" + _text(tokenizer, tag + "p", args.prefix)},
        {"role": "user", "content": "Run the job and report."},
        {"role": "assistant", "content": "Running it."},
        {"role": "user", "content": _text(tokenizer, tag + "e", args.edit)},  # deleted later
    ]
    turns = max(1, args.suffix // 2048)
    for t in range(turns):
        msgs.append({"role": "assistant", "content": f"Step {t} looks fine, continuing."})
        msgs.append(
            {"role": "user", "content": _text(tokenizer, f"{tag}s{t}", args.suffix // turns)}
        )
    return msgs


def _request(
    client: openai.OpenAI, model: str, messages: list[dict[str, Any]], extra: dict[str, Any] | None
) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    ttft = None
    last: dict[str, Any] = {}
    stream = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=2,
        temperature=0,
        stream=True,
        extra_body=extra,
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        last = chunk.model_dump()
    return (ttft if ttft is not None else time.perf_counter() - t0) * 1000, last


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--device", default="auto")
    p.add_argument("--prefix", type=int, default=256)
    p.add_argument("--edit", type=int, default=256)
    p.add_argument("--suffix", type=int, default=2048)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    cfg = EngineConfig(
        model=args.model,
        device=args.device,
        port=free_port(),
        kv_tokens=4 * (args.prefix + args.edit + args.suffix + args.new) + 4096,
        content_reuse=False,  # this benchmark isolates splicing
    )
    records: list[dict[str, Any]] = []
    with serve_in_thread(cfg) as srv:
        engine_ttft: list[float] = []
        srv.engine.observers.append(lambda done: engine_ttft.append(done.ttft_s * 1000))
        tok = srv.engine.loaded.tokenizer
        client = openai.OpenAI(base_url=srv.base_url, api_key="bench", max_retries=0)
        # warm-up: compile kernels, allocate, first-call overheads
        warm = _history(tok, "warmup", args)
        _request(client, srv.model, warm, None)
        _request(client, srv.model, warm[:3] + warm[4:], None)
        for rep in range(args.repeats):
            for arm in ARMS:
                tag = f"{arm}{rep}"
                history = _history(tok, tag, args)
                new_turn = {
                    "role": "user",
                    "content": "Question: " + _text(tok, tag + "q", args.new),
                }
                edited = history[:3] + history[4:] + [new_turn]
                session = Session(f"bench-{tag}")
                if arm != "cold":
                    prepared = session.prepare(history)
                    extra = prepared.extra_body() if arm in ("amortize", "forget") else None
                    _request(client, srv.model, history, extra)
                    if arm in ("amortize", "forget"):
                        session.commit(prepared)
                extra = None
                if arm in ("amortize", "forget"):
                    mode = Mode.FORGET if arm == "forget" else Mode.AMORTIZE
                    prepared = session.prepare(edited, default_mode=mode)
                    extra = prepared.extra_body()
                client_ms, last = _request(client, srv.model, edited, extra)
                usage = last.get("usage") or {}
                tokens = (last.get("leyline") or {}).get("tokens") or {}
                records.append(
                    {
                        "arm": arm,
                        "repeat": rep,
                        "prompt_tokens": usage.get("prompt_tokens"),
                        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get(
                            "cached_tokens"
                        ),
                        "tokens": tokens,
                        "engine_ttft_ms": engine_ttft[-1],
                        "timings_ms": (last.get("leyline") or {}).get("timings_ms"),
                        "client_ttft_ms": client_ms,
                    }
                )
                print(json.dumps(records[-1]), flush=True)

    summary = {}
    for arm in ARMS:
        rows = [r for r in records if r["arm"] == arm]
        summary[arm] = {
            "engine_ttft_ms": statistics.median(r["engine_ttft_ms"] for r in rows),
            "client_ttft_ms": statistics.median(r["client_ttft_ms"] for r in rows),
            "prompt_tokens": rows[-1]["prompt_tokens"],
            "cached_tokens": rows[-1]["cached_tokens"],
        }
    cold = summary["cold"]["engine_ttft_ms"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    print(
        f"\nmodel {args.model} on {device}; prefix {args.prefix}, edit {args.edit}, "
        f"suffix {args.suffix}, new {args.new}; median of {args.repeats}"
    )
    print(
        f"{'arm':<10}{'prompt':>8}{'cached':>8}{'engine TTFT ms':>16}{'client TTFT ms':>16}"
        f"{'cold/arm':>10}"
    )
    for arm, s in summary.items():
        print(
            f"{arm:<10}{s['prompt_tokens']:>8}{s['cached_tokens']:>8}"
            f"{s['engine_ttft_ms']:>16.1f}{s['client_ttft_ms']:>16.1f}"
            f"{cold / s['engine_ttft_ms']:>10.1f}"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_ttft.json").write_text(
            json.dumps(
                {
                    "args": vars(args) | {"out": str(args.out)},
                    "device": device,
                    "summary": summary,
                    "records": records,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
