"""An OpenAI Agents SDK tool loop on Leyline: one SDK session, one Leyline session.

Runs offline: it starts the embedded engine in this process (``--model``, default smollm2; a
first run converts the checkpoint, ~1 min), or talks to a running server with ``--base-url``::

    python examples/openai_agents_loop.py
    python examples/openai_agents_loop.py --base-url http://127.0.0.1:8000/v1 --model smollm2

The agent answers four questions about a small throw-away project with a real ``read_file``
tool, in one ``SQLiteSession``. ``RunConfig(model_provider=LeylineModelProvider(...))`` is the
one Leyline line: the runner's prompt-cache key for the session becomes the Leyline session,
and the SDK's own ``ToolOutputTrimmer`` shortens tool outputs older than two questions, which
the server serves by splicing (an applied directive) instead of recomputing what follows.

Small local models never call tools, so by default the tool *decisions* are scripted:
``ScriptedToolCalls`` (not an LLM) answers each new question with one ``read_file`` call; the
runner executes the tool, and every answer comes from the engine through Leyline.
``--no-scripted-tools`` leaves the decisions to the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from _project import QUESTIONS, counts, make_project, server
from agents import (
    Agent,
    ModelResponse,
    ModelSettings,
    RunConfig,
    Runner,
    SQLiteSession,
    Usage,
    function_tool,
)
from agents.extensions import ToolOutputTrimmer
from openai.types.responses import ResponseFunctionToolCall

from leyline.middleware import KeepAll, Policy, TruncateOlderThan
from leyline.middleware.openai_agents import LeylineChatCompletionsModel, LeylineModelProvider

POLICIES: dict[str, Policy] = {"keep_all": KeepAll(), "truncate": TruncateOlderThan(n=4)}


class ScriptedToolCalls(LeylineChatCompletionsModel):
    """A scripted tool-calling model, not an LLM: a call whose input ends with the user's
    question gets a ``read_file`` call for the file in ``script``; every other call (after the
    tool ran) goes to the server through Leyline. A subclass of the Leyline model, so the runner
    gives it the SDK session's prompt-cache key like any call of that model."""

    def __init__(self, model: str, provider: LeylineModelProvider, script: dict[str, str]):
        super().__init__(model, provider)
        self.script = script

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kw: Any
    ) -> Any:
        last = input[-1] if isinstance(input, list) and input else {}
        if isinstance(last, dict) and last.get("role") == "user":
            path = self.script[str(last.get("content"))]
            call = ResponseFunctionToolCall(
                type="function_call", call_id=f"call_{len(input)}", name="read_file",
                arguments=json.dumps({"path": path}),
            )  # fmt: skip
            return ModelResponse(output=[call], usage=Usage(), response_id=None)
        return await super().get_response(system_instructions, input, *args, **kw)


async def run(args: argparse.Namespace, base_url: str, root: Path) -> None:
    @function_tool
    def read_file(path: str) -> str:
        """Read one file of the project."""
        return (root / Path(path).name).read_text()

    provider = LeylineModelProvider(base_url=base_url, api_key=args.api_key,
                                    policy=POLICIES[args.policy])  # fmt: skip
    script = {question: path for question, path in QUESTIONS}
    model = (
        ScriptedToolCalls(args.model, provider, script)
        if args.scripted_tools
        else provider.get_model(args.model)
    )
    agent = Agent(
        name="project-guide",
        instructions="You answer questions about a project. Read its files with read_file.",
        model=model,
        tools=[read_file],
        model_settings=ModelSettings(max_tokens=args.max_tokens, temperature=0),
    )
    config = RunConfig(
        model_provider=provider,
        call_model_input_filter=ToolOutputTrimmer(recent_turns=2, max_output_chars=400),
        tracing_disabled=True,  # offline: no trace export
    )
    session = SQLiteSession("example-user")  # the SDK's in-memory session store
    for turn, (question, _) in enumerate(QUESTIONS, 1):
        before = provider.totals.requests
        result = await Runner.run(agent, question, session=session, run_config=config)
        acc = provider.last_accounting
        if acc is None or provider.totals.requests == before:
            print(f"  turn {turn}: the server returned no leyline accounting")
            continue
        outcomes = [d.status.value for d in acc.directives]
        print(f"  turn {turn}: prompt={acc.prompt_tokens} {counts(acc)} directives={outcomes}")
        print(f"    user: {question}\n    agent: {str(result.final_output).strip()[:120]!r}")
    t = provider.totals
    print(
        f"Leyline session {provider.sessions[0]}: {t.requests} accounted requests, "
        f"{counts(t)} reused={t.reused_fraction:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="a running Leyline server (default: start one here)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--api-key", default="leyline")
    ap.add_argument("--policy", choices=sorted(POLICIES), default="keep_all",
                    help="a Leyline history policy on top of the SDK's ToolOutputTrimmer")  # fmt: skip
    ap.add_argument("--scripted-tools", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, server(args.base_url, args.model) as base_url:
        root = Path(tmp)
        make_project(root)
        asyncio.run(run(args, base_url, root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
