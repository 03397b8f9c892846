"""A small agent history shared by the engine's cache tests: two tool outputs between turns."""

from __future__ import annotations

from typing import Any


def tool_output(tag: str, lines: int = 40) -> str:
    """``lines`` lines of tool output, distinct per ``tag``."""
    return "".join(f"{tag} line {i}: value={i * 7 % 13} status=ok\n" for i in range(lines))


def debug_history(tag: str) -> list[dict[str, Any]]:
    """System prompt, task, two tool calls with their outputs, and a follow-up question."""
    return [
        {"role": "system", "content": "You are a debugging agent."},
        {"role": "user", "content": f"Task {tag}: find the failing test."},
        {"role": "assistant", "content": "I will run the tests."},
        {"role": "user", "content": tool_output(tag + "-a")},
        {"role": "assistant", "content": "Now the logs."},
        {"role": "user", "content": tool_output(tag + "-b")},
        {"role": "assistant", "content": "Found it."},
        {"role": "user", "content": "Which file?"},
    ]
