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

Modes: every policy that edits takes ``mode`` (:attr:`~leyline.Mode.AMORTIZE`,
:attr:`~leyline.Mode.FORGET` or :attr:`~leyline.Mode.REPAIR`, or their value strings); ``None``
leaves its edits to the adapter's ``default_mode`` (``leyline.wrap(..., default_mode=...)``,
AMORTIZE unless set). A plain function
``messages -> messages`` is a policy too (:func:`as_policy`); its edits get ``default_mode``.

>>> from leyline.middleware import TruncateOlderThan, Redact
>>> policy = TruncateOlderThan(n=2, max_chars=200) | Redact(r"sk-[A-Za-z0-9]+")
>>> result = policy.apply([{"role": "user", "content": "key sk-abc123"}])
>>> result.messages[0]["content"], sorted(result.forget)
('key [REDACTED]', [0])
"""

from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any, TypeAlias, TypedDict

from leyline.directives import Mode, parse_mode
from leyline.middleware.messages import Message, map_text, message_text, tool_results, turn_of

__all__ = [
    "DEBUG_GYM_FAILURE_MARKERS",
    "POLICY_NAMES",
    "Compose",
    "DropFailedToolCalls",
    "DropReasoning",
    "FunctionPolicy",
    "KeepAll",
    "LastNObservations",
    "Policy",
    "PolicyFunction",
    "PolicyLike",
    "PolicyResult",
    "Redact",
    "TruncateOlderThan",
    "as_policy",
    "looks_like_debug_gym_failure",
    "looks_like_error",
    "named_policy",
]

ERROR_MARKERS = ("error", "traceback (most recent call last)")
#: How debug-gym 1.3.0's tools and environment word a failed call (read from its
#: ``gym/tools/{view,edit,bash,pdb}.py`` and ``gym/envs/env.py``), lower-cased. Each observation
#: starts with its marker; a tool that raises gives ``"Error while using tool ..."``, which
#: :data:`ERROR_MARKERS` already match.
DEBUG_GYM_FAILURE_MARKERS = (
    "view failed. error message:",
    "edit failed. error message:",
    "unregistered tool:",
    "command failed with output:",
    "failure calling pdb:",
    "provided entrypoint failed to start a pdb session:",
)


def looks_like_error(text: str) -> bool:
    """Default failure test for a tool result: it starts (after whitespace) with an error marker.

    The markers are ``"error"`` (any case: ``Error:``, ``ERROR``, ``error executing ...``) and a
    Python ``Traceback (most recent call last)``.

    >>> looks_like_error("  Error: file not found"), looks_like_error("2 errors fixed")
    (True, False)
    """
    return text.lstrip().lower().startswith(ERROR_MARKERS)


def looks_like_debug_gym_failure(text: str) -> bool:
    """Failure test for debug-gym 1.3.0 tool results: :func:`looks_like_error`, or the text
    starts with one of :data:`DEBUG_GYM_FAILURE_MARKERS` (``View failed. Error message:``,
    ``Edit failed. Error message:``, ``Unregistered tool:``, ``Command failed with output:``,
    ``Failure calling pdb:``, ...).

    >>> looks_like_debug_gym_failure("Command failed with output:\\nls: cannot access 'x'")
    True
    >>> looks_like_debug_gym_failure("Viewing `purr.py`: 40 lines")
    False
    """
    head = text.lstrip().lower()
    return head.startswith(ERROR_MARKERS) or head.startswith(DEBUG_GYM_FAILURE_MARKERS)


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """What a policy sends: ``messages``; ``forget``: indices into ``messages`` whose edits must
    be re-prefilled exactly; ``sources``: for each output message, the input index it came from;
    ``amortize``: indices into ``messages`` whose edits are AMORTIZE whatever the adapter's
    ``default_mode``; ``dropped``: input messages the policy removed, each with the mode its
    removal asks for; ``repair``: indices into ``messages`` whose edits are REPAIR (AMORTIZE
    plus a recompute window after the edit).

    Edits of messages in no set, and removals not in ``dropped``, get the adapter's
    ``default_mode``; an index in several sets takes the strictest mode (FORGET, then REPAIR).
    """

    messages: tuple[Message, ...]
    forget: frozenset[int] = frozenset()
    sources: tuple[int, ...] = ()
    amortize: frozenset[int] = frozenset()
    dropped: tuple[tuple[Message, Mode], ...] = ()
    repair: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.messages):
            raise ValueError("sources must give one input index per output message")
        marked = self.forget | self.amortize | self.repair
        if any(not 0 <= i < len(self.messages) for i in marked):
            raise ValueError("forget, amortize and repair indices must point into messages")
        if any(not isinstance(mode, Mode) for _, mode in self.dropped):
            raise ValueError("each dropped message needs a leyline.Mode")

    @classmethod
    def unchanged(cls, messages: Sequence[Message]) -> PolicyResult:
        """The identity result for ``messages``."""
        return cls(tuple(messages), frozenset(), tuple(range(len(messages))))


class Policy(ABC):
    """A history policy. Subclasses implement :meth:`apply`; ``a | b`` applies ``a`` then ``b``
    (either side may be a plain function, see :func:`as_policy`)."""

    __slots__ = ()

    @abstractmethod
    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        """The messages to send for this history; never mutates ``messages``."""

    def __or__(self, other: PolicyLike) -> Compose:
        return Compose(self, other)

    def __ror__(self, other: PolicyFunction) -> Compose:
        return Compose(other, self)


#: A plain function policy: the history (a copy, as message dicts) to the messages to send.
PolicyFunction: TypeAlias = Callable[[list[Message]], Sequence[Mapping[str, Any]]]
#: What ``leyline.wrap(policy=...)`` and the adapters accept.
PolicyLike: TypeAlias = Policy | PolicyFunction


def _coerce_mode(mode: object) -> Mode | None:
    """``mode`` as a :class:`~leyline.Mode` (its value string is fine) or ``None``."""
    return None if mode is None else parse_mode(mode)


class _Marks(TypedDict):
    forget: frozenset[int]
    amortize: frozenset[int]
    repair: frozenset[int]


def _marks(mode: Mode | None, edited: set[int]) -> _Marks:
    """:class:`PolicyResult`'s ``forget``, ``amortize`` and ``repair`` for the ``edited``
    output indices under a policy's ``mode``."""
    marked = frozenset(edited)
    none: frozenset[int] = frozenset()
    return _Marks(
        forget=marked if mode is Mode.FORGET else none,
        amortize=marked if mode is Mode.AMORTIZE else none,
        repair=marked if mode is Mode.REPAIR else none,
    )


