"""Run debug-gym mini_nightmare tasks with a Leyline agent; write ``results.json``.

Runs in the Python 3.12 venv of :func:`leyline.evals.debug_gym_env.prepare_env` (the 3.11 side
starts it as a subprocess)::

    python -m leyline.middleware.debug_gym_run --llm scripted --policy keep_all --out runs/keep_all
    python -m leyline.middleware.debug_gym_run --llm openai --endpoint http://127.0.0.1:8000/v1 \\
        --model smollm2 --policy truncate --max-steps 50 --seed 0 --out runs/truncate

From Python, :func:`run_tasks` takes a policy object (``DropFailedToolCalls.for_debug_gym(
mode=Mode.FORGET)``, a plain function, ...) or a :data:`~leyline.middleware.POLICY_NAMES` name;
names are checked before any task is prepared.

Each task runs offline: ``terminal.type=local`` (debug-gym's ``LocalTerminal``), no Docker
image, the dataset read from ``$HOME/.cache/debug_gym/mini_nightmare``. ``pandas_dataframe``
downloads a CSV, so the default task list leaves it out. ``--llm scripted`` replays
hand-written tool calls (labelled ``"replay"`` in the results, never a model result);
with ``--endpoint`` the replayed prompts are also sent to the server to measure its cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from debug_gym.gym.envs.mini_nightmare import MiniNightmareEnv
from debug_gym.gym.terminals.local import LocalTerminal
from debug_gym.gym.tools.toolbox import Toolbox
from debug_gym.llms.base import LLM
from debug_gym.logger import DebugGymLogger

from leyline.middleware.debug_gym import LeylineFroggyAgent
from leyline.middleware.debug_gym_llm import LeylineOpenAILLM, ScriptedLLM, load_script
from leyline.middleware.policies import POLICY_NAMES, Policy, PolicyLike, as_policy, named_policy

__all__ = [
    "DEFAULT_TOOLS",
    "OFFLINE_TASKS",
    "LLMFactory",
    "main",
    "resolve_policy",
    "run_tasks",
    "summarize",
]

#: The mini_nightmare config's tools plus ``submit`` (listdir stays out: it apt-installs tree).
DEFAULT_TOOLS = ("bash", "view", "pdb", "edit", "eval", "submit")
#: Tasks that run without network (``pandas_dataframe`` downloads its CSV).
OFFLINE_TASKS = tuple(t for t in MiniNightmareEnv.TASK_NAMES if t != "pandas_dataframe")
RUN_TIMEOUT_S = 30

#: Builds a fresh LLM (one Leyline session) for a task.
LLMFactory = Callable[[str, DebugGymLogger], LLM]


def _policy_label(policy: PolicyLike | str) -> str:
    return policy if isinstance(policy, str) else repr(policy)


def resolve_policy(policy: PolicyLike | str) -> Policy:
    """A policy object (or plain function) as is; a name through
    :func:`~leyline.middleware.named_policy` (``ValueError`` lists :data:`POLICY_NAMES`)."""
    return named_policy(policy) if isinstance(policy, str) else as_policy(policy)


def run_task(
    task: str,
    policy: PolicyLike | str,
    llm: LLM,
    max_steps: int,
    out_dir: Path,
    *,
    logger: DebugGymLogger,
    tools: Sequence[str] = DEFAULT_TOOLS,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """One episode; returns its result row (the trajectory goes to ``out_dir/<task>``)."""
    dataset = MiniNightmareEnv.load_dataset(problems=[task], build_image=False, logger=logger)
    env = MiniNightmareEnv(
        task_data=dataset[task],
        terminal=LocalTerminal(logger=logger),
        logger=logger,
        run_timeout=RUN_TIMEOUT_S,
    )
    for tool in tools:
        env.add_tool(Toolbox.get_tool(tool))
    agent_args: dict[str, Any] = {"max_steps": max_steps}
    if system_prompt is not None:
        agent_args["system_prompt"] = system_prompt
    agent = LeylineFroggyAgent(agent_args, llm=llm, logger=logger, policy=resolve_policy(policy))
    t0 = time.perf_counter()
    error: str | None = None
    try:
        trajectory = agent.run(env)
        (out_dir / task).mkdir(parents=True, exist_ok=True)
        (out_dir / task / "trajectory.json").write_text(
            json.dumps(trajectory, indent=1, default=str)
        )
    except Exception as exc:  # why: one broken episode must not lose the other tasks' results
        error = f"{type(exc).__name__}: {exc}"
        logger.error(f"task {task} failed: {error}")
    finally:
        wall = time.perf_counter() - t0
        resolved, score, max_score = bool(env.resolved), env.score, env.max_score
        env.close()
    records = [r.as_dict() for r in getattr(llm, "records", [])]
    (out_dir / task).mkdir(parents=True, exist_ok=True)
    (out_dir / task / "requests.json").write_text(
        json.dumps(getattr(llm, "prompts", []), default=str)
    )
    return {
        "task": task,
        "policy": _policy_label(policy),
        "solved": resolved and error is None,
        "score": score,
        "max_score": max_score,
        "steps": len(agent.history.llm_responses),
        "stop_reason": agent.stop_reason,
        "error": error,
        "wall_s": round(wall, 3),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "records": records,
    }


def run_tasks(
    tasks: Sequence[str],
    policy: PolicyLike | str,
    llm: LLMFactory,
    max_steps: int,
    out_dir: Path,
    *,
    tools: Sequence[str] = DEFAULT_TOOLS,
    system_prompt: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every task with a fresh LLM from ``llm(task, logger)``; one result row per task.

    ``policy``: a policy object, a plain function or a :data:`POLICY_NAMES` name.
    """
    resolve_policy(policy)  # an unknown name fails here, before any task is prepared
    label = _policy_label(policy)
    unknown = sorted(set(tasks) - set(MiniNightmareEnv.TASK_NAMES))
    if unknown:
        raise ValueError(
            f"unknown tasks {unknown}; mini_nightmare has {MiniNightmareEnv.TASK_NAMES}"
        )
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, task in enumerate(tasks, 1):
        logger = DebugGymLogger(task, log_dir=str(out_dir / task), level=logging.WARNING, mode="w")
        row = run_task(
            task,
            policy,
            llm(task, logger),
            max_steps,
            out_dir,
            logger=logger,
            tools=tools,
            system_prompt=system_prompt,
        )
        rows.append(row)
        say(
            f"[{label} {n}/{len(tasks)}] {task}: {'solved' if row['solved'] else 'unsolved'}"
            f" in {row['steps']} steps, {row['prompt_tokens']} prompt tokens, {row['wall_s']:.1f} s"
        )
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Solve rate, steps, prompt tokens and per-step cache accounting over result rows.

    Per-step means skip steps whose server reported nothing (``None``).
    """
    records = [r for row in results for r in row["records"]]

    def per_step(key: str) -> float | None:
        return _mean([r[key] for r in records if r.get(key) is not None])

    ttfts = sorted(r["ttft_s"] for r in records if r.get("ttft_s") is not None)
    solved = sum(bool(row["solved"]) for row in results)
    return {
        "tasks": len(results),
        "solved": solved,
        "solve_rate": round(solved / len(results), 4) if results else None,
        "solved_tasks": sorted(row["task"] for row in results if row["solved"]),
        "mean_steps": _mean([row["steps"] for row in results]),
        "requests": len(records),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "prompt_tokens_estimated": any(r["estimated"] for r in records),
        "prompt_tokens_per_step": per_step("prompt_tokens"),
        "cached_tokens_per_step": per_step("cached_tokens"),
        "exact_per_step": per_step("exact"),
        "spliced_per_step": per_step("spliced"),
        "chunk_reused_per_step": per_step("chunk_reused"),
        "recomputed_per_step": per_step("recomputed"),
        "directives_per_step": per_step("directives"),
        "ttft_mean_s": _mean(ttfts),
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "errors": [row["task"] for row in results if row["error"]],
    }


def _factory(args: argparse.Namespace) -> LLMFactory:
    if args.llm == "scripted":

        def scripted(task: str, logger: DebugGymLogger) -> LLM:
            return ScriptedLLM(
                load_script(task),
                endpoint=args.endpoint,
                model=args.model or "scripted-replay",
                api_key=args.api_key,
                logger=logger,
                stream=args.stream,
            )

        return scripted
    if not args.endpoint or not args.model:
        raise SystemExit("--llm openai needs --endpoint and --model")

    def endpoint(task: str, logger: DebugGymLogger) -> LLM:
        return LeylineOpenAILLM.from_endpoint(
            args.endpoint,
            args.model,
            api_key=args.api_key,
            logger=logger,
            stream=args.stream,
            generate_kwargs={
                "temperature": args.temperature,
                "max_tokens": args.max_tokens,
                "seed": args.seed,
            },
        )

    return endpoint


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m leyline.middleware.debug_gym_run",
        description="debug-gym mini_nightmare with a Leyline history policy (run in the 3.12 venv)",
    )
    p.add_argument(
        "--tasks", default=None, help=f"comma-separated (default: {','.join(OFFLINE_TASKS)})"
    )
    p.add_argument("--policy", choices=POLICY_NAMES, default="keep_all")
    p.add_argument("--llm", choices=("scripted", "openai"), default="scripted")
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (…/v1)")
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default="leyline")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=1024, help="completion tokens per step")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed sent with every request (--llm openai)"
    )
    p.add_argument("--stream", action="store_true", help="stream responses (measures TTFT)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tasks = (
        tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        if args.tasks
        else OFFLINE_TASKS
    )
    if args.max_steps <= 0:
        raise SystemExit("--max-steps must be > 0")
    rows = run_tasks(tasks, args.policy, _factory(args), args.max_steps, args.out)
    result = {
        "kind": "replay" if args.llm == "scripted" else "model",
        "note": (
            "hand-written tool-call replays, not model results"
            if args.llm == "scripted"
            else f"model {args.model} at {args.endpoint}"
        ),
        "policy": args.policy,
        "llm": args.llm,
        "endpoint": args.endpoint,
        "model": args.model,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "summary": summarize(rows),
        "results": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    # every task's prompts, in the format `leyline eval consistency --trajectories` reads
    trajectories = [json.loads((args.out / t / "requests.json").read_text()) for t in tasks]
    (args.out / "trajectories.json").write_text(json.dumps({"trajectories": trajectories}))
    s = result["summary"]
    print(
        f"{args.policy}: solved {s['solved']}/{s['tasks']}, {s['prompt_tokens']} prompt tokens "
        f"over {s['requests']} requests -> {args.out / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
