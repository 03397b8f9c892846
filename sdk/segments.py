"""Segments: the client's content-defined, position-independent view of a chat prompt.

A prompt is rendered into segments, one or more per message. A long content is split by
content-defined chunking (CDC) on its text with every cut point on a line end, so the same text
is cut the same way wherever it sits in the history:

- a cut may follow a line when at least ``min_chars`` have accumulated since the last cut, and
  the line "fires": ``xxh64(line) % expected_chars < len(line)``. A line fires with probability
  proportional to its length, so chunks average ``expected_chars`` whatever the line lengths;
- a chunk never exceeds ``max_chars``: it is cut at the last line end before the limit, and a
  single line longer than ``max_chars`` (minified JSON, say) is cut every ``max_chars``
  characters, the only cut points not on a line end.

Every segment carries an xxh64 hash of what it renders to: role, the piece of content, and the
non-content parts the chat template puts in front of it (tool call ids, the previous message's
tool calls, the message's own reasoning, which templates of reasoning models render before the
answer, so dropping it edits that message alone). The server tokenizes the prompt segment by segment with the same split, so equal
hashes mean equal tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

__all__ = ["Segment", "SegmentParams", "message_text", "render_segments", "split_content"]


@dataclass(frozen=True, slots=True)
class SegmentParams:
    """Text CDC parameters (characters). The defaults give ~512-character segments."""

    expected_chars: int = 512
    min_chars: int = 128
    max_chars: int = 2048

    def __post_init__(self) -> None:
        if not 0 < self.min_chars <= self.expected_chars <= self.max_chars:
            raise ValueError("need 0 < min_chars <= expected_chars <= max_chars")


DEFAULT_PARAMS = SegmentParams()


@dataclass(frozen=True, slots=True)
class Segment:
    """One piece of one message: ``message`` index, ``role``, content ``hash`` and size."""

    message: int
    role: str
    hash: str
    chars: int


def split_content(text: str, params: SegmentParams = DEFAULT_PARAMS) -> list[str]:
    """Split ``text`` into content-defined pieces that concatenate back to ``text``.

    >>> pieces = split_content("line\\n" * 400)
    >>> "".join(pieces) == "line\\n" * 400
    True
    """
    if len(text) <= params.min_chars:
        return [text]
    pieces: list[str] = []
    start = 0  # start of the current piece
    last_end = 0  # end of the last complete line inside the current piece
    pos = 0
    n = len(text)
    while pos < n:
        nl = text.find("\n", pos)
        line_end = n if nl < 0 else nl + 1
        if line_end - start > params.max_chars:
            if last_end > start:  # cut at the last line end that fits
                pieces.append(text[start:last_end])
                start = last_end
                continue
            # one line longer than the limit: hard cuts every max_chars characters
            cut = start + params.max_chars
            pieces.append(text[start:cut])
            start = last_end = pos = cut
            continue
        line = text[pos:line_end]
        pos = last_end = line_end
        if (
            line_end - start >= params.min_chars
            and line_end < n
            and xxhash.xxh64_intdigest(line.encode()) % params.expected_chars < len(line)
        ):
            pieces.append(text[start:line_end])
            start = line_end
    if start < n:
        pieces.append(text[start:])
    return pieces


def message_text(message: Mapping[str, Any]) -> str:
    """The text content of an OpenAI-style message (string or list of text parts)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise TypeError(f"message content must be a string or a list of parts, got {type(content)}")


def _extras(message: Mapping[str, Any]) -> str:
    """Non-content fields a chat template renders, canonicalised."""
    extra = {k: message[k] for k in ("name", "tool_call_id", "tool_calls") if message.get(k)}
    return json.dumps(extra, sort_keys=True, separators=(",", ":")) if extra else ""


def _reasoning(message: Mapping[str, Any]) -> str:
    """The message's reasoning fields (``reasoning_content``, ``reasoning``), canonicalised.

    Templates of reasoning models (Qwen3, DeepSeek-R1) render them in front of the answer, inside
    the message; unlike tool calls they never reach the next message's glue.
    """
    parts = {k: message[k] for k in ("reasoning_content", "reasoning") if message.get(k)}
    return json.dumps(parts, sort_keys=True, separators=(",", ":")) if parts else ""


def render_segments(
    messages: Sequence[Mapping[str, Any]],
    params: SegmentParams = DEFAULT_PARAMS,
    *,
    cache: dict[tuple[str, str], list[str]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[Segment]:
    """Render chat messages into segments (see the module docstring).

    ``cache`` maps ``(role, text)`` to its pieces; pass the same dict on every call of one
    session so unchanged messages are not split again. ``tools`` (OpenAI tool definitions)
    are rendered by templates in front of the first message, so they enter its hash.

    >>> [s.message for s in render_segments([{"role": "user", "content": "hi"}])]
    [0]
    """
    segments: list[Segment] = []
    previous_tail = json.dumps(list(tools), sort_keys=True) if tools else ""
    for m, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str):
            raise TypeError(f"message {m} has no string 'role'")
        text = message_text(message)
        key = (role, text)
        pieces = cache.get(key) if cache is not None else None
        if pieces is None:
            pieces = split_content(text, params) if text else [""]
            if cache is not None:
                cache[key] = pieces
        extras = _extras(message)
        for i, piece in enumerate(pieces):
            h = xxhash.xxh64()
            if i == 0:  # the template glue in front of a message belongs to its first piece
                glue = f"{previous_tail}\x1f{role}\x1f{extras}\x1f{_reasoning(message)}\x1f"
                h.update(glue.encode("utf-8", "surrogatepass"))
            h.update(piece.encode("utf-8", "surrogatepass"))
            segments.append(Segment(m, role, h.hexdigest(), len(piece)))
        previous_tail = extras
    return segments
