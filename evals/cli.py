"""``leyline eval``: ``replay``, ``consistency`` and ``debug-gym``, each writing a report.

Examples::

    leyline eval replay --model tiny-llama --device cpu --scale 0.05 --concurrency 1,4
    leyline eval replay --endpoint http://127.0.0.1:8000/v1 --model smollm2 --scale 0.1
    leyline eval consistency --model smollm2 --cases 8 --k 32
    leyline eval consistency --model smollm2 --scale 0.1 --windows 0,16,32,64,128,256,full
    leyline eval debug-gym --policy keep_all --policy truncate --llm scripted
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from leyline.evals.consistency import ConsistencyConfig
from leyline.evals.replay import ARMS, ReplayConfig
from leyline.evals.workload import MIXES, WorkloadConfig
from leyline.middleware.policies import POLICY_NAMES

__all__ = ["main", "parser"]

_W = WorkloadConfig()
_R = ReplayConfig()
_C = ConsistencyConfig()


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _windows(text: str) -> tuple[int, ...]:
    from leyline.evals.frontier import FULL

    try:
        values = tuple(
            FULL if x.strip() == "full" else int(x) for x in text.split(",") if x.strip()
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token counts or 'full', got {text!r}"
        ) from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected windows >= 0, got {text!r}")
    return values


def _arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    return arms


def _default_out(name: str) -> Path:
    return Path("leyline-results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _workload_args(p: argparse.ArgumentParser, defaults: WorkloadConfig) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--scale",
        type=float,
        default=defaults.scale,
        help="multiplies every size (CPU: 0.05-0.1 with a tiny model; GPU: 1.0)",
    )
    g.add_argument("--conversations", type=int, default=defaults.conversations)
    g.add_argument("--turns", type=int, default=defaults.turns)
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument(
        "--system-tokens",
        type=int,
        default=defaults.system_tokens,
        help="system prompt size at scale 1 (estimated tokens)",
    )
    g.add_argument(
        "--turn-tokens",
        type=int,
        default=defaults.turn_tokens,
        help="size of one turn (assistant reply + tool output) at scale 1",
    )
    g.add_argument(
        "--mutation-tokens",
        type=int,
        default=defaults.mutation_tokens,
        help="size of the edited slice at scale 1",
    )


def _workload(args: argparse.Namespace, defaults: WorkloadConfig) -> WorkloadConfig:
    return dataclasses.replace(
        defaults,
        scale=args.scale,
        conversations=args.conversations,
        turns=args.turns,
        seed=args.seed,
        system_tokens=args.system_tokens,
        turn_tokens=args.turn_tokens,
        mutation_tokens=args.mutation_tokens,
    )


def parser() -> argparse.ArgumentParser:
    """The ``leyline eval`` argument parser (defaults come from the config dataclasses)."""
    p = argparse.ArgumentParser(
        prog="leyline eval",
        description="Run an evaluation and write its report (results.json, summary.md, plots).",
    )
    sub = p.add_subparsers(dest="eval", required=True, metavar="{replay,consistency,debug-gym}")

    r = sub.add_parser("replay", help="message-edit replay: cache-hit and TTFT per arm")
    _workload_args(r, _W)
    r.add_argument(
        "--arms",
        type=_arms,
        default=_R.arms,
        help=f"comma-separated subset of {','.join(ARMS)} (default: all)",
    )
    r.add_argument(
        "--concurrency",
        type=_ints,
        default=_R.concurrency,
        help="comma-separated client concurrency levels (default: 1,4,8,16)",
    )
    r.add_argument(
        "--model", default=_R.model, help="model served (local engine) or requested (--endpoint)"
    )
    r.add_argument(
        "--endpoint",
        default=None,
        help="OpenAI base URL of a running server (default: start one in-process)",
    )
    r.add_argument("--api-key", default=_R.api_key)
    r.add_argument("--device", default=_R.device, help="local engine: auto, cpu, cuda[:N]")
    r.add_argument("--dtype", default=_R.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    r.add_argument(
        "--kv-tokens",
        type=int,
        default=_R.kv_tokens,
        help="local engine KV pool size (default: sized from the workload)",
    )
    r.add_argument("--max-tokens", type=int, default=_R.max_tokens)
    r.add_argument(
        "--mix",
        choices=MIXES,
        default=_W.mix,
        help="paper: the published slice edits; agent: clear, truncate, drop failed calls, "
        "summarize, re-read (see leyline.evals.workload)",
    )
    r.add_argument(
        "--label",
        default=_R.label,
        help="suffix for this run's arm names (exact@sglang-radix): tells servers apart in a "
        "merged report",
    )
    r.add_argument(
        "--merge-with",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="an earlier replay's results.json whose runs go first in this report "
        "(e.g. the default radix cache, measured on its own server)",
    )
    r.add_argument("--no-warmup", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--out", type=Path, default=None, help="report directory")

    c = sub.add_parser("consistency", help="AMORTIZE vs FORGET vs fresh prefill outputs")
    _workload_args(c, _C.workload)
    c.add_argument("--model", default=_C.model)
    c.add_argument("--device", default=_C.device)
    c.add_argument("--dtype", default=_C.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    c.add_argument("--k", type=int, default=_C.k, help="greedy tokens compared per case")
    c.add_argument("--cases", type=int, default=_C.cases, help="edit cases per source")
    c.add_argument(
        "--trajectories",
        default=None,
        help="JSON file of recorded trajectories (e.g. from debug-gym) for more cases",
    )
    c.add_argument(
        "--content-reuse",
        choices=["on", "off"],
        default="on" if _C.content_reuse else "off",
        help="content reuse in the AMORTIZE session",
    )
    c.add_argument("--kv-tokens", type=int, default=None)
    c.add_argument(
        "--windows",
        type=_windows,
        default=_C.windows,
        help="REPAIR windows to sweep, e.g. 0,16,32,64,128,256,full: agreement with FORGET "
        "against recompute cost (0 = AMORTIZE, always included)",
    )
    c.add_argument(
        "--answers",
        type=int,
        default=_C.answers,
        help="add this many cases with a checkable answer (with --windows; at most 4)",
    )
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--out", type=Path, default=None)

    d = sub.add_parser("debug-gym", help="debug-gym mini_nightmare with history policies")
    d.add_argument(
        "--llm",
        choices=["endpoint", "scripted"],
        default="endpoint",
        help="a real model behind --endpoint, or replayed tool-call scripts",
    )
    d.add_argument("--endpoint", default=None, help="OpenAI base URL (with --llm endpoint)")
    d.add_argument(
        "--serve",
        default=None,
        metavar="MODEL",
        help="start a fresh in-process engine with MODEL for each policy arm (instead of "
        "--endpoint); with --llm scripted it measures the cache on the replayed prompts",
    )
    d.add_argument("--model", default=None)
    d.add_argument("--api-key", default="leyline-eval")
    d.add_argument(
        "--policy",
        action="append",
        default=None,
        choices=POLICY_NAMES,
        metavar="NAME",
        help=f"history policy, one of {', '.join(POLICY_NAMES)}; repeat for several arms "
        "(default: keep_all and truncate; truncate_older_than is the same policy as truncate)",
    )
    d.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    d.add_argument("--max-steps", type=int, default=None)
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed sent with every model request (--llm endpoint; replays ignore it)",
    )
    d.add_argument(
        "--debug-gym-venv",
        type=Path,
        default=None,
        help="the debug-gym Python 3.12 venv to build or reuse (default: one per checkout "
        "under the Leyline cache directory)",
    )
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--out", type=Path, default=None)
    return p


def _command(argv: Sequence[str]) -> str:
    return "leyline eval " + shlex.join(argv)


def _replay_config(args: argparse.Namespace) -> ReplayConfig:
    return ReplayConfig(
        workload=dataclasses.replace(_workload(args, _W), mix=args.mix),
        label=args.label,
        arms=args.arms,
        concurrency=args.concurrency,
        model=args.model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        device=args.device,
        dtype=args.dtype,
        kv_tokens=args.kv_tokens,
        max_tokens=args.max_tokens,
        warmup=not args.no_warmup,
        progress=not args.no_progress,
    )


def _consistency_config(args: argparse.Namespace) -> ConsistencyConfig:
    return ConsistencyConfig(
        workload=_workload(args, _C.workload),
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        k=args.k,
        cases=args.cases,
        trajectories=args.trajectories,
        content_reuse=args.content_reuse == "on",
        kv_tokens=args.kv_tokens,
        progress=not args.no_progress,
        windows=args.windows,
        answers=args.answers,
    )


def _run(
    cfg: ReplayConfig | ConsistencyConfig,
    out: Path,
    argv: Sequence[str],
    merge_with: Path | None = None,
) -> int:
    """Run the eval the config is for, write its report, print the summary."""
    from leyline.evals import report

    if isinstance(cfg, ReplayConfig):
        from leyline.evals.replay import run_replay

        result = run_replay(cfg)
        if merge_with is not None:
            from leyline.evals.replay import merge_results

            result = merge_results(result, merge_with)
        paths = report.write_replay_report(out, result, command=_command(argv))
    elif cfg.windows:
        from leyline.evals.consistency import edit_cases
        from leyline.evals.frontier import run_sweep, write_sweep_report

        result = run_sweep(cfg, edit_cases(cfg))
        paths = write_sweep_report(out, result, command=_command(argv))
    else:
        from leyline.evals.consistency import run_consistency

        paths = report.write_consistency_report(out, run_consistency(cfg), command=_command(argv))
    print((out / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _debug_gym(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("leyline.evals.debug_gym")
    except ModuleNotFoundError as exc:
        if exc.name not in ("leyline.evals.debug_gym",):
            raise
        print(
            "leyline eval debug-gym: this installation has no debug-gym harness "
            "(module leyline.evals.debug_gym is missing); update leyline or run from a checkout "
            "that includes evals/debug_gym.py",
            file=sys.stderr,
        )
        return 2
    if args.out is None:
        args.out = _default_out("debug-gym")
    code = module.run(args)
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``leyline eval`` (dispatched from the ``leyline`` command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.eval == "debug-gym":
        return _debug_gym(args)
    out = args.out or _default_out(args.eval)
    try:  # config validation only: a message the user can act on
        cfg = _replay_config(args) if args.eval == "replay" else _consistency_config(args)
    except ValueError as exc:
        print(f"leyline eval {args.eval}: {exc}", file=sys.stderr)
        return 2
    merge_with = getattr(args, "merge_with", None)
    if merge_with is not None and not merge_with.is_file():
        print(f"leyline eval replay: --merge-with {merge_with}: no such file", file=sys.stderr)
        return 2
    return _run(cfg, out, argv, merge_with)
