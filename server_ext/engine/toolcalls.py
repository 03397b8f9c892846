"""Tool-call parsing for models whose chat template asks for ``<tool_call>{json}</tool_call>``
blocks (Hermes/Qwen style; SmolLM2's template defines no tool format, so its replies are text)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a reply into its text and OpenAI-shaped ``tool_calls``.

    Blocks that are not a JSON object with a string ``name`` stay in the text.

    >>> content, calls = parse_tool_calls('<tool_call>{"name": "ls", "arguments": {}}</tool_call>')
    >>> (content, calls[0]["function"]["name"])
    (None, 'ls')
    """
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:16]}",
                "type": "function",
                "function": {
                    "name": obj["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls
