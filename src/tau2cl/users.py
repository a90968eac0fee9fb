"""User simulators: who answers the agent's text turns.

A simulator answers a *batch* of episodes at once (`respond`), reading each episode's tau2
conversation; it keeps no hidden per-episode state, so the rollout engine can hand it any subset
of live episodes and an LLM-backed simulator can generate all replies in one batched call. Each
reply is a tau2 `UserMessage` (text, or calls to the user's own tools in telecom's full setting)
or a `UserFailure`, which ends only that episode.

Users: `ScriptedUser` (here; offline default), `LocalModelUser` (`local_user.py`: the reference
model or any local model) and `LiteLLMUser` (`litellm_user.py`: tau2's own user simulator).
`build_user` picks one from the config.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tau2cl import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.message import AssistantMessage, Message, UserMessage
from tau2.user.base import OUT_OF_SCOPE, STOP, TRANSFER, UserState, is_valid_user_history_message
from tau2.user.user_simulator import UserSimulator as Tau2UserSimulator

from tau2cl.domains import user_tools_of

if TYPE_CHECKING:
    from tau2cl.rollout import Episode

STOP_MARKERS = (STOP, TRANSFER, OUT_OF_SCOPE)
TRANSFER_TOOL_NAME = "transfer_to_human_agents"
REFERENCE_USER = "reference"  # --user_model value: the frozen reference model plays the user
_CLOSING = re.compile(
    r"anything else|have a (great|good|nice) (day|trip)|goodbye|is there something else",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def is_stop_message(text: str) -> bool:
    """tau2's rule (UserSimulator.is_stop): any stop, transfer or out-of-scope marker ends it."""
    return any(marker in text for marker in STOP_MARKERS)


@dataclass
class UserFailure:
    """A user turn that could not be produced; its episode ends with USER_ERROR (reward 0)."""

    reason: str


UserReply = UserMessage | UserFailure


class UserSimulator(ABC):
    """The interface every user (scripted or LLM-backed) implements."""

    name: str = "user"

    @abstractmethod
    def respond(self, episodes: list[Episode]) -> list[UserReply]:
        """One reply per episode to its last agent text turn (the first: tau2's greeting) or to
        the results of its own tool calls. A stop marker in the text ends the episode."""

    def close(self) -> None:
        """Release what the user holds (threads, connections); the default holds nothing."""
        return None


def _instructions(task: Any) -> Any:
    scenario = getattr(task, "user_scenario", None)
    return getattr(scenario, "instructions", None)


def _field(instructions: Any, name: str) -> str:
    if instructions is None:
        return ""
    if isinstance(instructions, str):
        return instructions if name == "reason_for_call" else ""
    return (getattr(instructions, name, None) or "").strip()


class ScriptedUser(UserSimulator):
    """A deterministic user built from the task's scenario; no model, no network.

    Opens with the reason for the call and the known information, then answers each agent turn
    with the next sentence of the scenario's instructions (then a plain go-ahead, which also
    confirms actions the agent asks about). It stops with `###STOP###` when the agent closes the
    conversation or after `max_turns` replies, and with `###TRANSFER###` once the agent has
    transferred it to a human. Cost: none beyond string handling.
    """

    name = "scripted"  # it has no phone: with it, telecom runs tau2's solo (ticket) mode

    def __init__(self, max_turns: int = 8):
        self.max_turns = max_turns

    def opening(self, episode: Episode) -> str:
        instructions = _instructions(episode.task)
        parts = [_field(instructions, "reason_for_call"), _field(instructions, "known_info")]
        return "\n".join(p for p in parts if p) or "Hi, I need help with my account."

    def respond(self, episodes: list[Episode]) -> list[UserReply]:
        texts = [self.opening(e) if e.user_turns == 0 else self._reply(e) for e in episodes]
        return [UserMessage(role="user", content=text) for text in texts]

    def _reply(self, episode: Episode) -> str:
        messages = episode.messages
        replies_sent = sum(isinstance(m, UserMessage) for m in messages) - 1  # minus the opening
        if _transferred(messages):
            return TRANSFER
        last = next((m for m in reversed(messages) if isinstance(m, AssistantMessage)), None)
        if replies_sent >= self.max_turns or (last and last.content and _CLOSING.search(last.content)):
            return STOP
        lines = [s.strip() for s in _SENTENCE.split(_field(_instructions(episode.task), "task_instructions"))]
        lines = [s for s in lines if s]
        if replies_sent < len(lines):
            return lines[replies_sent]
        return "Yes, please go ahead."


def _transferred(messages: list) -> bool:
    return any(
        isinstance(m, AssistantMessage) and any(c.name == TRANSFER_TOOL_NAME for c in (m.tool_calls or []))
        for m in messages
    )


def build_user(config: Any, reference: Any = None, device: Any = "cpu") -> UserSimulator:
    """The user simulator `config.user_model` asks for (see its --help).

    `reference` is a zero-argument function returning the run's `Policy` over the frozen
    reference model; it is only called for `--user_model reference`. A separate local user model
    is loaded onto `device`.
    """
    from tau2cl.config import LITELLM_PREFIX

    model = config.user_model
    if model is None:
        return ScriptedUser(max_turns=config.user_max_turns)
    if model.startswith(LITELLM_PREFIX):
        from tau2cl.litellm_user import LiteLLMUser

        return LiteLLMUser.from_config(config)
    from tau2cl.local_user import LocalModelUser

    if model == REFERENCE_USER:
        return LocalModelUser(reference(), config.user_temperature, config.user_max_new_tokens, name="reference")
    return LocalModelUser.from_config(config, device)


# ---- what an LLM user sees, the way tau2's UserSimulator sees it -------------------------------
def user_history(episode: Episode) -> list[Message]:
    """The episode's messages a tau2 user keeps: text turns and results of its own tool calls."""
    return [m for m in episode.messages if is_valid_user_history_message(m)]


def tau2_user(episode: Episode, **llm: Any) -> Tau2UserSimulator:
    """tau2's own UserSimulator for this episode: the task's scenario and, in telecom's full
    setting, the phone tools of the episode's environment (`llm`: its model and llm_args)."""
    tools = user_tools_of(episode.env) if episode.domain.user_tool_schemas else None
    return Tau2UserSimulator(tools=tools or None, instructions=str(episode.task.user_scenario), **llm)


def user_system_prompt(episode: Episode) -> str:
    """tau2's user system prompt: its simulation guidelines (the tool-using variant when the user
    holds tools) and the task's scenario."""
    return tau2_user(episode).system_prompt


def flipped_history(episode: Episode) -> list[Message]:
    """The user's history with roles flipped by tau2 (the user speaks as the assistant)."""
    return UserState(system_messages=[], messages=user_history(episode)).flip_roles()
