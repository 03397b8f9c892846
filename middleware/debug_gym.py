"""A debug-gym 1.3.0 Froggy agent whose history goes through a Leyline policy.

Runs only in the Python 3.12 venv built by :func:`leyline.evals.debug_gym_env.prepare_env`.
Importing this module registers the agent as ``leyline_froggy`` in debug-gym's agent registry,
so a config can say ``agent.type: leyline_froggy`` (or, with debug-gym's own CLI, which does not
import it, the dotted path ``leyline.middleware.debug_gym.LeylineFroggyAgent``) and
``agent.policy: truncate``.

What differs from ``FroggyAgent``:

- ``build_history_prompt`` applies the policy (a :data:`POLICY_NAMES` name such as
  ``drop_failed``, which knows debug-gym's failure texts, or any policy object given as
  ``policy=``) and keeps its result; ``step`` hands it to a Leyline LLM as ``leyline_result``
  (a :class:`~leyline.middleware.PolicyResult` over the full prompt: FORGET / AMORTIZE marks and
  dropped messages) and ``leyline_forget`` (the FORGET indices);
- a static system prompt (Froggy's default embeds the last eval output, so message 0 changed
  whenever a test result changed and no prefix survived);
- ``listdir`` is removed from the environment's tools (1.3.0 runs ``apt-get install tree``);
- 1.3.0 bugs worked around: ``submit`` ends the episode even when the task is unresolved;
  ``max_history_token_cutoff`` counts tokens per message without crashing;
  ``max_history_steps_cutoff`` cuts at step boundaries, never leaving an orphan ``tool`` message.

>>> from leyline.middleware.debug_gym import make_policy
>>> make_policy("truncate")
TruncateOlderThan(n=2, max_chars=200, marker='\\n[... truncated]', forget=False, mode=None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from debug_gym.agents.base_agent import BaseAgent, register_agent
from debug_gym.agents.froggy_agent import FroggyAgent, FroggyAgentArgs
from debug_gym.gym.envs.env import EnvInfo, RepoEnv
from debug_gym.llms.base import LLM, LLMResponse
from debug_gym.logger import DebugGymLogger

from leyline.middleware.policies import (
    POLICY_NAMES,
    Policy,
    PolicyLike,
    PolicyResult,
    as_policy,
    named_policy,
)

__all__ = [
    "POLICY_NAMES",
    "STATIC_SYSTEM_PROMPT",
    "LeylineFroggyAgent",
    "LeylineFroggyAgentArgs",
    "make_policy",
]

# why: no template variables, so message 0 is byte-identical on every request of an episode.
STATIC_SYSTEM_PROMPT = (
    "You are a debugging agent that fixes Python programs so that they pass a set of hidden "
    "tests. Investigate the code with the tools before you change it: read the files, run the "
    "tests, use the debugger when a value is unclear. Make small, targeted edits to the bugs "
    "only. Call exactly one tool per response, and do not repeat an action whose result you "
    "already know. When the fix is done, call the submit tool once to end the session. "
    "Keep your reasoning short and always include a tool call."
)


def make_policy(name: str) -> Policy:
    """The policy for a CLI / config name (see :data:`POLICY_NAMES`): ``drop_failed`` is
    :meth:`~leyline.middleware.DropFailedToolCalls.for_debug_gym` (debug-gym's failure texts)."""
    return named_policy(name)


@dataclass
class LeylineFroggyAgentArgs(FroggyAgentArgs):  # type: ignore[misc]  # debug-gym (own venv) is Any here
    """Froggy's arguments plus the Leyline ones (a plain dataclass: debug-gym builds it from a
    config dict and puts unknown keys in ``extras``).

    ``policy``: a :data:`POLICY_NAMES` entry; ``excluded_tools``: removed before the episode;
    ``stop_on_submit``: end the episode after ``submit`` even when unresolved.
    """

    system_prompt: str = STATIC_SYSTEM_PROMPT
    policy: str = "keep_all"
    excluded_tools: list[str] = field(default_factory=lambda: ["listdir"])
    stop_on_submit: bool = True

    def __post_init__(self) -> None:
        make_policy(self.policy)  # raises ValueError on an unknown name
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be > 0, got {self.max_steps}")


@register_agent
class LeylineFroggyAgent(FroggyAgent):  # type: ignore[misc]  # debug-gym (own venv) is Any here
    """``FroggyAgent`` with a Leyline history policy (see the module docstring)."""

    name: str = "leyline_froggy"
    args_class = LeylineFroggyAgentArgs

    def __init__(
        self,
        agent_args: LeylineFroggyAgentArgs | dict[str, Any] | None = None,
        llm: LLM | None = None,
        logger: DebugGymLogger | None = None,
        *,
        policy: PolicyLike | None = None,
    ) -> None:
        super().__init__(agent_args=agent_args, llm=llm, logger=logger)
        self.policy: Policy = (
            as_policy(policy) if policy is not None else make_policy(self.args.policy)
        )
        #: The policy's result over the last prompt built (head included): its marks and drops.
        self.last_result: PolicyResult | None = None
        self._history: PolicyResult | None = None
        self.stop_reason: str | None = None

    @property
    def last_forget(self) -> frozenset[int]:
        """Indices (into the last prompt built) of messages whose edits must be FORGET."""
        return self.last_result.forget if self.last_result is not None else frozenset()

    # -- prompt -----------------------------------------------------------------------------------
    def build_history_prompt(self) -> list[dict[str, Any]]:
        """The history with whole steps cut (step cutoff), then the policy applied."""
        messages = BaseAgent.build_history_prompt(self)
        keep = self.args.max_history_steps_cutoff
        if keep > 0:
            # why: 1.3.0 keeps the last k *messages*, which for odd k starts with a tool message
            # whose assistant call was cut. Keep whole steps (assistant + tool), at least one.
            steps = max(1, keep // 2)
            messages = messages[-2 * steps :]
        self._history = self.policy.apply(messages)
        return list(self._history.messages)

    def build_prompt(self, info: EnvInfo | None = None) -> list[dict[str, Any]]:
        """System + instance + policy-applied history; records :attr:`last_result`."""
        head = [self.build_system_prompt(info), self.build_instance_prompt(info)]
        history = self.build_history_prompt()
        result = self._history or PolicyResult.unchanged(history)
        cut = 0
        budget = self.args.max_history_token_cutoff
        if budget > 0:
            history, cut = self._fit_tokens(head, history, budget)

        def shift(marks: frozenset[int]) -> frozenset[int]:
            return frozenset(i - cut + len(head) for i in marks if i >= cut)

        prompt = head + history
        self.last_result = PolicyResult(
            tuple(prompt),
            shift(result.forget),
            tuple(range(len(prompt))),
            shift(result.amortize),
            result.dropped,
        )
        return prompt

    def _fit_tokens(
        self, head: Sequence[dict[str, Any]], history: list[dict[str, Any]], budget: int
    ) -> tuple[list[dict[str, Any]], int]:
        # why: 1.3.0 passes one message dict to count_tokens (which wants a list) and crashes;
        # count each message as a one-element list and drop whole steps from the front.
        def cost(msgs: Sequence[dict[str, Any]]) -> int:
            return sum(self.llm.count_tokens([m]) for m in msgs)

        available = budget - cost(head)
        starts = [i for i, m in enumerate(history) if m.get("role") == "assistant"]
        for start in [0, *starts]:
            if cost(history[start:]) <= available:
                return history[start:], start
        return [], len(history)

    # -- loop -------------------------------------------------------------------------------------
    def step(self, info: EnvInfo) -> LLMResponse:
        messages = self.build_prompt(info)
        if getattr(self.llm, "accepts_leyline_forget", False):
            return self.llm(
                messages,
                info.tools,
                leyline_forget=self.last_forget,
                leyline_result=self.last_result,
            )
        return self.llm(messages, info.tools)

    def should_stop(self, step: int, info: EnvInfo) -> tuple[bool, str | None]:
        stop, reason = super().should_stop(step, info)
        call = info.action_tool_call
        if not stop and self.args.stop_on_submit and call is not None and call.name == "submit":
            # why: 1.3.0's SubmitTool sets terminated, but env.step() recomputes it from the
            # last eval, so an unresolved submit would run on to max_steps.
            stop, reason = True, "submitted"
        if stop:
            self.stop_reason = reason
        return stop, reason

    def run(self, env: RepoEnv, debug: bool = False, reset_env: bool = True) -> dict[str, Any]:
        for name in self.args.excluded_tools:
            if env.has_tool(name):
                self.logger.warning(f"removing tool {name!r} (excluded by the Leyline agent)")
                env.remove_tool(name)
        result: dict[str, Any] = super().run(env, debug=debug, reset_env=reset_env)
        return result
