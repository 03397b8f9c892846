"""OpenAI-style chat messages: turns, tool-call pairing and text access for history policies.

Messages are plain dicts in the Chat Completions shape (``role``, ``content``, and for assistant
messages ``tool_calls``; for tool messages ``tool_call_id``). Definitions used by every policy:

- **turn**: an assistant message starts a turn; the turn runs up to (not including) the next
  assistant message, so it holds that assistant message, the tool results answering its calls and
  any user message that follows. Messages before the first assistant message belong to no turn
  (turn ``-1``): system prompt and task.
- **tool call**: one entry of an assistant message's ``tool_calls``; its **result** is the tool
  message after it whose ``tool_call_id`` equals the call's ``id``.
- **valid list**: every tool message answers a call of the nearest assistant message before it
  (only tool messages in between), so no tool message is an orphan. This is what OpenAI-style
  APIs require; policies keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "Message",
    "as_message_dicts",
    "check_valid",
    "map_text",
    "message_text",
    "orphan_tool_messages",
    "tool_call_ids",
    "tool_results",
    "turn_of",
]

Message = dict[str, Any]


def as_message_dicts(messages: Iterable[Any]) -> list[Message]:
    """Plain-dict copies (one level deep) of ``messages`` (dicts, TypedDicts or pydantic models).

    >>> as_message_dicts([{"role": "user", "content": "hi"}])
    [{'role': 'user', 'content': 'hi'}]
    """
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            out.append(dict(m))
        elif hasattr(m, "model_dump"):
            out.append(m.model_dump(exclude_none=True))
        else:
            raise TypeError(f"message {i} is a {type(m).__name__}, expected a dict")
    return out


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message's content: the string, or its text parts joined; ``""`` if none."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return ""


def map_text(content: Any, fn: Callable[[str], str]) -> Any:
    """``content`` with ``fn`` applied to its text: the string itself, or each text part.

    Non-text parts (images, audio) and ``None`` come back unchanged. A new object is returned only
    when some text changed, so callers can test identity to know whether anything was edited.
    """
    if isinstance(content, str):
        return fn(content)
    if isinstance(content, list):
        parts: list[Any] = []
        changed = False
        for p in content:
            if (
                isinstance(p, Mapping)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
            ):
                new = fn(p["text"])
                if new != p["text"]:
                    p = {**p, "text": new}
                    changed = True
            parts.append(p)
        return parts if changed else content
    return content


def tool_call_ids(message: Mapping[str, Any]) -> list[str]:
    """The ids of an assistant message's tool calls, in order (``[]`` for other messages)."""
    if message.get("role") != "assistant":
        return []
    return [str(c.get("id")) for c in message.get("tool_calls") or ()]


def turn_of(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """For each message, the 0-based turn it belongs to (``-1`` before the first assistant).

    >>> turn_of([{"role": "system"}, {"role": "assistant"}, {"role": "tool"},
    ...          {"role": "assistant"}])
    [-1, 0, 0, 1]
    """
    turns: list[int] = []
    current = -1
    for m in messages:
        if m.get("role") == "assistant":
            current += 1
        turns.append(current)
    return turns


def tool_results(messages: Sequence[Mapping[str, Any]]) -> dict[int, tuple[int, int]]:
    """Map each answered tool message's index to ``(assistant index, call position)``.

    Orphan tool messages (see :func:`orphan_tool_messages`) are left out.
    """
    out: dict[int, tuple[int, int]] = {}
    owner: int | None = None
    positions: dict[str, int] = {}
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant":
            owner = i
            positions = {cid: k for k, cid in enumerate(tool_call_ids(m))}
        elif role == "tool":
            k = positions.get(str(m.get("tool_call_id")))
            if owner is not None and k is not None:
                out[i] = (owner, k)
        else:
            # why: a tool result must directly follow its assistant message (tools in between).
            owner, positions = None, {}
    return out


def orphan_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of tool messages that answer no call of the assistant message before them."""
    answered = tool_results(messages)
    return [i for i, m in enumerate(messages) if m.get("role") == "tool" and i not in answered]


def check_valid(messages: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` if the list has an orphan tool message or a tool call answered twice.

    >>> check_valid([{"role": "tool", "tool_call_id": "x", "content": "1"}])
    Traceback (most recent call last):
    ...
    ValueError: orphan tool messages at [0]: no matching tool call before them
    """
    orphans = orphan_tool_messages(messages)
    if orphans:
        raise ValueError(f"orphan tool messages at {orphans}: no matching tool call before them")
    seen: set[tuple[int, int]] = set()
    for i, key in tool_results(messages).items():
        if key in seen:
            raise ValueError(f"tool message {i} answers a tool call that was already answered")
        seen.add(key)
