"""``leyline eval debug-gym``: mini_nightmare under several history policies, one report.

debug-gym 1.3.0 needs Python >= 3.12, so each policy arm runs in the prepared debug-gym venv
(:mod:`leyline.evals.debug_gym_env`, built once and cached) as a subprocess of
:mod:`leyline.middleware.debug_gym_run`; this side collects the arms into ``results.json``,
``summary.md`` and a bar chart. ``--llm scripted`` replays hand-written tool-call scripts:
those rows are labelled replays, never model results.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leyline.evals.report import bar_chart, environment, fmt, markdown_table, write_json
from leyline.middleware.policies import POLICY_NAMES

DEFAULT_POLICIES = ("keep_all", "truncate")


def run(args: argparse.Namespace) -> int:
    """Run every requested policy arm and write the report into ``args.out``."""
    from leyline.evals.debug_gym_env import DebugGymEnvSpec, prepare_env, run_debug_gym

    policies = list(args.policy or DEFAULT_POLICIES)
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:  # before any environment work
        print(
            f"leyline eval debug-gym: unknown policy {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(POLICY_NAMES)}"
        )
        return 2
    llm = "openai" if args.llm == "endpoint" else "scripted"
    if args.serve and args.endpoint:
        print("leyline eval debug-gym: give --serve MODEL or --endpoint URL, not both")
        return 2
    if llm == "openai" and not ((args.endpoint and args.model) or args.serve):
        print("leyline eval debug-gym: --llm endpoint needs --endpoint URL and --model NAME")
        return 2
    tasks = [t for t in (args.tasks or "").split(",") if t]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    venv = getattr(args, "debug_gym_venv", None)
    spec = DebugGymEnvSpec(venv_dir=venv) if venv is not None else DebugGymEnvSpec()
    python = prepare_env(spec, progress=None if args.no_progress else print)
    arms: dict[str, dict[str, Any]] = {}
    for policy in policies:
        print(f"debug-gym: policy {policy} ({llm}) ...", flush=True)
        with _target(args) as (endpoint, model):
            result = run_debug_gym(
                python,
                out=out / policy,
                tasks=tasks,
                policy=policy,
                llm=llm,
                endpoint=endpoint,
                model=model,
                api_key=args.api_key,
                max_steps=args.max_steps,
                seed=args.seed,
                stream=endpoint is not None,
            )
        arms[policy] = result["summary"] | {"kind": result["kind"], "note": result["note"]}
    _write_report(out, args, arms)
    return 0


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[tuple[str | None, str | None]]:
    """(endpoint, model): a fresh local engine per arm with --serve, else what was given."""
    if not args.serve:
        yield args.endpoint, args.model
        return
    from leyline.evals._server import local_server

    with local_server(model=args.serve, kv_tokens=65536) as srv:
        yield srv.base_url, srv.model


def _write_report(out: Path, args: argparse.Namespace, arms: dict[str, dict[str, Any]]) -> None:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(out / "results.json", {"config": config, **environment(), "arms": arms})
    headers = [
        "policy",
        "solved",
        "solve rate",
        "steps",
        "prompt tok/step",
        "cached/step",
        "spliced/step",
        "recomputed/step",
        "directives/step",
        "TTFT p50 s",
    ]
    rows = [
        [
            policy,
            f"{s['solved']}/{s['tasks']}",
            fmt(s["solve_rate"], "pct"),
            fmt(s["mean_steps"]),
            fmt(s["prompt_tokens_per_step"]),
            fmt(s["cached_tokens_per_step"]),
            fmt(s["spliced_per_step"]),
            fmt(s["recomputed_per_step"]),
            fmt(s["directives_per_step"]),
            fmt(s["ttft_p50_s"]),
        ]
        for policy, s in arms.items()
    ]
    kinds = {s["kind"] for s in arms.values()}
    label = (
        "REPLAYS of hand-written scripts, not model results"
        if kinds == {"replay"}
        else (next(iter(arms.values()))["note"] if arms else "")
    )
    (out / "summary.md").write_text(
        f"# debug-gym mini_nightmare\n\n{label}\n\n" + markdown_table(headers, rows)
    )
    names = list(arms)
    bar_chart(
        out / "solve_rate.png",
        names,
        {"solve rate": [arms[p]["solve_rate"] for p in names]},
        title="mini_nightmare solve rate by history policy",
        ylabel="%",
        percent=True,
    )
    bar_chart(
        out / "prompt_tokens.png",
        names,
        {"prompt tokens / step": [arms[p]["prompt_tokens_per_step"] for p in names]},
        title="Prompt tokens per step",
        ylabel="tokens",
    )
    print((out / "summary.md").read_text())
