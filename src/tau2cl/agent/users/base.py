"""User simulators: who answers the agent's text turns.

A simulator answers a *batch* of episodes at once (`respond`), reading each episode's tau2
conversation; it keeps no hidden per-episode state, so the rollout engine can hand it any subset
of live episodes and an LLM-backed simulator can generate all replies in one batched call. Each
reply is a tau2 `UserMessage` (text, or calls to the user's own tools in telecom's full setting)
or a `UserFailure`, which ends only that episode.

Users: `ScriptedUser` (scripted.py: offline default), `LocalModelUser` (local.py: the reference
model or any local model) and `LiteLLMUser` (litellm_user.py: tau2's own user simulator).
`build_user` (build.py) picks one from the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.message import Message, UserMessage
from tau2.user.base import OUT_OF_SCOPE, STOP, TRANSFER, UserState, is_valid_user_history_message
from tau2.user.user_simulator import UserSimulator as Tau2UserSimulator

from tau2cl.agent.episode import Episode
from tau2cl.env.domains import user_tools_of

STOP_MARKERS = (STOP, TRANSFER, OUT_OF_SCOPE)


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
