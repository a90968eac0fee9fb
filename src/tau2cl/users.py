"""User simulators: who answers the agent's text turns.

A simulator answers a *batch* of episodes at once (`respond`), reading each episode's tau2
conversation; it keeps no hidden per-episode state, so the rollout engine can hand it any subset
of live episodes and an LLM-backed simulator can generate all replies in one batched call.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.user.base import OUT_OF_SCOPE, STOP, TRANSFER

from tau2cl import tau2_compat  # noqa: F401  (quiet tau2 import)

if TYPE_CHECKING:
    from tau2cl.rollout import Episode

STOP_MARKERS = (STOP, TRANSFER, OUT_OF_SCOPE)
TRANSFER_TOOL_NAME = "transfer_to_human_agents"
_CLOSING = re.compile(
    r"anything else|have a (great|good|nice) (day|trip)|goodbye|is there something else",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def is_stop_message(text: str) -> bool:
    """tau2's rule (UserSimulator.is_stop): any stop, transfer or out-of-scope marker ends it."""
    return any(marker in text for marker in STOP_MARKERS)


class UserSimulator(ABC):
    """The interface every user (scripted or LLM-backed) implements."""

    name: str = "user"

    @abstractmethod
    def opening(self, episode: Episode) -> str:
        """The user's first message, sent after tau2's agent greeting."""

    @abstractmethod
    def respond(self, episodes: list[Episode]) -> list[str]:
        """One reply per episode to the agent's last text turn; a stop marker ends the episode."""


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

    name = "scripted"

    def __init__(self, max_turns: int = 8):
        self.max_turns = max_turns

    def opening(self, episode: Episode) -> str:
        instructions = _instructions(episode.task)
        parts = [_field(instructions, "reason_for_call"), _field(instructions, "known_info")]
        return "\n".join(p for p in parts if p) or "Hi, I need help with my account."

    def respond(self, episodes: list[Episode]) -> list[str]:
        return [self._reply(e) for e in episodes]

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


def build_user(config: Any) -> UserSimulator:
    """The user simulator a run asks for (the scripted user is the offline default)."""
    return ScriptedUser(max_turns=config.user_max_turns)
