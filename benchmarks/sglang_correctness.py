"""Correctness of the leyline backend on the REAL SGLang server, with a model whose outputs react
to its KV (scripts/gpu/make_random_model.py: seeded normal weights, not ``--load-format dummy``).

Run against a server started with ``--radix-cache-backend leyline`` and
``LEYLINE_SGLANG_VERIFY_SPLICES=1`` (every spliced row is checked against the core's torch
``rotate`` of its donor, inside the scheduler). For each edit case of benchmarks/sglang_server.py
(on a ~6K-token conversation) it compares greedy 24-token replies:

- FORGET vs a fresh server (``/flush_cache``, then the edited prompt as a plain request) and vs
  SGLang's own prefix-cached path (plain base, then plain edited request): FORGET must be exact,
  and its accounting must say so (``exact_kv``: no inherited, spliced or chunk-reused token);
- AMORTIZE (spliced, windows) vs the fresh answer: measured (first token, full reply, first
  divergence), never asserted;
- a plain request without a payload before, during and after all this: unchanged.

    python benchmarks/sglang_correctness.py --out correctness.json
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sglang_server import CASES, Runner, Shape, Texts, conversation, edit, extend

SHAPE = Shape(system=1024, first_output=512, other_outputs=768, outputs=6, turn=128)


class Client(Runner):
    """The benchmark's runner plus greedy replies as tokens and ``/flush_cache``."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url, leyline=True)
        self.root = base_url.rsplit("/v1", 1)[0]

    def ask(self, msgs: list[dict], session: Any = None, mode: str = "amortize") -> dict:
        _, body = self.chat(msgs, session, mode, max_tokens=24, logprobs=True)
        tokens = [t["token"] for t in body["choices"][0]["logprobs"]["content"]]
        return {"tokens": tokens, "leyline": body.get("leyline")}

    def flush(self) -> None:
        req = urllib.request.Request(self.root + "/flush_cache", method="POST")
        urllib.request.urlopen(req, timeout=60).read()


def divergence(a: list[str], b: list[str]) -> int | None:
    """First index where two replies differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    ap.add_argument("--tokenizer", type=Path,
                    default=Path("/tmp/models/random-llama/tokenizer.json"))  # fmt: skip
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from leyline import Session

    texts = Texts(args.tokenizer)
    c = Client(args.base_url)
    probe = extend(conversation(texts, 999, SHAPE), texts, 999, SHAPE)
    plain0 = c.ask(probe)["tokens"]
    rows = []
    for rep in range(args.reps):
        for case in CASES:
            seed = 100 + rep
            base = conversation(texts, seed, SHAPE)
            edited = extend(edit(case, base), texts, seed, SHAPE)
            c.flush()
            c.ask(base)
            radix = c.ask(edited)["tokens"]  # SGLang's own prefix-cached path
            c.flush()
            fresh = c.ask(edited)["tokens"]
            row: dict[str, Any] = {"case": case, "seed": seed, "fresh": fresh, "radix": radix}
            for mode in ("forget", "amortize"):
                c.flush()  # nothing of the plain requests above may serve the session
                s = Session(f"check-{case}-{mode}-{seed}")
                c.ask(base, s, mode)
                got = c.ask(edited, s, mode)
                row[mode] = got["tokens"]
                row[f"{mode}_leyline"] = got["leyline"]
                row[f"{mode}_vs_fresh"] = divergence(got["tokens"], fresh)
                row[f"{mode}_vs_radix"] = divergence(got["tokens"], radix)
            row["radix_vs_fresh"] = divergence(radix, fresh)
            rows.append(row)
            print(f"{case:10s} seed {seed}: forget vs fresh {row['forget_vs_fresh']}, "
                  f"vs radix {row['forget_vs_radix']}; amortize vs fresh "
                  f"{row['amortize_vs_fresh']}; radix vs fresh {row['radix_vs_fresh']}; "
                  f"tokens {json.dumps((row['amortize_leyline'] or {}).get('tokens'))} "
                  f"checks {json.dumps((row['amortize_leyline'] or {}).get('splice_checks'))}",
                  flush=True)  # fmt: skip
    plain1 = c.ask(probe)["tokens"]
    c.flush()
    plain2 = c.ask(probe)["tokens"]
    summary = {
        "cases": len(rows),
        "forget_equal_fresh": sum(r["forget_vs_fresh"] is None for r in rows),
        "forget_equal_radix": sum(r["forget_vs_radix"] is None for r in rows),
        "forget_reported_exact": sum(
            (r["forget_leyline"] or {}).get("exact_kv") is True for r in rows
        ),
        "amortize_reported_approximate": sum(
            (r["amortize_leyline"] or {}).get("exact_kv") is False for r in rows
        ),
        "radix_equal_fresh": sum(r["radix_vs_fresh"] is None for r in rows),
        "amortize_equal_fresh": sum(r["amortize_vs_fresh"] is None for r in rows),
        "amortize_first_token_equal": sum(r["amortize_vs_fresh"] != 0 for r in rows),
        "plain_unchanged": plain1 == plain0,
        "plain_cold_repeat_equal": plain2 == plain0,  # SGLang's own run-to-run determinism
        "splice_rows_checked": max(
            ((r["amortize_leyline"] or {}).get("splice_checks") or {}).get("rows", 0) for r in rows
        ),
        "splice_max_abs_err": max(
            ((r["amortize_leyline"] or {}).get("splice_checks") or {}).get("max_abs_err", 0.0)
            for r in rows
        ),
        "bit_exact_outside_rope": all(
            ((r["amortize_leyline"] or {}).get("splice_checks") or {}).get(
                "bit_exact_outside_rope", True
            )
            for r in rows
        ),
    }
    print(json.dumps(summary))
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
