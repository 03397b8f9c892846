"""A LangGraph ReAct agent whose model calls go through a Leyline policy and session.

Needs ``pip install 'leyline[langgraph]'``. Run against ``leyline serve``::

    python examples/langgraph_agent.py --base-url http://127.0.0.1:8000/v1 --model smollm2

``leyline_model(ChatOpenAI(...), policy=...)`` is the one line: it is a LangChain chat model,
so ``create_react_agent`` binds the tools to it as usual. Each LangGraph thread id gets its own
Leyline session; the policy's edits (and any edit the graph makes to its own state) become
directives. Every model call prints what the server reused.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.errors import GraphRecursionError

from leyline.middleware import KeepAll, Policy, TruncateOlderThan
from leyline.middleware.langgraph import leyline_model

with warnings.catch_warnings():
    # NOTE: langgraph 1.x deprecates create_react_agent in favour of langchain's create_agent;
    # it still works and is what langgraph itself ships.
    warnings.simplefilter("ignore")
    from langgraph.prebuilt import create_react_agent

POLICIES: dict[str, Policy] = {
    "keep_all": KeepAll(),
    "truncate": TruncateOlderThan(n=2, max_chars=200),
}

INVENTORY = {f"item-{i:03d}": (i * 37) % 101 for i in range(120)}


@tool
def list_inventory() -> str:
    """List every inventory item with its stock level."""
    return "\n".join(f"{name}: {count} in stock" for name, count in INVENTORY.items())


@tool
def restock(name: str, amount: int) -> str:
    """Add `amount` units of item `name` to the stock."""
    if name not in INVENTORY:
        return f"Error: no item named {name!r}"
    return f"{name}: {INVENTORY[name] + amount} in stock after restocking {amount}"


QUESTIONS = [
    "Which items have fewer than 5 units? Use list_inventory.",
    "Restock item-001 by 10 units.",
    "Restock every item you found with fewer than 5 units by 20.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--api-key", default="leyline")
    ap.add_argument("--policy", choices=sorted(POLICIES), default="truncate")
    ap.add_argument("--thread", default="inventory-1", help="LangGraph thread id")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--recursion-limit", type=int, default=12)
    args = ap.parse_args(argv)

    chat = ChatOpenAI(
        model=args.model, base_url=args.base_url, api_key=args.api_key, max_tokens=args.max_tokens
    )
    model = leyline_model(chat, policy=POLICIES[args.policy])  # the one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = create_react_agent(model, [list_inventory, restock], checkpointer=InMemorySaver())
    config: dict[str, Any] = {
        "configurable": {"thread_id": args.thread},
        "recursion_limit": args.recursion_limit,
    }
    seen = 0
    for question in QUESTIONS:
        print(f"user: {question}")
        try:
            agent.invoke({"messages": [("user", question)]}, config)
        except GraphRecursionError:
            print(f"  (stopped after {args.recursion_limit} graph steps)")
        state = agent.get_state(config).values
        for msg in state["messages"][seen:]:
            ley = msg.response_metadata.get("leyline") if msg.type == "ai" else None
            if msg.type == "ai":
                calls = ", ".join(c["name"] for c in msg.tool_calls) or "-"
                tokens = (ley or {}).get("tokens")
                print(f"  model call: tools={calls} leyline={tokens or 'no accounting'}")
        seen = len(state["messages"])
        print(f"assistant: {str(state['messages'][-1].content).strip()[:200]}")
    t = model.totals(args.thread)
    print(
        f"thread {args.thread}: {t.requests} accounted requests, exact={t.exact} "
        f"spliced={t.spliced} chunk_reused={t.chunk_reused} recomputed={t.recomputed} "
        f"reused={t.reused_fraction:.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
