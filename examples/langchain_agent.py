"""A LangChain 1.x agent (``create_agent``) on Leyline: context editing served by splicing.

Runs offline: it starts the embedded engine in this process (``--model``, default smollm2; a
first run converts the checkpoint, ~1 min), or talks to a running ``leyline serve`` with
``--base-url`` (e.g. ``--base-url "$LEYLINE_BASE_URL"``)::

    python examples/langchain_agent.py
    python examples/langchain_agent.py --base-url http://127.0.0.1:8000/v1 --model smollm2

The agent answers four questions about a small throw-away project with a real ``read_file``
tool, in one LangGraph thread. ``LeylineMiddleware()`` is the one Leyline line, last in
``middleware=``: every model call carries the thread's Leyline session.
``ContextEditingMiddleware(edits=[ClearToolUsesEdit(...)])``, LangChain's own middleware, clears
all but the two latest tool outputs once the history grows past ``--trigger`` tokens; the server
serves each clear by splicing (an applied directive) instead of recomputing what follows it.
Every model call prints where its prompt tokens came from.

Small local models never call tools, so by default the tool *decisions* are scripted:
``ScriptedToolCalls`` (a middleware, not an LLM) answers each new question with one
``read_file`` call; the agent executes the tool, and every answer comes from the engine through
Leyline. ``--no-scripted-tools`` leaves the decisions to the model.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _project import QUESTIONS, counts, make_project, server
from langchain.agents import create_agent
from langchain.agents.middleware import (
    AgentMiddleware,
    ClearToolUsesEdit,
    ContextEditingMiddleware,
    ModelRequest,
    ModelResponse,
)
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver

from leyline import Accounting
from leyline.middleware.langchain import LeylineMiddleware, accounting_of


class ScriptedToolCalls(AgentMiddleware):
    """A scripted tool-calling step, not an LLM: a model call whose last message is one of the
    user's questions gets a ``read_file`` call for the file in ``script`` (no model call); every
    other call (after the tool ran) goes on to the model."""

    def __init__(self, script: dict[str, str]) -> None:
        super().__init__()
        self.script = script

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], ModelResponse[Any]]
    ) -> ModelResponse[Any]:
        last = request.messages[-1] if request.messages else None
        if isinstance(last, HumanMessage) and last.text in self.script:
            call = {"name": "read_file", "args": {"path": self.script[last.text]},
                    "id": f"call_{len(request.messages)}", "type": "tool_call"}  # fmt: skip
            return ModelResponse(result=[AIMessage("", tool_calls=[call])])
        return handler(request)


def run(args: argparse.Namespace, base_url: str, root: Path) -> None:
    @tool
    def read_file(path: str) -> str:
        """Read one file of the project."""
        return (root / Path(path).name).read_text()

    chat = ChatOpenAI(model=args.model, base_url=base_url, api_key=args.api_key,
                      max_tokens=args.max_tokens, temperature=0)  # fmt: skip
    middleware: list[AgentMiddleware] = [
        ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=args.trigger, keep=2)]),
        LeylineMiddleware(),  # the one line
    ]
    if args.scripted_tools:
        middleware.insert(0, ScriptedToolCalls(dict(QUESTIONS)))
    agent = create_agent(
        chat, [read_file], middleware=middleware, checkpointer=InMemorySaver(),
        system_prompt="You answer questions about a project. Read its files with read_file.",
    )  # fmt: skip
    config: dict[str, Any] = {"configurable": {"thread_id": args.thread}, "recursion_limit": 12}
    totals, seen = Accounting.zero(), 0
    for turn, (question, _) in enumerate(QUESTIONS, 1):
        agent.invoke({"messages": [("user", question)]}, config)
        messages = agent.get_state(config).values["messages"]
        accounted = [a for a in map(accounting_of, messages[seen:]) if a is not None]
        seen = len(messages)
        if not accounted:
            print(f"  turn {turn}: the server returned no leyline accounting")
        for acc in accounted:
            totals = totals + acc
            print(
                f"  turn {turn}: prompt={acc.prompt_tokens} {counts(acc)} "
                f"directives={[d.status.value for d in acc.directives]}"
            )
        print(f"    user: {question}\n    agent: {str(messages[-1].content).strip()[:120]!r}")
    print(
        f"thread {args.thread}: {totals.requests} accounted requests, {counts(totals)} "
        f"reused={totals.reused_fraction:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="a running Leyline server (default: start one here)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--api-key", default="leyline")
    ap.add_argument("--thread", default="project-1", help="LangGraph thread id")
    ap.add_argument("--trigger", type=int, default=1600,
                    help="ClearToolUsesEdit's trigger (approximate tokens of the history)")  # fmt: skip
    ap.add_argument("--scripted-tools", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, server(args.base_url, args.model) as base_url:
        root = Path(tmp)
        make_project(root)
        run(args, base_url, root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
