"""Client overhead per request: render segments (text CDC + xxh64), diff, build the payload.

BRIEF §6 target: < 2 ms per request at 32K tokens. "cold" is a new Session (every message
split and hashed); "steady" is the next turn of an ongoing session (one message appended and
one old tool output truncated, so only those are split again). Token counts are tiktoken
cl100k estimates.

    python benchmarks/client_overhead.py
"""

from __future__ import annotations

import random
import statistics
import time

from leyline import Session
from leyline.tokens import count_message_tokens


def _history(n_turns: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "error", "assert", "import", "0x1f", "None", "]"]
    msgs = [{"role": "system", "content": "You are a debugging agent.\n" * 20}]
    for t in range(n_turns):
        msgs.append({"role": "assistant", "content": f"Running step {t}."})
        out = "".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + "\n" for _ in range(60)
        )
        msgs.append({"role": "user", "content": out})
    return msgs


def _time(fn: object, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def main() -> None:
    print(f"{'turns':>6}{'tokens':>9}{'cold ms':>10}{'steady ms':>11}")
    for turns in (8, 32, 64):
        history = _history(turns)
        tokens = count_message_tokens(history)

        def cold(history: list[dict[str, str]] = history) -> None:
            Session().prepare(history)

        session = Session()
        session.commit(session.prepare(history))
        edited = [dict(m) for m in history] + [{"role": "assistant", "content": "next"}]
        edited[2]["content"] = edited[2]["content"][:200] + "\n[... truncated]"

        def steady(session: Session = session, edited: list[dict[str, str]] = edited) -> None:
            session.prepare(edited)

        print(f"{turns:>6}{tokens:>9}{_time(cold, 20):>10.2f}{_time(steady, 50):>11.2f}")


if __name__ == "__main__":
    main()
