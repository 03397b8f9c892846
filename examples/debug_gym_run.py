"""debug-gym mini_nightmare under two history policies, driven from the main (3.11) venv.

debug-gym 1.3.0 needs Python >= 3.12, so this script builds (once, cached) a 3.12 venv with
debug-gym and the client-only leyline, then runs ``leyline.middleware.debug_gym_run`` there as a
subprocess, once per policy, and prints a comparison::

    python examples/debug_gym_run.py                       # scripted replays, offline
    python examples/debug_gym_run.py --llm openai --endpoint http://127.0.0.1:8000/v1 \\
        --model smollm2 --tasks purr,config --max-steps 20 --stream

``--llm scripted`` replays hand-written tool calls (``evals/debug_gym_assets/scripts``): the
solve rate of a replay says the harness works, not how good a model is. Add ``--endpoint`` to
send the replayed prompts to a server and measure its cache on identical trajectories.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from leyline.evals.debug_gym_env import prepare_env, run_debug_gym


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm", choices=("scripted", "openai"), default="scripted")
    p.add_argument("--endpoint", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", default="", help="comma-separated (default: the 9 offline tasks)")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    python = prepare_env()
    out = args.out or Path(tempfile.mkdtemp(prefix="leyline-debug-gym-"))
    tasks = tuple(t for t in args.tasks.split(",") if t)
    print(
        f"{'policy':<10} {'solved':>8} {'requests':>9} {'prompt tok':>11} {'tok/step':>9} "
        f"{'cached/step':>12} {'spliced/step':>13} {'recomp/step':>12} {'TTFT p50':>9}"
    )
    for policy in ("keep_all", "truncate"):
        result = run_debug_gym(
            python,
            out=out / policy,
            tasks=tasks,
            policy=policy,
            llm=args.llm,
            endpoint=args.endpoint,
            model=args.model,
            max_steps=args.max_steps,
            stream=args.stream,
        )
        s = result["summary"]

        def fmt(value: float | None, spec: str = ".0f") -> str:
            return "-" if value is None else format(value, spec)

        print(
            f"{policy:<10} {s['solved']:>3}/{s['tasks']:<4} {s['requests']:>9} "
            f"{s['prompt_tokens']:>11} {fmt(s['prompt_tokens_per_step']):>9} "
            f"{fmt(s['cached_tokens_per_step']):>12} {fmt(s['spliced_per_step']):>13} "
            f"{fmt(s['recomputed_per_step']):>12} {fmt(s['ttft_p50_s'], '.3f'):>9}"
        )
    print(f"({result['note']}; results in {out})")


if __name__ == "__main__":
    main()
