"""Segment-wise chat tokenization: identical content yields identical token ids at any position.

The chat template is rendered to text once. Each message's content is then located in that
text, split into pieces (``leyline.segments.split_content``: content-defined cuts snapped to
newlines), and every piece, and every stretch of template glue between contents, is tokenized
on its own (``add_special_tokens=False``). A BPE merge never crosses a piece boundary, so a
piece's ids depend only on its text, not on what precedes it (BRIEF §3 "Client-side
alignment"). The ids can differ from tokenizing the whole prompt at once, at piece boundaries
only; they decode to the same text.

Segments partition the prompt's tokens, excluding the trailing generation prompt (e.g.
``<|im_start|>assistant\\n``): segment k of message m covers content piece k; the glue before a
message's first piece belongs to that first segment, and the glue after the last message's
content belongs to the last segment.

Templates and tools:

- Contents are normalized to strings before rendering, as the client's
  ``leyline.segments.message_text`` does: ``None`` becomes ``""`` and a list of parts becomes
  its text parts joined with ``""`` (non-text parts are refused: the engine is text-only).
- Templates that know tools get ``tools`` and assistant ``tool_calls`` as is. Templates that do
  not (SmolLM2's ignores both, and fails on a ``None`` content) get them rendered as text, in
  the ``<tool_call>`` JSON convention: the tool definitions go in a ``# Tools`` block at the
  start of the system message (or in a system message of their own when there is none, which
  replaces a template's default system prompt), so they land in the first message's first
  segment, where the client hashes them; each tool call goes after its assistant message's
  content, so it lands in the next message's first segment, where the client hashes the
  previous message's tool calls. ``tool`` role messages render with the template's generic
  role handling. All of this text is template glue, never content.
- If a content cannot be located in the rendered text (a template that rewrites content), or
  the pieces do not decode back to the text (a tokenizer that adds a prefix space to every
  piece), the whole prompt is tokenized at once and ``aligned`` is False, with no segments.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from leyline.segments import split_content


@dataclass(frozen=True, slots=True, eq=False)
class PromptTokens:
    """A tokenized chat prompt and its segments.

    ``segment_spans`` are half-open token spans that partition ``[0, len(ids) - g)``, where g is
    the length of the generation prompt; ``message_of_segment[k]`` is the index (into the
    caller's ``messages``) of the message segment k belongs to. ``aligned`` is False when the
    prompt had to be tokenized whole (then there are no segments).
    """

    ids: np.ndarray
    segment_spans: tuple[tuple[int, int], ...]
    message_of_segment: tuple[int, ...]
    aligned: bool

    def __post_init__(self) -> None:
        if self.ids.ndim != 1 or self.ids.dtype != np.int64:
            raise ValueError("ids must be a 1-D int64 array")
        if len(self.segment_spans) != len(self.message_of_segment):
            raise ValueError("one message index per segment is required")
        expected = 0
        for start, end in self.segment_spans:
            if start != expected or end < start:
                raise ValueError("segment spans must be contiguous and in order from 0")
            expected = end
        if expected > len(self.ids):
            raise ValueError("segment spans run past the end of the ids")

    @property
    def prompt_end(self) -> int:
        """Where the segments end: the start of the generation prompt (aligned prompts only)."""
        return self.segment_spans[-1][1] if self.segment_spans else 0


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> PromptTokens:
    """Render ``messages`` with the tokenizer's chat template and tokenize it segment by segment.

    Example::

        tokens = tokenize_chat(tok, [{"role": "user", "content": "Hi"}])
        tok.decode(tokens.ids)  # the rendered prompt, generation prompt included
    """
    if not messages:
        raise ValueError("messages must not be empty")
    contents = [_content_text(message, index) for index, message in enumerate(messages)]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    native_tools = "tools" in template
    native_calls = "tool_calls" in template
    # apply_chat_template takes an invariant list[dict | Callable], so pass a widened copy.
    template_tools: list[dict[str, Any] | Callable[..., Any]] | None = (
        list(tools) if tools is not None and native_tools else None
    )

    def render(texts: list[str], with_prompt: bool) -> str:
        conversation = _conversation(messages, texts, contents, tools, native_tools, native_calls)
        rendered = tokenizer.apply_chat_template(
            conversation,
            tools=template_tools,
            tokenize=False,
            add_generation_prompt=with_prompt,
        )
        assert isinstance(rendered, str)
        return rendered

    text = render(contents, add_generation_prompt)
    body = render(contents, False) if add_generation_prompt else text
    generation_prompt = text[len(body) :] if text.startswith(body) else ""
    starts = _locate(text, contents, render, add_generation_prompt)
    if starts is not None:
        tokens = _aligned(tokenizer, text, contents, starts, len(generation_prompt))
        if tokens is not None:
            return tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return PromptTokens(np.asarray(ids, dtype=np.int64), (), (), aligned=False)


def _content_text(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"message {index}: only text content parts are supported, got {kind!r}"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)  # as the client's leyline.segments.message_text
    raise ValueError(f"message {index}: content must be a string, a list of parts or None")


def _tool_call_text(calls: list[dict[str, Any]]) -> str:
    blocks = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            # A malformed argument string stays verbatim: it is what the model said.
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        payload = json.dumps({"name": function.get("name"), "arguments": arguments})
        blocks.append(f"<tool_call>\n{payload}\n</tool_call>")
    return "\n".join(blocks)


def _tools_text(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(tool) for tool in tools)
    return (
        "# Tools\n\nYou can call the functions described inside <tools></tools>:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "To call a function, answer with a JSON object holding its name and arguments inside "
        '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <arguments-object>}\n</tool_call>'
    )


def _conversation(
    messages: list[dict[str, Any]],
    texts: list[str],
    contents: list[str],
    tools: list[dict[str, Any]] | None,
    native_tools: bool,
    native_calls: bool,
) -> list[dict[str, Any]]:
    """Messages as the template gets them: string contents, tools as text where needed.

    ``texts`` stand in for the real ``contents`` (placeholders when locating); every choice
    depends on the real contents only, so both renderings differ in the contents alone.
    """
    conversation = []
    for message, text, content in zip(messages, texts, contents, strict=True):
        rendered = dict(message)
        calls = message.get("tool_calls")
        if calls and not native_calls:
            rendered.pop("tool_calls")
            separator = "\n" if content else ""
            text = f"{text}{separator}{_tool_call_text(calls)}"
        rendered["content"] = text
        conversation.append(rendered)
    if tools and not native_tools:
        block = _tools_text(tools)
        if conversation[0].get("role") == "system":
            first = conversation[0]
            separator = "\n\n" if contents[0] else ""
            first["content"] = f"{block}{separator}{first['content']}"
        else:
            conversation.insert(0, {"role": "system", "content": block})
    return conversation


def _locate(
    text: str, contents: list[str], render: Any, add_generation_prompt: bool
) -> list[int] | None:
    """Start offset of every content in ``text``, or None when they cannot all be found.

    First render with unique placeholders in place of the contents: that pins each content to
    its exact place even when it also occurs inside template glue (content "user", say).
    Templates that transform contents break that; then search the contents in order.
    """
    nonce = secrets.token_hex(8)
    markers = [f"\x1f{nonce}:{index}\x1f" for index in range(len(contents))]
    marked = render(markers, add_generation_prompt)
    starts: list[int] = []
    rebuilt: list[str] = []
    cursor = shift = 0
    for marker, content in zip(markers, contents, strict=True):
        at = marked.find(marker, cursor)
        if at < 0:
            break
        rebuilt.append(marked[cursor:at])
        starts.append(at + shift)
        rebuilt.append(content)
        shift += len(content) - len(marker)
        cursor = at + len(marker)
    rebuilt.append(marked[cursor:])
    if len(starts) == len(contents) and "".join(rebuilt) == text:
        return starts
    starts, cursor = [], 0
    for content in contents:
        at = text.find(content, cursor)
        if at < 0:
            return None
        starts.append(at)
        cursor = at + len(content)
    return starts


def _aligned(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    contents: list[str],
    starts: list[int],
    generation_chars: int,
) -> PromptTokens | None:
    # Chunks in prompt order; owner[i] is (message, piece) for a content piece, None for glue.
    chunks: list[str] = []
    owner: list[tuple[int, int] | None] = []
    cursor = 0
    for message, (content, start) in enumerate(zip(contents, starts, strict=True)):
        chunks.append(text[cursor:start])
        owner.append(None)
        for piece_index, piece in enumerate(split_content(content) if content else [""]):
            chunks.append(piece)
            owner.append((message, piece_index))
        cursor = start + len(content)
    body_end = len(text) - generation_chars
    if cursor > body_end:  # the last content ran into the generation prompt: odd template
        return None
    chunks += [text[cursor:body_end], text[body_end:]]
    owner += [None, None]
    encoded = tokenizer(chunks, add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    ids = np.fromiter((t for chunk_ids in encoded for t in chunk_ids), dtype=np.int64)
    decoded = tokenizer.decode(
        ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    if decoded != text:
        return None
    spans: list[tuple[int, int]] = []
    message_of_segment: list[int] = []
    position = pending = 0  # pending: glue tokens waiting for the next content piece
    for chunk_owner, length in zip(owner[:-1], lengths[:-1], strict=True):
        if chunk_owner is None:
            pending += length
            continue
        spans.append((position, position + pending + length))
        message_of_segment.append(chunk_owner[0])
        position += pending + length
        pending = 0
    last_start, last_end = spans[-1]
    spans[-1] = (last_start, last_end + pending)  # trailing glue joins the last segment
    return PromptTokens(ids, tuple(spans), tuple(message_of_segment), aligned=True)
