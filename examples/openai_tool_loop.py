"""A plain OpenAI tool-calling loop, wrapped in one line by Leyline.

Run against ``leyline serve`` (or any OpenAI-compatible server)::

    python examples/openai_tool_loop.py --base-url http://127.0.0.1:8000/v1 --model smollm2
    python examples/openai_tool_loop.py --scripted     # scripted tool calls: edits on any model

The agent explores a small throw-away project with two local tools (``list_files``,
``read_file``). ``leyline.wrap`` applies a history policy (default: truncate tool outputs older
than the last two turns to 200 characters) and sends the edits as directives; every request
prints what the server reused. Follow-up questions keep the conversation going even when a small
model stops calling tools.

Small models (SmolLM2) rarely call tools, and without tool outputs there is nothing to edit.
``--scripted`` plays the assistant's side from :data:`SCRIPTED_TURNS` instead, a SCRIPTED
tool-calling model, not a model result: every prompt still goes to the server (one completion
token, answer discarded), so the cache accounting and the directives' statuses are the
server's own, and the run prints applied directives whatever model is served.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import openai
from _project import make_project

import leyline
from leyline.middleware import (
    DropFailedToolCalls,
    KeepAll,
    LastNObservations,
    Policy,
    TruncateOlderThan,
)

POLICIES: dict[str, Policy] = {
    "keep_all": KeepAll(),
    "truncate": TruncateOlderThan(n=2, max_chars=200),
    "last_n": LastNObservations(n=2),
    "drop_failed": DropFailedToolCalls(),
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "list_files",
            "description": "List the files of the project.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read one file of the project.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string", "description": "file name"}},
                "required": ["path"],
            },
        },
    },
]

QUESTIONS = [
    "Which file defines the parser? Use the tools.",
    "What does the tokenizer do with blank lines?",
    "Summarize the project in two sentences.",
]

#: The SCRIPTED tool-calling model of ``--scripted``: for each question, the assistant turns it
#: plays, a tool call ``(name, arguments)`` or a final answer. The second question's first read
#: fails (no such file) and is retried, so ``--policy drop_failed`` has a failure to drop; by the
#: fifth request the first read is older than two turns, so ``truncate`` cuts it.
SCRIPTED_TURNS: list[list[tuple[str, dict[str, str]] | str]] = [
    [("list_files", {}), ("read_file", {"path": "parser.py"}), "parser.py defines the parser."],
    [
        ("read_file", {"path": "tokenize.py"}),
        ("read_file", {"path": "tokenizer.py"}),
        "Blank lines are skipped.",
    ],
    [("read_file", {"path": "README.md"}), "A tiny CSV toolkit: a parser and a tokenizer."],
]


def run_tool(root: Path, name: str, arguments: str) -> str:
    """Execute one tool call locally; errors go back to the model as text."""
    try:
        args = json.loads(arguments or "{}")
        if name == "list_files":
            return "\n".join(sorted(p.name for p in root.iterdir()))
        if name == "read_file":
            return (root / Path(str(args["path"])).name).read_text()
        return f"Error: unknown tool {name}"
    except (OSError, KeyError, ValueError) as exc:
        return f"Error: {exc}"


def report(step: int, wrapped: Any) -> None:
    acc = wrapped.last_accounting
    ley = wrapped.session
    if acc is None:
        print(f"  request {step}: session v{ley.version}, server returned no leyline accounting")
        return
    modes = [d.status.value for d in acc.directives]
    print(
        f"  request {step}: v{ley.version} prompt={acc.prompt_tokens} exact={acc.exact} "
        f"spliced={acc.spliced} chunk_reused={acc.chunk_reused} recomputed={acc.recomputed} "
        f"directives={modes}"
    )


class ScriptedToolCaller:
    """The assistant side of ``--scripted``: replays :data:`SCRIPTED_TURNS` (not a model)."""

    def __init__(self) -> None:
        self._turns = [list(turns) for turns in SCRIPTED_TURNS]
        self._calls = 0

    def reply(self, question: int) -> dict[str, Any]:
        """The next assistant message for ``question`` (an answer once its turns run out)."""
        turns = self._turns[question]
        turn = turns.pop(0) if turns else "No more scripted turns."
        if isinstance(turn, str):
            return {"role": "assistant", "content": turn}
        self._calls += 1
        name, args = turn
        call = {"name": name, "arguments": json.dumps(args)}
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": f"scripted_{self._calls}", "type": "function", "function": call}],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--api-key", default="leyline")
    ap.add_argument("--policy", choices=sorted(POLICIES), default="truncate")
    ap.add_argument("--max-tool-rounds", type=int, default=4, help="tool calls per question")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--scripted",
        action="store_true",
        help="a SCRIPTED tool-calling model plays the assistant (the server still gets every "
        "prompt and reports its cache); for models that do not call tools",
    )
    args = ap.parse_args(argv)

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    wrapped = leyline.wrap(client, policy=POLICIES[args.policy])  # the one line
    scripted = ScriptedToolCaller() if args.scripted else None
    if scripted is not None:
        print("SCRIPTED tool calls (--scripted): the server's answers are discarded")
    step = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_project(root)
        history: list[dict[str, Any]] = [
            {"role": "system", "content": "You answer questions about a project using tools."}
        ]
        for q, question in enumerate(QUESTIONS):
            print(f"user: {question}")
            history.append({"role": "user", "content": question})
            for _ in range(args.max_tool_rounds + 1):
                step += 1
                resp = wrapped.chat.completions.create(
                    model=args.model,
                    messages=history,
                    tools=TOOLS,
                    max_tokens=1 if scripted else args.max_tokens,
                )
                report(step, wrapped)
                if scripted is not None:
                    msg = scripted.reply(q)
                else:
                    msg = resp.choices[0].message.model_dump(exclude_none=True)
                history.append(msg)
                if not msg.get("tool_calls"):
                    print(f"assistant: {(msg.get('content') or '').strip()[:200]}")
                    break
                for call in msg["tool_calls"]:
                    fn = call["function"]
                    print(f"  tool {fn['name']}({fn['arguments']})")
                    output = run_tool(root, fn["name"], fn["arguments"])
                    history.append({"role": "tool", "tool_call_id": call["id"], "content": output})
    t = wrapped.totals
    print(
        f"total over {t.requests} accounted requests: exact={t.exact} spliced={t.spliced} "
        f"chunk_reused={t.chunk_reused} recomputed={t.recomputed} "
        f"reused={t.reused_fraction:.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
