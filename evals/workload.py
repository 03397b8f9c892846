"""The synthetic message-edit workload (the published replay workload, seeded and scalable).

Each conversation is an agent trajectory replayed turn by turn. At scale 1 (sizes are estimated
at ``CHARS_PER_TOKEN`` = 4 characters per token; the server's tokenizer decides the real count,
which ``results.json`` reports):

- message 0, ``system``: a ~4,096-token system prompt (instructions, tool docs, a code style
  guide), shared by every conversation of a workload (one agent, many tasks);
- message 1, ``user``: the task plus the **mutation slice**, a ~3,200-token "working context" of
  ``blocks`` file excerpts and logs that the agent edits between turns;
- then, per turn ``k = 1..turns``, an ``assistant`` reply (reasoning and a command, ~25%) and a
  ``user`` message with the tool's output (test runs, logs, file listings, ~75%), ~2,048 tokens
  per turn together.

Request ``t`` carries the system prompt, the (edited) slice and turns ``1..t``, so the last
request of a conversation is ~4,096 + 3,200 + 6 x 2,048 = ~19.6K estimated tokens. Before every
request from the second on, one edit is applied to the slice (message 1), cycling through
``EDIT_KINDS`` in a per-conversation seeded order:

- ``delete``: a block is removed;
- ``replace_shorter``: a block is truncated to its first ~20% of lines plus a marker (what
  ``truncate_older_than`` does to stale tool output);
- ``replace_longer``: a block is replaced by a fresh excerpt ~1.6x as long (a re-read file);
- ``move``: a block moves to the end of the slice (or to the front if it is already last).

With ``mix="agent"`` the slice stays as it is and the edits are the ones agents make to their
own history, cycling through ``AGENT_EDIT_KINDS`` (again in a per-conversation seeded order):

- ``clear``: the oldest tool output not yet edited becomes a placeholder (LangChain's
  ``ClearToolUsesEdit``, Anthropic's context editing);
- ``truncate``: the oldest tool output not yet edited keeps its first ~200 characters plus a
  marker (``truncate_older_than(n, max_chars=200)``);
- ``drop_failed``: the turn before the previous one was a failed tool call ("Command failed
  with output: ..."); its reply and output are removed (``DropFailedToolCalls``);
- ``summarize``: the two oldest turns not yet summarized become one short summary message
  (LangChain's ``SummarizationMiddleware``, OpenHands condensers), the turns after it stay;
- ``reread``: nothing is edited, but the new turn's tool output repeats, verbatim, text the
  previous request showed (an older tool output or a file excerpt of the slice): moved
  content, which only content-addressed reuse finds.

An edit that cannot apply yet (nothing to clear, summarize or drop) becomes ``truncate``, or
``reread`` when no tool output is left to truncate.

Sizes are multiplied by ``scale``. The same config (seed included) gives the same workload.
A non-empty ``salt`` (used against a shared endpoint) changes every text, not just a line at the
top: content-addressed reuse finds identical chunks anywhere, so only different text keeps two
runs on one server from sharing cache. The edit schedule (kinds, blocks) and the sizes (to
within a line per text) do not depend on the salt.

Example::

    convs = build_workload(WorkloadConfig(seed=0, scale=0.05, conversations=2, turns=3))
    req = convs[0].requests[1]      # the second request of conversation 0
    req.edit.kind, req.new_chars    # ('move', 1843)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AGENT_EDIT_KINDS",
    "CHARS_PER_TOKEN",
    "CLEARED",
    "EDIT_KINDS",
    "MIXES",
    "SLICE_MESSAGE",
    "Conversation",
    "Edit",
    "Request",
    "WorkloadConfig",
    "build_workload",
]

# NOTE: ~4 characters per token is the usual estimate for English/code under BPE tokenizers;
# cl100k gives ~3.3-4 on this generated text, SmolLM2's tokenizer ~3-3.5 (more tokens).
CHARS_PER_TOKEN = 4
EDIT_KINDS = ("delete", "replace_shorter", "replace_longer", "move")
AGENT_EDIT_KINDS = ("clear", "truncate", "drop_failed", "summarize", "reread")
MIXES = ("paper", "agent")  # which edits: the published slice edits, or agents' history edits
CLEARED = "[tool output cleared]"
SLICE_MESSAGE = 1  # index of the message that holds the mutation slice

_WORD_TEXT = (
    "request cache token server client session engine prefix suffix splice chunk rotary key "
    "value layer head batch queue worker thread lock node tree slot pool index plan "
    "directive edit history policy tool output error retry timeout config model tokenizer "
    "template segment hash stream usage latency buffer shard route merge parse render check "
    "update"
)
_WORDS = tuple(_WORD_TEXT.split())
_LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR")
_MODULES = ("scheduler", "radix", "http", "planner", "store", "worker", "sessions", "api")
_TYPES = ("int", "str", "float", "bool", "list[int]", "dict[str, Any]", "bytes", "None")


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Sizes (in estimated tokens at scale 1) and seed of the replay workload."""

    seed: int = 0
    scale: float = 1.0
    conversations: int = 16
    turns: int = 6
    system_tokens: int = 4096
    turn_tokens: int = 2048
    mutation_tokens: int = 3200
    blocks: int = 8
    salt: str = ""
    mix: str = "paper"

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 16:
            raise ValueError(f"scale must be in (0, 16], got {self.scale}")
        if self.conversations < 1 or self.turns < 1:
            raise ValueError("conversations and turns must be >= 1")
        if min(self.system_tokens, self.turn_tokens, self.mutation_tokens) < 1:
            raise ValueError("system_tokens, turn_tokens and mutation_tokens must be >= 1")
        if self.blocks < 2:
            raise ValueError(f"the mutation slice needs >= 2 blocks, got {self.blocks}")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {self.mix!r}")

    def chars(self, tokens: int) -> int:
        """Characters for ``tokens`` estimated tokens at this scale (at least 40)."""
        return max(40, round(tokens * self.scale * CHARS_PER_TOKEN))

    @property
    def slice_blocks(self) -> int:
        """Blocks in the slice: ``blocks``, fewer when a block would be under ~100 tokens."""
        return max(2, min(self.blocks, self.chars(self.mutation_tokens) // 400))


@dataclass(frozen=True, slots=True)
class Edit:
    """One edit, applied before a request.

    Paper mix: ``message`` is the slice, ``block`` the edited block's index before the edit,
    ``target`` its index after a move. Agent mix: ``message`` is the first message of the
    previous request that the edit touched, ``block`` the edited turn (1-based); for ``reread``
    ``message`` is the new tool output, ``target`` the message whose text it repeats and
    ``block`` that turn (or the slice block). ``removed_chars``/``inserted_chars`` count the text taken out and the
    new text put in (a move or a re-read inserts no new text: that content is unchanged).
    """

    kind: str
    message: int
    block: int
    removed_chars: int
    inserted_chars: int
    target: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "block": self.block,
            "removed_chars": self.removed_chars,
            "inserted_chars": self.inserted_chars,
            "target": self.target,
        }


@dataclass(frozen=True)
class Request:
    """One chat request of a conversation (turn ``turn``, 1-based).

    ``new_chars`` counts the content characters that the previous request did not have: the
    appended turn plus the edit's inserted text (the whole first request is new). Everything
    else is *unchanged* content (possibly moved). ``forget`` lists the messages a FORGET arm
    marks (the edited message).
    """

    conversation: int
    turn: int
    messages: tuple[dict[str, str], ...]
    edit: Edit | None
    new_chars: int
    forget: tuple[int, ...] = field(default=())

    @property
    def total_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    @property
    def new_fraction(self) -> float:
        """Share of the content that is new in this request (1.0 for the first request)."""
        total = self.total_chars
        return min(1.0, self.new_chars / total) if total else 1.0

    @property
    def estimated_tokens(self) -> int:
        return self.total_chars // CHARS_PER_TOKEN

    def message_list(self) -> list[dict[str, str]]:
        """A fresh, mutable copy of the messages (for an HTTP client)."""
        return [dict(m) for m in self.messages]


@dataclass(frozen=True)
class Conversation:
    index: int
    requests: tuple[Request, ...]


# ---------------------------------------------------------------------- text generators
def _ident(rng: random.Random) -> str:
    return "_".join(rng.sample(_WORDS, rng.randint(1, 3)))


def _code_lines(rng: random.Random) -> list[str]:
    name = _ident(rng)
    args = ", ".join(f"{_ident(rng)}: {rng.choice(_TYPES)}" for _ in range(rng.randint(1, 3)))
    lines = [f"def {name}({args}) -> {rng.choice(_TYPES)}:"]
    lines.append(
        f'    """{rng.choice(_WORDS).capitalize()} the {" ".join(rng.sample(_WORDS, 3))}."""'
    )
    for _ in range(rng.randint(2, 7)):
        kind = rng.random()
        if kind < 0.3:
            lines.append(f"    {_ident(rng)} = {_ident(rng)}.{_ident(rng)}({rng.randint(0, 4096)})")
        elif kind < 0.55:
            lines.append(f"    if {_ident(rng)} > {rng.randint(1, 512)}:")
            lines.append(f'        raise ValueError(f"{" ".join(rng.sample(_WORDS, 4))}")')
        elif kind < 0.8:
            lines.append(f"    for {rng.choice('ijk')} in range(len({_ident(rng)})):")
            lines.append(f"        {_ident(rng)}.append({_ident(rng)}[{rng.choice('ijk')}])")
        else:
            lines.append(f"    # {' '.join(rng.sample(_WORDS, rng.randint(4, 9)))}")
    lines.append(f"    return {_ident(rng)}")
    lines.append("")
    return lines


def _log_line(rng: random.Random) -> str:
    h, m, s = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    return (
        f"2025-0{rng.randint(1, 9)}-{rng.randint(10, 28)} {h:02d}:{m:02d}:{s:02d}."
        f"{rng.randint(0, 999):03d} {rng.choice(_LEVELS):<7} [{rng.choice(_MODULES)}] "
        f"{' '.join(rng.sample(_WORDS, rng.randint(3, 8)))} id={rng.getrandbits(32):08x} "
        f"took={rng.randint(1, 9999)}ms"
    )


def _test_line(rng: random.Random) -> str:
    status = rng.choice(("PASSED", "PASSED", "PASSED", "FAILED", "SKIPPED"))
    return f"tests/test_{_ident(rng)}.py::test_{_ident(rng)}[{rng.randint(0, 63)}] {status}"


def _listing_line(rng: random.Random) -> str:
    return (
        f"-rw-r--r-- 1 agent agent {rng.randint(100, 99999):>6} "
        f"src/{rng.choice(_MODULES)}/{_ident(rng)}.py"
    )


def _text(rng: random.Random, chars: int, style: str) -> str:
    """About ``chars`` characters of ``style`` text (code, log, tests, mixed), whole lines."""
    lines: list[str] = []
    size = 0
    while size < chars:
        pick = style if style != "mixed" else rng.choice(("code", "log", "tests", "listing"))
        if pick == "code":
            new = _code_lines(rng)
        else:
            new = [{"log": _log_line, "tests": _test_line, "listing": _listing_line}[pick](rng)]
        for line in new:
            lines.append(line)
            size += len(line) + 1
    text = "\n".join(lines)
    if len(text) > chars:  # cut at a line end near the budget
        cut = text.rfind("\n", 0, chars)
        text = text[: cut if cut > chars // 2 else chars]
    return text


def _prose(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        sentence = " ".join(rng.sample(_WORDS, rng.randint(6, 14))).capitalize() + "."
        words.append(sentence)
        size += len(sentence) + 1
    return " ".join(words)[:chars]


def _system_prompt(cfg: WorkloadConfig) -> str:
    rng = random.Random(f"leyline-replay:{cfg.seed}:{cfg.salt}:system")
    total = cfg.chars(cfg.system_tokens)
    head = "You are a software engineering agent. Follow the rules and use the tools below.\n\n"
    parts = [
        head,
        "## Rules\n" + _prose(rng, total // 4) + "\n\n",
        "## Tools\n" + _text(rng, total // 4, "listing") + "\n\n",
        "## Style guide (reference code)\n" + _text(rng, total, "code"),
    ]
    text = "".join(parts)[:total]
    return (f"[run {cfg.salt}]\n" if cfg.salt else "") + text


def _block(rng: random.Random, index: int, chars: int) -> str:
    style = ("code", "log", "tests", "listing")[index % 4]
    header = f"### context block {rng.getrandbits(24):06x} ({style})\n"
    return header + _text(rng, max(20, chars - len(header)), style) + "\n"


def _turn(rng: random.Random, cfg: WorkloadConfig, k: int) -> tuple[str, str]:
    chars = cfg.chars(cfg.turn_tokens)
    reply_chars = max(20, chars // 4)
    reply = (
        f"Step {k}: "
        + _prose(rng, reply_chars // 2)
        + "\nRunning:\n```\n"
        + _text(rng, reply_chars // 2, "code")
        + "\n```"
    )
    style = rng.choice(("log", "tests", "mixed"))
    output = f"Tool output (step {k}):\n" + _text(rng, chars - len(reply), style)
    return reply, output


def _slice_message(task: str, blocks: list[str]) -> str:
    return task + "\n\nWorking context:\n" + "".join(blocks)


def _edit(srng: random.Random, rng: random.Random, blocks: list[str], kind: str) -> Edit:
    """Apply one edit of ``kind`` to ``blocks`` in place (``srng`` picks the block, ``rng``
    writes new text); a kind that cannot apply (delete or move with one block left) becomes
    ``replace_longer``."""
    if kind in ("delete", "move") and len(blocks) < 2:
        kind = "replace_longer"
    i = srng.randrange(len(blocks))
    old = blocks[i]
    if kind == "delete":
        del blocks[i]
        return Edit(kind, SLICE_MESSAGE, i, len(old), 0)
    if kind == "move":
        target = len(blocks) - 1 if i < len(blocks) - 1 else 0
        blocks.insert(target, blocks.pop(i))
        return Edit(kind, SLICE_MESSAGE, i, 0, 0, target)
    if kind == "replace_shorter":
        lines = old.splitlines()
        keep = max(1, len(lines) // 5)
        new = "\n".join(lines[:keep]) + f"\n[... {len(lines) - keep} lines truncated ...]\n"
    else:
        new = _block(rng, i + rng.randint(0, 3), round(len(old) * 1.6))
    blocks[i] = new
    return Edit(kind, SLICE_MESSAGE, i, len(old), len(new))


def _conversation(cfg: WorkloadConfig, index: int, system: str) -> Conversation:
    if cfg.mix == "agent":
        return _agent_conversation(cfg, index, system)
    return _paper_conversation(cfg, index, system)


def _slice_and_task(cfg: WorkloadConfig, rng: random.Random, index: int) -> tuple[list[str], str]:
    """The mutation slice's blocks and the task line of conversation ``index``."""
    n_blocks = cfg.slice_blocks
    per_block = cfg.chars(cfg.mutation_tokens) // n_blocks
    blocks = [_block(rng, b, per_block) for b in range(n_blocks)]
    return blocks, f"Task {index}: " + _prose(rng, max(40, cfg.chars(cfg.turn_tokens) // 10))


def _paper_conversation(cfg: WorkloadConfig, index: int, system: str) -> Conversation:
    # the edit schedule does not depend on the salt; the text does (see WorkloadConfig.salt)
    srng = random.Random(f"leyline-replay:{cfg.seed}:conv:{index}:edits")
    rng = random.Random(f"leyline-replay:{cfg.seed}:{cfg.salt}:conv:{index}")
    blocks, task = _slice_and_task(cfg, rng, index)
    kinds = list(EDIT_KINDS)
    srng.shuffle(kinds)
    turns: list[tuple[str, str]] = []
    requests: list[Request] = []
    for t in range(1, cfg.turns + 1):
        edit = None
        if t > 1:
            edit = _edit(srng, rng, blocks, kinds[(t - 2) % len(kinds)])
        turns.append(_turn(rng, cfg, t))
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": _slice_message(task, blocks)},
        ]
        for reply, output in turns:
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": output})
        if t == 1:
            new_chars = sum(len(m["content"]) for m in messages)
        else:
            assert edit is not None
            new_chars = len(turns[-1][0]) + len(turns[-1][1]) + edit.inserted_chars
        requests.append(
            Request(
                conversation=index,
                turn=t,
                messages=tuple(messages),
                edit=edit,
                new_chars=new_chars,
                forget=(edit.message,) if edit is not None else (),
            )
        )
    return Conversation(index=index, requests=tuple(requests))


@dataclass
class _Turn:
    """One turn of an agent-mix history as it stands now (``state`` says how it was edited)."""

    k: int
    reply: str
    output: str  # the original output (a re-read copies it even after it was cleared)
    shown: str  # what the history shows now
    state: str = "kept"  # kept | cleared | truncated | failed | summarized


def _failed_output(rng: random.Random, k: int) -> str:
    return (
        f"Command failed with output (step {k}):\n"
        + _text(rng, 300, "log")
        + f"\nError: exit status {rng.randint(1, 127)}"
    )


def _agent_history(turns: list[_Turn]) -> list[dict[str, str]]:
    """The turn messages: a summarized run of turns shows as one assistant message."""
    out: list[dict[str, str]] = []
    for t in turns:
        if t.state == "summarized":
            if t.shown:  # the first turn of a summarized pair carries the summary
                out.append({"role": "assistant", "content": t.shown})
                out.append({"role": "user", "content": "Continue."})
            continue
        out.append({"role": "assistant", "content": t.reply})
        out.append({"role": "user", "content": t.shown})
    return out


def _agent_edit(
    rng: random.Random, turns: list[_Turn], blocks: list[str], kind: str
) -> tuple[Edit, str]:
    """Apply ``kind`` to the older turns (all but the one being added); returns the edit and,
    for ``reread``, the text the new tool output repeats ("" otherwise)."""
    older = turns[:-1]
    first_msg = 2  # system, slice, then the turns' messages

    def msg_of(turn: _Turn) -> int:
        shown = [u for u in older if u.state != "summarized" or u.shown]
        return first_msg + 2 * shown.index(turn)

    fresh = [u for u in older if u.state == "kept"]
    if kind == "drop_failed":
        failed = [u for u in older if u.state == "failed"]
        if failed:
            victim = failed[0]
            at = msg_of(victim)
            turns.remove(victim)
            return Edit(kind, at, victim.k, len(victim.reply) + len(victim.shown), 0), ""
        kind = "truncate"
    if kind == "summarize":
        pair = [u for u in older[:-1] if u.state in ("kept", "cleared", "truncated")][:2]
        if len(pair) == 2 and older.index(pair[1]) == older.index(pair[0]) + 1:
            at = msg_of(pair[0])
            removed = sum(len(u.reply) + len(u.shown) for u in pair) + 0
            summary = f"Summary of steps {pair[0].k}-{pair[1].k}: " + _prose(
                rng, max(40, removed // 10)
            )
            pair[0].state, pair[0].shown = "summarized", summary
            pair[1].state, pair[1].shown = "summarized", ""
            return Edit(kind, at, pair[0].k, removed, len(summary) + len("Continue.")), ""
        kind = "truncate"
    if kind in ("clear", "truncate") and fresh:
        victim = fresh[0]
        at = msg_of(victim) + 1  # the tool output, after the reply that called the tool
        old = victim.shown
        if kind == "clear":
            victim.shown, victim.state = CLEARED, "cleared"
        else:
            victim.shown = old[:200] + f"\n[... {len(old) - 200} characters truncated ...]"
            victim.state = "truncated"
        return Edit(kind, at, victim.k, len(old), len(victim.shown)), ""
    # reread (or nothing left to clear or truncate): the new output repeats an earlier one
    # reread: text the previous request showed in full (an older tool output, or a file excerpt
    # of the slice) comes back in the new output; ``target`` is the message it was in
    sources = [(msg_of(u) + 1, u.k, u.output) for u in older if u.state == "kept"]
    sources += [(SLICE_MESSAGE, b, text) for b, text in enumerate(blocks)]
    where, block, text = rng.choice(sources)
    at = first_msg + len(_agent_history(older)) + 1  # the new tool output
    return Edit("reread", at, block, 0, 0, target=where), text


def _agent_conversation(cfg: WorkloadConfig, index: int, system: str) -> Conversation:
    srng = random.Random(f"leyline-replay:{cfg.seed}:conv:{index}:agent-edits")
    rng = random.Random(f"leyline-replay:{cfg.seed}:{cfg.salt}:conv:{index}:agent")
    blocks, task = _slice_and_task(cfg, rng, index)
    kinds = list(AGENT_EDIT_KINDS)
    srng.shuffle(kinds)
    schedule = [kinds[(t - 2) % len(kinds)] for t in range(2, cfg.turns + 1)]  # request t >= 2
    turns: list[_Turn] = []
    requests: list[Request] = []
    for t in range(1, cfg.turns + 1):
        reply, output = _turn(rng, cfg, t)
        state = "kept"
        # a turn whose failure the request two turns later drops is a failed call (unless
        # this turn re-reads an earlier output: then that drop becomes a truncation)
        rereads = t >= 2 and schedule[t - 2] == "reread"
        if t + 2 <= cfg.turns and schedule[t] == "drop_failed" and not rereads:
            output, state = _failed_output(rng, t), "failed"
        turns.append(_Turn(t, reply, output, output, state))
        edit = None
        new_chars = 0
        if t > 1:
            edit, reread = _agent_edit(srng, turns, blocks, schedule[t - 2])
            last = turns[-1]
            new_chars = len(last.reply) + len(last.shown) + edit.inserted_chars
            if reread:  # the re-read text is unchanged content that moved
                head = "Re-reading earlier output:\n"
                last.output = last.shown = head + reread + "\n" + last.output
                new_chars += len(head) + 1
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": _slice_message(task, blocks)},
            *_agent_history(turns),
        ]
        if t == 1:
            new_chars = sum(len(m["content"]) for m in messages)
        forget: tuple[int, ...] = ()
        if edit is not None and edit.kind in ("clear", "truncate", "summarize"):
            forget = (edit.message,)
        requests.append(
            Request(
                conversation=index,
                turn=t,
                messages=tuple(messages),
                edit=edit,
                new_chars=new_chars,
                forget=forget,
            )
        )
    return Conversation(index=index, requests=tuple(requests))


def build_workload(cfg: WorkloadConfig) -> list[Conversation]:
    """The conversations of ``cfg``; deterministic in ``cfg`` (the seed included)."""
    system = _system_prompt(cfg)
    return [_conversation(cfg, i, system) for i in range(cfg.conversations)]