def _mode_and_forget(policy: Any) -> None:
    """Reconcile a policy's legacy ``forget: bool`` with its ``mode`` (frozen dataclass)."""
    mode = _coerce_mode(policy.mode)
    if policy.forget and mode not in (None, Mode.FORGET):
        raise ValueError(f"forget=True asks for FORGET, which contradicts mode={mode.name}")
    if policy.forget:
        mode = Mode.FORGET
    object.__setattr__(policy, "mode", mode)
    object.__setattr__(policy, "forget", mode is Mode.FORGET)


def _edit_contents(
    messages: Sequence[Mapping[str, Any]],
    fn: Callable[[int, Mapping[str, Any]], Any],
    *,
    mode: Mode | None,
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
    return PolicyResult(tuple(out), sources=tuple(range(len(out))), **_marks(mode, edited))


@dataclass(frozen=True, slots=True)
class KeepAll(Policy):
    """Send the history as it is (the baseline arm)."""

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        return PolicyResult.unchanged([dict(m) for m in messages])


@dataclass(frozen=True, slots=True)
class FunctionPolicy(Policy):
    """A plain function ``messages -> messages`` as a policy; its edits get ``default_mode``.

    ``fn`` gets a deep copy of the history as message dicts (it may mutate it) and returns the
    messages to send. Which output message came from which input is found by aligning the two
    lists (equal messages in order), so :class:`Compose` carries FORGET marks through it. Keep
    ``fn`` pure and idempotent like the built-in policies: a message it edits must come out the
    same on every request, or each request looks like a new edit.

    >>> def no_notes(messages):
    ...     return [m for m in messages if not m["content"].startswith("note:")]
    >>> FunctionPolicy(no_notes).apply([{"role": "user", "content": "note: x"},
    ...                                 {"role": "user", "content": "fix it"}]).sources
    (1,)
    """

    fn: PolicyFunction

    def __post_init__(self) -> None:
        if isinstance(self.fn, Policy) or not callable(self.fn):
            raise TypeError(f"FunctionPolicy takes a plain function, got {type(self.fn).__name__}")

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        inputs = [dict(m) for m in messages]
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        out = self.fn(copy.deepcopy(inputs))
        if isinstance(out, str | bytes | Mapping) or not isinstance(out, Sequence):
            raise TypeError(
                f"policy function {name} returned a {type(out).__name__}; "
                "it must return a list of message dicts"
            )
        sent: list[Message] = []
        for i, m in enumerate(out):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise TypeError(
                    f"policy function {name} returned {m!r:.80} at position {i}, "
                    "not a message dict with a string 'role'"
                )
            sent.append(dict(m))
        if sent and not inputs:
            raise ValueError(f"policy function {name} made messages out of an empty history")
        return PolicyResult(tuple(sent), frozenset(), _align(inputs, sent))


def _align(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> tuple[int, ...]:
    """For each message of ``after``, the index in ``before`` it came from: equal messages are
    matched in order; a changed message is paired by position inside its changed run."""

    def key(m: Mapping[str, Any]) -> str:
        return json.dumps(m, sort_keys=True, default=str)

    matcher = SequenceMatcher(
        None, [key(m) for m in before], [key(m) for m in after], autojunk=False
    )
    sources: list[int] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        for k in range(j2 - j1):
            if op == "equal":
                sources.append(i1 + k)
            else:  # replaced: the message at the same place in the run; inserted: its neighbour
                sources.append(min(i1 + k, i2 - 1) if i2 > i1 else max(i1 - 1, 0))
    return tuple(sources)


def as_policy(policy: PolicyLike | None) -> Policy:
    """``policy`` as a :class:`Policy`: ``None`` is :class:`KeepAll`, a plain function becomes a
    :class:`FunctionPolicy`.

    >>> as_policy(None), type(as_policy(lambda messages: messages)).__name__
    (KeepAll(), 'FunctionPolicy')
    """
    if policy is None:
        return KeepAll()
    if isinstance(policy, Policy):
        return policy
    if callable(policy):
        return FunctionPolicy(policy)
    raise TypeError(
        "policy must be a leyline.middleware.Policy or a function messages -> messages, "
        f"got {type(policy).__name__}"
    )


@dataclass(frozen=True, slots=True)
class TruncateOlderThan(Policy):
    """Cut tool outputs older than the last ``n`` turns to ``max_chars`` characters + ``marker``.

    A tool message is *older than the last n turns* when its turn index is below
    ``turns - n`` (``turns`` = number of assistant messages). Text of at most ``max_chars``
    characters is left alone; longer text keeps its first ``max_chars`` characters followed by
    ``marker``. Re-applying cuts ``text[:max_chars] + marker`` to the same string, so the rule is
    idempotent. ``mode``: the edits' mode (``None``: the adapter's ``default_mode``);
    ``forget=True`` is ``mode=Mode.FORGET``.

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
    mode: Mode | None = None

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if self.max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {self.max_chars}")
        _mode_and_forget(self)

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        turns = turn_of(messages)
        cutoff = sum(m.get("role") == "assistant" for m in messages) - self.n

        def cut(text: str) -> str:
            return text if len(text) <= self.max_chars else text[: self.max_chars] + self.marker

        def edit(i: int, m: Mapping[str, Any]) -> Any:
            if m.get("role") != "tool" or turns[i] >= cutoff:
                return m.get("content")
            return map_text(m.get("content"), cut)

        return _edit_contents(messages, edit, mode=self.mode)


@dataclass(frozen=True, slots=True)
class LastNObservations(Policy):
    """Keep the last ``n`` tool outputs; replace every older one with ``placeholder``.

    SWE-agent's history processor of the same name. The placeholder is fixed text, so the rule
    is idempotent and the replaced messages are byte-identical from one request to the next.
    ``mode``: the edits' mode (``None``: the adapter's ``default_mode``); ``forget=True`` is
    ``mode=Mode.FORGET``.
    """

    n: int = 5
    placeholder: str = "[old tool output omitted]"
    forget: bool = False
    mode: Mode | None = None

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        _mode_and_forget(self)

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        tools = [i for i, m in enumerate(messages) if m.get("role") == "tool"]
        old = set(tools[: max(len(tools) - self.n, 0)])

        def edit(i: int, m: Mapping[str, Any]) -> Any:
            if i not in old or m.get("content") == self.placeholder:
                return m.get("content")
            return self.placeholder

        return _edit_contents(messages, edit, mode=self.mode)


@dataclass(frozen=True, slots=True)
class Redact(Policy):
    """Replace every match of ``pattern`` with ``replacement``; edited messages are FORGET.

    Applies to message text and, with ``arguments=True``, to assistant tool-call arguments (ids
    and names are never touched). FORGET makes the server re-prefill everything after the first
    redacted message, so the secret's influence does not persist in cached KV; ``mode=AMORTIZE``
    (or ``None``, the adapter's ``default_mode``) trades that guarantee for speed. ``pattern``
    may not match the empty string or ``replacement`` (that would not be idempotent).

    >>> Redact(r"\\d{4}").apply([{"role": "user", "content": "pin 1234"}]).messages[0]["content"]
    'pin [REDACTED]'
    """

    pattern: re.Pattern[str] | str
    replacement: str = "[REDACTED]"
    arguments: bool = True
    mode: Mode | None = Mode.FORGET
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
        object.__setattr__(self, "mode", _coerce_mode(self.mode))

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        def sub(text: str) -> str:
            return self._regex.sub(self.replacement, text)

        out: list[Message] = []
        edited: set[int] = set()
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
                edited.add(i)
            out.append(new)
        return PolicyResult(tuple(out), sources=tuple(range(len(out))), **_marks(self.mode, edited))

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
    :func:`looks_like_error`: starts with an error marker; :meth:`for_debug_gym` uses debug-gym's
    failure texts). It is removed (the entry from the assistant's ``tool_calls`` and its tool
    message) when an assistant message *after* it makes a call whose result did not fail; with
    ``same_tool=True`` (default) that later call must be to the same function (a retry). An
    assistant message left with no calls and no text is removed too; one with text keeps its
    text. ``mode``: how the removals are served (``None``: the adapter's ``default_mode``;
    FORGET re-prefills what follows, so the failure leaves no trace in the cached KV).
    ``is_failure`` must be a pure function for the policy to stay deterministic.

    >>> call = {"id": "a", "type": "function", "function": {"name": "view", "arguments": "{}"}}
    >>> msgs = [{"role": "assistant", "tool_calls": [call]},
    ...         {"role": "tool", "tool_call_id": "a", "content": "View failed. Error message: x"},
    ...         {"role": "assistant", "tool_calls": [{**call, "id": "b"}]},
    ...         {"role": "tool", "tool_call_id": "b", "content": "def f(): ..."}]
    >>> DropFailedToolCalls.for_debug_gym().apply(msgs).sources
    (2, 3)
    """

    is_failure: Callable[[str], bool] = looks_like_error
    same_tool: bool = True
    mode: Mode | None = None

    def __post_init__(self) -> None:
        if not callable(self.is_failure):
            raise TypeError(f"is_failure must be a function str -> bool, got {self.is_failure!r}")
        object.__setattr__(self, "mode", _coerce_mode(self.mode))

    @classmethod
    def for_debug_gym(
        cls, *, same_tool: bool = True, mode: Mode | None = None
    ) -> DropFailedToolCalls:
        """The preset for debug-gym 1.3.0 agents: failures are
        :func:`looks_like_debug_gym_failure` (``View failed. Error message:``, ...)."""
        return cls(is_failure=looks_like_debug_gym_failure, same_tool=same_tool, mode=mode)

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
        edited: set[int] = set()
        removed: list[Message] = []
        for i, m in enumerate(messages):
            if i in results and results[i] in dropped:
                removed.append(dict(m))
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
                        removed.append(dict(m))
                        continue
                    edited.add(len(out))
            out.append(new)
            sources.append(i)
        marked = tuple((m, self.mode) for m in removed) if self.mode is not None else ()
        return PolicyResult(
            tuple(out), sources=tuple(sources), dropped=marked, **_marks(self.mode, edited)
        )


_THINK_TAG = re.compile(r"[A-Za-z][\w.-]*")


@dataclass(frozen=True, slots=True)
class DropReasoning(Policy):
    """Drop the reasoning of assistant messages older than the last ``n`` turns.

    Reasoning is what reasoning models return beside the answer: the ``fields``
    (``reasoning_content``, ``reasoning``) and ``<think>...</think>`` blocks in the text (``tag``;
    ``None`` leaves the text alone; whitespace after a block goes with it). Answers, tool calls
    and ids stay. Anthropic's ``clear_thinking`` and SGLang's ``--strip-thinking-cache`` drop
    reasoning between turns the same way; served with AMORTIZE (the default ``mode=None`` takes
    the adapter's ``default_mode``, AMORTIZE unless set) the server keeps the cached KV of
    everything after the removed thinking. Turns are assistant messages
    (:func:`~leyline.middleware.messages.turn_of`); the last ``n`` keep their reasoning (a tool
    loop usually needs the current turn's; ``n=0`` drops all of it).

    Both kinds of removal are directives: a segment's hash covers its message's reasoning
    fields (templates of reasoning models render them inside that message), and a ``<think>``
    block is text.

    >>> msgs = [{"role": "assistant", "content": "<think>plan</think>\\nls", "reasoning": "r"},
    ...         {"role": "assistant", "content": "<think>check</think>done"}]
    >>> [m["content"] for m in DropReasoning(n=1).apply(msgs).messages]
    ['ls', '<think>check</think>done']
    """

    n: int = 1
    fields: tuple[str, ...] = ("reasoning_content", "reasoning")
    tag: str | None = "think"
    mode: Mode | None = None
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if isinstance(self.fields, str):
            raise ValueError(
                f"fields must be a tuple of field names, got the string {self.fields!r}"
            )
        object.__setattr__(self, "fields", tuple(self.fields))
        if self.tag is not None and not _THINK_TAG.fullmatch(self.tag):
            raise ValueError(f"tag must be a tag name such as 'think', got {self.tag!r}")
        regex = None
        if self.tag is not None:
            regex = re.compile(rf"<{self.tag}>.*?</{self.tag}>\s*", re.DOTALL)
        object.__setattr__(self, "_regex", regex)
        object.__setattr__(self, "mode", _coerce_mode(self.mode))

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        turns = turn_of(messages)
        cutoff = sum(m.get("role") == "assistant" for m in messages) - self.n
        regex = self._regex
        out: list[Message] = []
        edited: set[int] = set()
        for i, m in enumerate(messages):
            new = dict(m)
            if m.get("role") == "assistant" and turns[i] < cutoff:
                for name in self.fields:
                    new.pop(name, None)
                if regex is not None:
                    content = map_text(m.get("content"), lambda text: regex.sub("", text))
                    if content is not m.get("content") and content != m.get("content"):
                        new["content"] = content
            if new != m:
                edited.add(i)
            out.append(new)
        return PolicyResult(tuple(out), sources=tuple(range(len(out))), **_marks(self.mode, edited))


@dataclass(frozen=True, slots=True, init=False)
class Compose(Policy):
    """Apply policies left to right; ``Compose(a, b)`` is ``a | b`` (plain functions are
    wrapped by :func:`as_policy`).

    Forget, repair and amortize marks and sources are carried through: a message one policy
    marked FORGET stays marked wherever later policies move it; removals add up.
    """

    policies: tuple[Policy, ...]

    def __init__(self, *policies: PolicyLike) -> None:
        flat: list[Policy] = []
        for p in policies:
            if p is None or (not isinstance(p, Policy) and not callable(p)):
                raise TypeError(f"Compose takes policies, got {type(p).__name__}")
            policy = as_policy(p)
            flat.extend(policy.policies if isinstance(policy, Compose) else (policy,))
        object.__setattr__(self, "policies", tuple(flat))

    def apply(self, messages: Sequence[Mapping[str, Any]]) -> PolicyResult:
        result = PolicyResult.unchanged([dict(m) for m in messages])
        for policy in self.policies:
            step = policy.apply(result.messages)
            forget = set(step.forget)
            forget.update(j for j, src in enumerate(step.sources) if src in result.forget)
            amortize = set(step.amortize)
            amortize.update(j for j, src in enumerate(step.sources) if src in result.amortize)
            repair = set(step.repair)
            repair.update(j for j, src in enumerate(step.sources) if src in result.repair)
            sources = tuple(result.sources[src] for src in step.sources)
            result = PolicyResult(
                step.messages,
                frozenset(forget),
                sources,
                frozenset(amortize),
                result.dropped + step.dropped,
                frozenset(repair),
            )
        return result


#: Policies by name, for configs and command lines: the debug-gym agent's ``policy:`` key,
#: ``python -m leyline.middleware.debug_gym_run --policy`` and ``leyline eval debug-gym --policy``.
POLICY_NAMES = (
    "keep_all",
    "truncate",
    "truncate_older_than",
    "drop_failed",
    "last_5_observations",
    "drop_reasoning",
)


def named_policy(name: str) -> Policy:
    """The policy registered as ``name`` (one of :data:`POLICY_NAMES`).

    ``truncate`` / ``truncate_older_than``: ``TruncateOlderThan(n=2, max_chars=200)`` (the
    published debug-gym arm); ``drop_failed``: :meth:`DropFailedToolCalls.for_debug_gym` (its
    failure test includes :func:`looks_like_error`); ``last_5_observations``:
    ``LastNObservations(n=5)``; ``drop_reasoning``: ``DropReasoning(n=1)``.

    >>> named_policy("truncate_older_than") == named_policy("truncate")
    True
    """
    match name:
        case "keep_all":
            return KeepAll()
        case "truncate" | "truncate_older_than":
            return TruncateOlderThan(n=2, max_chars=200)
        case "drop_failed":
            return DropFailedToolCalls.for_debug_gym()
        case "last_5_observations":
            return LastNObservations(n=5)
        case "drop_reasoning":
            return DropReasoning(n=1)
        case _:
            raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
