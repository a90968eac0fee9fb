"""The scripted user: a deterministic customer built from the task's scenario (no model)."""

from __future__ import annotations

import re
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.user.base import STOP, TRANSFER

from tau2cl.agent.episode import Episode
from tau2cl.agent.users.base import UserReply, UserSimulator

TRANSFER_TOOL_NAME = "transfer_to_human_agents"
_CLOSING = re.compile(
    r"anything else|have a (great|good|nice) (day|trip)|goodbye|is there something else",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


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
