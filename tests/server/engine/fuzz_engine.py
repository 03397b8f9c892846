"""Soak and fuzz `leyline serve` (issue 13), outside the default test run.

    .venv/bin/python tests/server/engine/fuzz_engine.py [--examples 60] [--soak-s 60]

1. Schemathesis against the server's own OpenAPI document (request bodies come from the
   pydantic schemas it declares), positive and negative cases, with and without the API
   key, the model name pinned in half the cases so bodies get past the 404; every answer
   must be < 500 and, for 4xx, in OpenAI's error shape.
2. Concurrency with cancellations: client threads send chat requests (sessions, streams,
   plain) and give up on a share of them mid-way (read timeouts, streams left early).
3. At the end the engine must be idle with no leaked slots, and `/health` must answer.

Prints one line of counts (requests, 5xx, leaks) and exits non-zero on any 5xx or leak.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/

from _engine_server import assert_no_leaks, running_server

KEY = "fuzz-key"


def schema_fuzz(base: str, model: str, examples: int, counts: Counter[str]) -> None:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.generation import GenerationMode

    doc = httpx.get(f"{base}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    rng = random.Random(0)
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @hypothesis.given(case=op.as_strategy())
        def run(case: Any) -> None:
            if isinstance(case.body, dict) and "model" in case.body and rng.random() < 0.5:
                case.body["model"] = model  # get past model_not_found
            if isinstance(case.body, dict) and rng.random() < 0.5:
                case.body["max_tokens"] = rng.choice([1, 2, 3])
            headers = {"Authorization": f"Bearer {KEY}"} if rng.random() < 0.9 else {}
            response = case.call(base_url=base, headers=headers, timeout=60)
            counts["requests"] += 1
            counts[f"{response.status_code // 100}xx"] += 1
            if response.status_code >= 500:
                counts["5xx"] += 0  # counted above as 5xx
                print("5xx:", case.method, case.formatted_path, str(case.body)[:300],
                      response.text[:300])  # fmt: skip
            elif response.status_code >= 400:
                err = response.json().get("error", {})
                if not (isinstance(err, dict) and "message" in err and "code" in err):
                    counts["bad_error_shape"] += 1

        run()


def soak(base: str, model: str, seconds: float, counts: Counter[str]) -> None:
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(k)
        headers = {"Authorization": f"Bearer {KEY}"}
        history: list[dict[str, Any]] = [{"role": "system", "content": f"Agent {k}."}]
        version = 0
        with httpx.Client(base_url=f"{base}/v1", headers=headers, timeout=60) as h:
            while time.monotonic() < deadline:
                history.append({"role": "user", "content": f"turn {rng.randint(0, 10**6)}"})
                body: dict[str, Any] = {"model": model, "messages": history,
                                        "max_tokens": rng.choice([2, 8, 64]), "temperature": 1.0}  # fmt: skip
                if k % 2 == 0:  # a server-diff session, versions kept by the server
                    body["leyline"] = {"session": f"soak-{k}", "mode": "amortize"}
                if k % 3 == 0:
                    body["cache_salt"] = f"salt-{k % 2}"
                cancel = rng.random() < 0.3
                outcome = "ok"
                try:
                    if rng.random() < 0.5:
                        body["stream"] = True
                        with h.stream("POST", "/chat/completions", json=body) as r:
                            for i, _line in enumerate(r.iter_lines()):
                                if cancel and i >= 2:
                                    outcome = "cancelled"
                                    break
                            status = r.status_code
                    else:
                        timeout = httpx.Timeout(60, read=0.05) if cancel else None
                        r = h.post("/chat/completions", json=body,
                                   **({"timeout": timeout} if timeout else {}))  # fmt: skip
                        status = r.status_code
                except httpx.ReadTimeout:
                    status, outcome = 0, "cancelled"
                with lock:
                    counts["requests"] += 1
                    counts[outcome] += 1
                    if status:
                        counts[f"{status // 100}xx"] += 1
                    if status >= 500:
                        print("5xx in soak:", r.text[:300])
                history.append({"role": "assistant", "content": "ok"})
                version += 1
                if len(history) > 12:
                    history = history[:1] + history[-6:]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=60, help="schemathesis cases per operation")
    ap.add_argument("--soak-s", type=float, default=60.0, help="seconds of concurrent traffic")
    args = ap.parse_args()
    counts: Counter[str] = Counter()
    with running_server(kv_tokens=3000, api_keys=(KEY,), max_sessions=64) as srv:
        base = srv.base_url.removesuffix("/v1")
        t0 = time.monotonic()
        schema_fuzz(base, srv.model, args.examples, counts)
        fuzz = dict(counts)
        soak_counts: Counter[str] = Counter()
        soak(base, srv.model, args.soak_s, soak_counts)
        deadline = time.monotonic() + 60
        while srv.engine.stats()["running"] or srv.engine.stats()["queue"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        leaks = 0
        try:
            with srv.engine.lock:
                srv.engine.sessions.expire(now=float("inf"))  # idle sessions keep locks only
            assert_no_leaks(srv.engine)
        except AssertionError as exc:
            leaks = 1
            print("leak:", exc)
        health = httpx.get(f"{base}/health").status_code
        print(f"schemathesis: {fuzz}")
        print(f"soak: {dict(soak_counts)}")
        print(f"engine: {srv.engine.stats()['counters']}; health {health}; leaks {leaks}; "
              f"{time.monotonic() - t0:.0f} s")  # fmt: skip
        bad = fuzz.get("5xx", 0) + soak_counts.get("5xx", 0) + fuzz.get("bad_error_shape", 0)
    return 1 if bad or leaks or health != 200 else 0


if __name__ == "__main__":
    raise SystemExit(main())
