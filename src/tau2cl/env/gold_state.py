"""The gold side of tau2's database check, computed once per task and reused.

tau2's `EnvironmentEvaluator.calculate_reward` builds two environments for every conversation it
scores: the predicted one (the conversation's tool calls replayed) and the gold one (the task's
initial state, then its golden actions), and compares their agent and user database hashes. The
gold environment depends on the task alone, yet building it and hashing its database is about half
of a reward's cost (airline: ~50 ms to build, ~80 ms to hash). So the first evaluation of a task
lets tau2 build and hash it as usual and records the two hashes it reads; later evaluations of the
same task get a stand-in whose `set_state` and `make_tool_call` do nothing and whose hashes are the
recorded ones. Only hash strings are kept, so nothing tau2 could mutate is shared.

tau2 tells the two environments apart by how it calls the constructor: the predicted one with the
run's `solo_mode`, the gold one with no arguments. `gold_aware_constructor` follows that; the reward
identity test scores every conversation both ways and would catch a tau2 that changed it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.tasks import Task

from tau2cl.env import db_hash

MAX_TASKS = 8192  # recorded tasks per process; an entry is two short hash strings

GoldKey = tuple[str, str, str]
GoldHashes = tuple[Any, Any]  # (agent DB hash, user DB hash); either may be None (no such DB)

_hashes: OrderedDict[GoldKey, GoldHashes] = OrderedDict()
_lock = threading.Lock()


def gold_key(domain_name: str, task: Task) -> GoldKey:
    """What the gold environment depends on: the domain, and the task's initial state and golden actions.

    The task's content is part of the key (not only its id), so an edited or re-loaded task with
    the same id is never served another task's hashes.
    """
    criteria = task.evaluation_criteria
    actions = criteria.model_dump_json(include={"actions"}) if criteria is not None else ""
    state = task.initial_state.model_dump_json() if task.initial_state is not None else ""
    return domain_name, task.id, state + actions


def recorded(key: GoldKey) -> GoldHashes | None:
    """The gold hashes recorded for this key, if any."""
    with _lock:
        hashes = _hashes.get(key)
        if hashes is not None:
            _hashes.move_to_end(key)
        return hashes


def record(key: GoldKey, hashes: GoldHashes) -> None:
    """Keep the gold hashes of a task (the least recently used entry goes beyond MAX_TASKS)."""
    with _lock:
        _hashes[key] = hashes
        _hashes.move_to_end(key)
        while len(_hashes) > MAX_TASKS:
            _hashes.popitem(last=False)


def clear() -> None:
    """Forget every recorded gold and predicted state, and the records' JSON texts behind them."""
    with _lock:
        _hashes.clear()
    db_hash.clear()


def recorded_count() -> int:
    """How many tasks have their gold hashes recorded."""
    with _lock:
        return len(_hashes)


def gold_aware_constructor(
    build: Callable[..., Any], domain_name: str, task: Task, predicted: Any | None = None
) -> Callable[..., Any]:
    """tau2's environment constructor for scoring `task`, with the gold environment reused.

    `build` is the plain constructor (same signature as tau2's registry entry for the domain);
    `predicted`, when given, is handed out as the predicted environment instead of a new one; once
    handed out, it may lend its own environment as the gold one (predicted_state.py).
    """

    handed_out = False

    def construct(**kwargs: Any) -> Any:
        nonlocal handed_out
        if kwargs:  # tau2's predicted environment: always built with the run's solo_mode
            if predicted is None:
                return build(**kwargs)
            handed_out = True
            return predicted
        key = gold_key(domain_name, task)
        hashes = recorded(key)
        if hashes is not None:
            return _ReplayedGold(*hashes)
        lent = predicted.lend_initial_state() if handed_out and hasattr(predicted, "lend_initial_state") else None
        if lent is not None:  # the episode's environment, in the task's initial state
            return _RecordingGold(lent, key, in_initial_state=True)
        return _RecordingGold(build(), key)

    return construct


class _ReplayedGold:
    """Stands in for a gold environment already replayed: tau2 only sets it up and reads its hashes."""

    def __init__(self, agent_hash: Any, user_hash: Any):
        self._agent_hash, self._user_hash = agent_hash, user_hash

    def set_state(self, **kwargs: Any) -> None:
        """Already in the task's initial state."""

    def make_tool_call(self, tool_name: str, **kwargs: Any) -> None:
        """Golden actions already applied."""

    def get_db_hash(self) -> Any:
        return self._agent_hash

    def get_user_db_hash(self) -> Any:
        return self._user_hash


class _RecordingGold:
    """A real gold environment that records the two hashes tau2 reads from it."""

    def __init__(self, env: Any, key: GoldKey, in_initial_state: bool = False):
        self._env, self._key, self._in_initial_state = env, key, in_initial_state
        self._read: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def set_state(self, **kwargs: Any) -> None:
        if not self._in_initial_state:  # a lent episode environment is already in the task's initial state
            self._env.set_state(**kwargs)

    def get_db_hash(self) -> Any:
        return self._read_hash("agent", db_hash.agent_hash(self._env))

    def get_user_db_hash(self) -> Any:
        return self._read_hash("user", db_hash.user_hash(self._env))

    def _read_hash(self, which: str, value: Any) -> Any:
        self._read[which] = value
        if len(self._read) == 2:
            record(self._key, (self._read["agent"], self._read["user"]))
        return value
