"""History policies: pure, composable edits of an agent's message list.

A policy maps the full history (OpenAI-style dicts, see :mod:`leyline.middleware.messages` for
what a *turn* and a *tool call* are) to the list actually sent, and says which edited messages
must be *forgotten* (re-prefilled exactly, :attr:`leyline.Mode.FORGET`) rather than amortized.
The session then diffs what is sent against the previous request and turns every edit into a
directive, so a policy never has to know about tokens or caches.

Every policy here is

- **pure and deterministic**: the same history gives the same output, so a message edited on one
  request is byte-identical on the next (otherwise the next diff sees a new edit and the cache
  reuse is lost);
- **idempotent**: applying it to its own output changes nothing, so histories that already hold
  edited messages (a LangGraph state, a replayed trace) are safe;
- **valid-preserving**: no orphan tool messages, tool call ids untouched.

>>> from leyline.middleware import TruncateOlderThan, Redact
>>> policy = TruncateOlderThan(n=2, max_chars=200) | Redact(r"sk-[A-Za-z0-9]+")
>>> result = policy.apply([{"role": "user", "content": "key sk-abc123"}])
>>> result.messages[0]["content"], sorted(result.forget)
('key [REDACTED]', [0])
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from leyline.middleware.messages import Message, map_text, message_text, tool_results, turn_of

__all__ = [
    "Compose",
    "DropFailedToolCalls",
    "KeepAll",
    "LastNObservations",
    "Policy",
    "PolicyResult",
    "Redact",
    "TruncateOlderThan",
    "looks_like_error",
]

ERROR_MARKERS = ("error", "traceback (most recent call last)")


def looks_like_error(text: str) -> bool:
    """Default failure test for a tool result: it starts (after whitespace) with an error marker.

    The markers are ``"error"`` (any case: ``Error:``, ``ERROR``, ``error executing ...``) and a
    Python ``Traceback (most recent call last)``.

    >>> looks_like_error("  Error: file not found"), looks_like_error("2 errors fixed")
    (True, False)
    """
    return text.lstrip().lower().startswith(ERROR_MARKERS)


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """What a policy sends: ``messages``; ``forget``: indices into ``messages`` whose edits must
    be re-prefilled exactly; ``sources``: for each output message, the input index it came from.
    """

    messages: tuple[Message, ...]
    forget: frozenset[int] = frozenset()
    sources: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.messages):
            raise ValueError("sources must give one input index per output message")
        if any(not 0 <= i < len(self.messages) for i in self.forget):
            raise ValueError("forget indices must point into messages")

    @classmethod
    def unchanged(cls, messages: Sequence[Message]) -> PolicyResult:
        """The identity result for ``messages``."""
        return cls(tuple(messages), frozenset(), tuple(range(len(messages))))


class Policy(ABC):
    """A history policy. Subclasses implement :meth:`apply`; ``a | b`` applies ``a`` then ``b``."""

    __slots__ = ()

    @abstractmethod
    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        """The messages to send for this history; never mutates ``messages``."""

    def __or__(self, other: Policy) -> Compose:
        return Compose(self, other)


def _edit_contents(
    messages: Sequence[Mapping[str, Any]],
    fn: Callable[[int, Mapping[str, Any]], Any],
    *,
    forget: bool,
) -> PolicyResult:
    """Apply ``fn(index, message) -> new content`` (or the same object for no change)."""
    out: list[Message] = []
    edited: set[int] = set()
    for i, m in enumerate(messages):
        content = m.get("content")
        new = fn(i, m)
        if new is not content and new != content:
            out.append({**m, "content": new})
            edited.add(i)
        else:
            out.append(dict(m))
    return PolicyResult(tuple(out), frozenset(edited if forget else ()), tuple(range(len(out))))


@dataclass(frozen=True, slots=True)
class KeepAll(Policy):
    """Send the history as it is (the baseline arm)."""

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        return PolicyResult.unchanged([dict(m) for m in messages])


@dataclass(frozen=True, slots=True)
class TruncateOlderThan(Policy):
    """Cut tool outputs older than the last ``n`` turns to ``max_chars`` characters + ``marker``.

    A tool message is *older than the last n turns* when its turn index is below
    ``turns - n`` (``turns`` = number of assistant messages). Text of at most ``max_chars``
    characters is left alone; longer text keeps its first ``max_chars`` characters followed by
    ``marker``. Re-applying cuts ``text[:max_chars] + marker`` to the same string, so the rule is
    idempotent. Edits are AMORTIZE unless ``forget=True``.

    >>> msgs = [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
    ...          "function": {"name": "ls", "arguments": "{}"}}]},
    ...         {"role": "tool", "tool_call_id": "a", "content": "x" * 300},
    ...         {"role": "assistant", "content": "done"}]
    >>> out = TruncateOlderThan(n=1, max_chars=4).apply(msgs).messages
    >>> out[1]["content"]
    'xxxx\\n[... truncated]'
    """

    n: int = 2
    max_chars: int = 200
    marker: str = "\n[... truncated]"
    forget: bool = False

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if self.max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {self.max_chars}")

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        turns = turn_of(messages)
        cutoff = sum(m.get("role") == "assistant" for m in messages) - self.n

        def cut(text: str) -> str:
            return text if len(text) <= self.max_chars else text[: self.max_chars] + self.marker

        def edit(i: int, m: Mapping[str, Any]) -> Any:
            if m.get("role") != "tool" or turns[i] >= cutoff:
                return m.get("content")
            return map_text(m.get("content"), cut)

        return _edit_contents(messages, edit, forget=self.forget)


@dataclass(frozen=True, slots=True)
class LastNObservations(Policy):
    """Keep the last ``n`` tool outputs; replace every older one with ``placeholder``.

    SWE-agent's history processor of the same name. The placeholder is fixed text, so the rule
    is idempotent and the replaced messages are byte-identical from one request to the next.
    Edits are AMORTIZE unless ``forget=True``.
    """

    n: int = 5
    placeholder: str = "[old tool output omitted]"
    forget: bool = False

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        tools = [i for i, m in enumerate(messages) if m.get("role") == "tool"]
        old = set(tools[: max(len(tools) - self.n, 0)])

        def edit(i: int, m: Mapping[str, Any]) -> Any:
            if i not in old or m.get("content") == self.placeholder:
                return m.get("content")
            return self.placeholder

        return _edit_contents(messages, edit, forget=self.forget)


@dataclass(frozen=True, slots=True)
class Redact(Policy):
    """Replace every match of ``pattern`` with ``replacement``; edited messages are FORGET.

    Applies to message text and, with ``arguments=True``, to assistant tool-call arguments (ids
    and names are never touched). FORGET makes the server re-prefill everything after the first
    redacted message, so the secret's influence does not persist in cached KV. ``pattern`` may not
    match the empty string or ``replacement`` (that would not be idempotent).

    >>> Redact(r"\\d{4}").apply([{"role": "user", "content": "pin 1234"}]).messages[0]["content"]
    'pin [REDACTED]'
    """

    pattern: re.Pattern[str] | str
    replacement: str = "[REDACTED]"
    arguments: bool = True
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            regex = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"invalid redaction pattern {self.pattern!r}: {exc}") from exc
        if regex.fullmatch(""):
            raise ValueError(f"redaction pattern {regex.pattern!r} matches the empty string")
        if regex.search(self.replacement):
            raise ValueError(f"redaction pattern {regex.pattern!r} matches its replacement")
        object.__setattr__(self, "_regex", regex)

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        def sub(text: str) -> str:
            return self._regex.sub(self.replacement, text)

        out: list[Message] = []
        forget: set[int] = set()
        for i, m in enumerate(messages):
            new = dict(m)
            content = map_text(m.get("content"), sub)
            if content is not m.get("content") and content != m.get("content"):
                new["content"] = content
            if self.arguments and m.get("tool_calls"):
                calls = [self._redact_call(c) for c in m["tool_calls"]]
                if calls != list(m["tool_calls"]):
                    new["tool_calls"] = calls
            if new != m:
                forget.add(i)
            out.append(new)
        return PolicyResult(tuple(out), frozenset(forget), tuple(range(len(out))))

    def _redact_call(self, call: Mapping[str, Any]) -> Any:
        fn = call.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("arguments"), str):
            return call
        args = self._regex.sub(self.replacement, fn["arguments"])
        return call if args == fn["arguments"] else {**call, "function": {**fn, "arguments": args}}


@dataclass(frozen=True, slots=True)
class DropFailedToolCalls(Policy):
    """Remove a failed tool call and its error once a later call succeeds.

    A call *failed* when its result's text satisfies ``is_failure`` (default
    :func:`looks_like_error`: starts with an error marker). It is removed (the entry from the
    assistant's ``tool_calls`` and its tool message) when an assistant message *after* it makes a
    call whose result did not fail; with ``same_tool=True`` (default) that later call must be to
    the same function (a retry). An assistant message left with no calls and no text is removed
    too; one with text keeps its text. Deletions are AMORTIZE (a deletion has no new content to
    re-prefill). ``is_failure`` must be a pure function for the policy to stay deterministic.
    """

    is_failure: Callable[[str], bool] = looks_like_error
    same_tool: bool = True

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        results = tool_results(messages)
        by_call = {key: i for i, key in results.items()}
        # (assistant index, call position, function name, failed?) for every answered call
        calls: list[tuple[int, int, str, bool]] = []
        for (owner, k), i in sorted(by_call.items()):
            name = str((messages[owner]["tool_calls"][k].get("function") or {}).get("name"))
            calls.append((owner, k, name, self.is_failure(message_text(messages[i]))))
        dropped: set[tuple[int, int]] = set()
        for owner, k, name, failed in calls:
            if failed and any(
                later > owner and not bad and (not self.same_tool or other == name)
                for later, _, other, bad in calls
            ):
                dropped.add((owner, k))
        if not dropped:
            return PolicyResult.unchanged([dict(m) for m in messages])

        out: list[Message] = []
        sources: list[int] = []
        for i, m in enumerate(messages):
            if i in results and results[i] in dropped:
                continue
            new = dict(m)
            if m.get("role") == "assistant" and m.get("tool_calls"):
                kept = [c for k, c in enumerate(m["tool_calls"]) if (i, k) not in dropped]
                if len(kept) < len(m["tool_calls"]):
                    if kept:
                        new["tool_calls"] = kept
                    elif message_text(m):
                        del new["tool_calls"]
                    else:
                        continue
            out.append(new)
            sources.append(i)
        return PolicyResult(tuple(out), frozenset(), tuple(sources))


@dataclass(frozen=True, slots=True, init=False)
class Compose(Policy):
    """Apply policies left to right; ``Compose(a, b)`` is ``a | b``.

    Forget indices and sources are carried through: a message one policy marked FORGET stays
    marked wherever later policies move it.
    """

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        flat: list[Policy] = []
        for p in policies:
            if not isinstance(p, Policy):
                raise TypeError(f"Compose takes policies, got {type(p).__name__}")
            flat.extend(p.policies if isinstance(p, Compose) else (p,))
        object.__setattr__(self, "policies", tuple(flat))

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        result = PolicyResult.unchanged([dict(m) for m in messages])
        for policy in self.policies:
            step = policy.apply(result.messages)
            forget = set(step.forget)
            forget.update(j for j, src in enumerate(step.sources) if src in result.forget)
            sources = tuple(result.sources[src] for src in step.sources)
            result = PolicyResult(step.messages, frozenset(forget), sources)
        return result
