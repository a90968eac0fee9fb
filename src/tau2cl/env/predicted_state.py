"""The predicted side of tau2's database check, taken from the episode's own environment.

tau2's `EnvironmentEvaluator` builds a fresh environment for every conversation it scores, replays
the conversation's tool calls in it (insisting that each reply equals the recorded one) and hashes
its databases. The rollout already ran every one of those calls, in order, with tau2's own tools,
in the episode's environment, which started in the task's initial state as tau2's replay does. So
when an episode hands in its environment and the log of the calls that ran in it, and that log is
exactly the list tau2 would replay (same ids, tools, arguments, requestors and replies, paired as
tau2 pairs them), the episode's environment stands in for the predicted one: nothing is rebuilt or
replayed. Anything else (no environment, a log that differs, a pairing tau2 rejects, user messages
in solo mode) goes through tau2's full path.

The database hashes of that environment depend only on the task's initial state and the calls
that can change a database, in order: every call except those tau2 declares READ. They are
recorded under that key (gold_state's store), so the episodes of any tasks with the same initial
state that made the same writes, or none, hash once.

An episode that made no writes has its environment in the task's initial state, which is where
tau2 starts the gold environment. When the task's gold hashes are not recorded yet, and the task
has no environment assertions (the only later use of the predicted environment), that environment
is lent to be the gold one once its own hashes are read: tau2 applies the golden actions to it
instead of to a new copy of the database. It is spent then: the EpisodeState is marked so and
never scored in place again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.message import AssistantMessage, Message, ToolCall, ToolMessage, UserMessage
from tau2.data_model.tasks import Task
from tau2.environment.toolkit import ToolType

from tau2cl.env import db_hash, gold_state
from tau2cl.env.tau2_compat import as_list

CallRecord = tuple[str, str, str, str, str]  # (id, tool, arguments JSON, requestor, reply content)


@dataclass
class EpisodeState:
    """An episode's environment after its rollout, and every call that ran in it, in order."""

    env: Any
    calls: list[CallRecord] = field(default_factory=list)
    spent: bool = False  # the environment became a gold environment: no longer the episode's state

    def log(self, call: ToolCall, reply: ToolMessage) -> None:
        self.calls.append(call_record(call, reply))


def call_record(call: ToolCall, reply: ToolMessage) -> CallRecord:
    arguments = json.dumps(call.arguments, sort_keys=True, default=str)
    return call.id, call.name, arguments, call.requestor, reply.content or ""


def replay_records(messages: list[Message]) -> list[CallRecord] | None:
    """The (call, reply) pairs tau2's `set_state` replays, or None where it would reject the list.

    tau2 pairs each call of an assistant or user tool-call message with the tool messages that
    follow it, in order and by id, and rejects a tool message that follows no call.
    """
    records: list[CallRecord] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        index += 1
        if isinstance(message, ToolMessage):
            return None
        if isinstance(message, AssistantMessage | UserMessage) and message.is_tool_call():
            for call in message.tool_calls:
                if index >= len(messages) or not isinstance(messages[index], ToolMessage):
                    return None
                reply = messages[index]
                if reply.id != call.id:
                    return None
                records.append(call_record(call, reply))
                index += 1
    return records


def proven(state: EpisodeState | None, task: Task, messages: list[Message], solo_mode: bool) -> bool:
    """Whether `state.env` is the environment tau2 would rebuild for scoring `messages`."""
    if state is None or state.spent:
        return False
    if solo_mode and any(isinstance(m, UserMessage) for m in messages):
        return False  # tau2 asserts there is none
    history = as_list(task.initial_state.message_history if task.initial_state is not None else None)
    replayed, before = replay_records(messages), replay_records(history)
    # the episode's environment applied the history's calls (new_environment), then its own
    return replayed is not None and before is not None and replayed == before + state.calls


def state_key(domain_name: str, task: Task, state: EpisodeState, solo_mode: bool = False) -> gold_state.GoldKey:
    """What the episode's databases depend on: the task's initial state and its non-READ calls.

    Not the task itself: episodes of different tasks with the same initial state (most tasks have
    none) and the same writes (often none) have the same databases.
    """
    initial = task.initial_state.model_dump_json() if task.initial_state is not None else ""
    return f"predicted:{domain_name}:solo={solo_mode}", initial, json.dumps(writes(state))


def writes(state: EpisodeState) -> list[tuple[str, str, str]]:
    """(tool, arguments, requestor) of every call that ran in the episode except tau2's READ ones."""
    return [(c[1], c[2], c[3]) for c in state.calls if _tool_type(state.env, c[1], c[3]) != ToolType.READ]


def lendable(state: EpisodeState, task: Task, solo_mode: bool) -> bool:
    """Whether the episode's environment may become the task's gold environment (module note)."""
    criteria = task.evaluation_criteria
    assertions = as_list(criteria.env_assertions) if criteria is not None else []
    return not solo_mode and not assertions and not writes(state)


def _tool_type(env: Any, name: str, requestor: str) -> ToolType | None:
    """tau2's declared type of the tool a call ran (None: no such tool, counted as a write)."""
    toolkit = env.user_tools if requestor == "user" else env.tools
    if toolkit is None or not toolkit.has_tool(name):
        return None
    return toolkit.tool_type(name)


class EpisodeEnvironment:
    """The episode's environment as tau2's predicted one: already in its state, hashes recorded."""

    def __init__(self, state: EpisodeState, key: gold_state.GoldKey, lendable: bool = False):
        self._state, self._env, self._key = state, state.env, key
        self._lendable, self._lent = lendable, False
        self._values: dict[int, Any] = {}
        recorded = gold_state.recorded(key)
        if recorded is not None:
            self._values = {0: recorded[0], 1: recorded[1]}

    def __getattr__(self, name: str) -> Any:
        if self.__dict__.get("_lent"):
            raise RuntimeError(f"the episode's environment was lent as the gold environment; tau2 read {name!r}")
        return getattr(self._env, name)

    def set_state(self, **kwargs: Any) -> None:
        """The rollout already brought the environment to this state (see `proven`)."""

    def get_db_hash(self) -> Any:
        return self._hash(0, db_hash.agent_hash)

    def get_user_db_hash(self) -> Any:
        return self._hash(1, db_hash.user_hash)

    def lend_initial_state(self) -> Any | None:
        """The environment itself, in the task's initial state, to be the gold one (None: not lendable).

        Its own hashes are read first; afterwards only they can be read from this object.
        """
        if not self._lendable or self._lent:
            return None
        self.get_db_hash()
        self.get_user_db_hash()
        self._lent = self._state.spent = True
        return self._env

    def _hash(self, slot: int, compute) -> Any:
        if slot not in self._values:
            self._values[slot] = compute(self._env)
            if len(self._values) == 2:
                gold_state.record(self._key, (self._values[0], self._values[1]))
        return self._values[slot]
