"""tau2 domains as the trainer sees them: tasks and splits, fresh environments, prompt, tool schemas.

Everything here comes from tau2 itself: the official train/test splits (`split_tasks.json`), tau2's
environment constructors, its agent instruction and policy, its tool schemas, and its solo-mode
setup for telecom (the agent gets the assistant tools, the user's phone tools and tau2's `done`
stop tool, and a system prompt with the task's ticket, exactly as `LLMSoloAgent`).

A training step creates dozens of environments, so each domain's database is read from disk once
per process and every environment gets its own copy, validated from the in-memory data with the
cyclic garbage collector paused. Measured per environment while a step's 32 stay alive (airline /
retail, on a busy 2-core machine): re-reading the file ~440 / ~200 ms, `model_copy(deep=True)`
~475 / ~200 ms, `model_validate_json` ~445 / ~175 ms, `model_validate` of the dumped dict
~320 / ~160 ms, and the same with the collector paused ~135 / ~45 ms (chosen). Telecom's databases
are tiny; there the cost was tau2's solo-mode check, skipped per environment (see
`base_environment`): ~60 ms → ~0.5 ms.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.agent.llm_agent import LLMAgent, LLMSoloAgent
from tau2.data_model.tasks import Task
from tau2.environment.environment import Environment
from tau2.environment.tool import Tool
from tau2.registry import registry

from tau2cl.constants import DOMAIN_NAMES
from tau2cl.env.tau2_compat import as_list
from tau2cl.errors import UserError

SOLO_DOMAINS = frozenset({"telecom"})  # tasks carry a ticket; tau2's solo agent can run them alone
STOP_TOOL_NAME = LLMSoloAgent.STOP_FUNCTION_NAME  # "done": the solo agent's stop tool
SPLITS = ("train", "test")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building large, acyclic object trees.

    Copying a database allocates tens of thousands of objects and none of them is garbage, yet
    the allocations trigger full collections that scan every live object (the other episodes'
    databases included): 5-7x the cost of the copy itself.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class DatabaseSource:
    """A domain's databases as tau2 read them from disk; every environment gets fresh copies."""

    db_type: type
    db_data: dict
    user_db_type: type | None = None
    user_db_data: dict | None = None

    def copies(self) -> dict[str, Any]:
        """Keyword arguments for tau2's `get_environment`: new, unshared database objects."""
        with gc_paused():
            kwargs: dict[str, Any] = {"db": self.db_type.model_validate(self.db_data)}
            if self.user_db_type is not None:
                kwargs["user_db"] = self.user_db_type.model_validate(self.user_db_data)
        return kwargs


@functools.cache
def database_source(name: str) -> DatabaseSource:
    """Read a domain's database files once per process, through tau2's own constructor."""
    env = registry.get_env_constructor(name)()
    user_tools = env.user_tools
    if user_tools is None or getattr(user_tools, "db", None) is None:
        return DatabaseSource(type(env.tools.db), env.tools.db.model_dump())
    return DatabaseSource(
        type(env.tools.db), env.tools.db.model_dump(), type(user_tools.db), user_tools.db.model_dump()
    )


@dataclass
class Domain:
    """One tau2 domain: its tasks, what the agent is shown, and fresh environments per episode."""

    name: str
    solo_mode: bool  # telecom with the scripted user runs tau2's solo (ticket) mode
    train_tasks: list[Task]
    test_tasks: list[Task]
    policy: str  # the policy text the agent sees (solo mode: tau2's solo policy)
    tool_schemas: list[dict]  # OpenAI function schemas (solo: assistant + user tools + `done`)
    tool_names: frozenset[str]
    source: DatabaseSource = field(repr=False)
    solo_policy: str | None = field(default=None, repr=False)  # set when the domain has a solo mode
    # the user's own tools (telecom's phone) in the conversational setting; empty otherwise
    user_tool_schemas: list[dict] = field(default_factory=list)

    def tasks(self, split: str) -> list[Task]:
        """The capped task list of an official split ("train" or "test")."""
        if split == "train":
            return self.train_tasks
        if split == "test":
            return self.test_tasks
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def task(self, task_id: str) -> Task:
        """A task of either split by id."""
        for task in self.train_tasks + self.test_tasks:
            if task.id == task_id:
                return task
        raise KeyError(f"{self.name} has no task {task_id!r} in its loaded splits")

    def system_prompt(self, task: Task) -> str:
        """tau2's own system prompt for this task, built by tau2's agent classes."""
        if self.solo_mode:
            # LLMSoloAgent appends `done` to the list it is given; give it a throwaway one
            return LLMSoloAgent(tools=[], domain_policy=self.policy, task=task).system_prompt
        return LLMAgent(tools=[], domain_policy=self.policy).system_prompt

    def base_environment(self, solo_mode: bool = False) -> Environment:
        """A fresh environment in the database's stored state, with no task state applied.

        Same signature and result as tau2's registry constructor for the domain, but the
        database is copied from memory instead of read from disk.
        """
        if solo_mode and self.solo_policy is None:
            raise ValueError(f"{self.name} domain does not support solo mode")
        env = registry.get_env_constructor(self.name)(**self.source.copies())
        if solo_mode:
            # What tau2's get_environment(solo_mode=True) does, without set_solo_mode's tool-name
            # overlap check, which builds every tool schema again (~45 ms an environment);
            # load_domain ran tau2's own solo constructor, and that check, once.
            env.policy = self.solo_policy
            env.solo_mode = True
        return env

    def new_environment(self, task: Task) -> Environment:
        """A fresh environment in the task's initial state, set as tau2's orchestrator does."""
        env = self.base_environment(solo_mode=self.solo_mode)
        state = task.initial_state
        history = state.message_history if state is not None else None
        env.set_state(
            initialization_data=state.initialization_data if state is not None else None,
            initialization_actions=as_list(state.initialization_actions) if state is not None else None,
            message_history=deepcopy(as_list(history)),
        )
        env.sync_tools()
        return env


def load_domain(name: str, max_tasks: int | None = None, solo_mode: bool | None = None) -> Domain:
    """A domain by name, with each split capped to its first `max_tasks` tasks (cached).

    solo_mode None picks tau2's solo mode for telecom (offline, no user model needed) and the
    conversational mode for airline and retail, which have no solo mode.
    """
    if name not in DOMAIN_NAMES:
        raise UserError(f"unknown domain {name!r}; valid domains are {', '.join(DOMAIN_NAMES)}.")
    if max_tasks is not None and max_tasks < 1:
        raise UserError(f"max_tasks must be a positive number of tasks, got {max_tasks}.")
    if solo_mode is None:
        solo_mode = name in SOLO_DOMAINS
    if solo_mode and name not in SOLO_DOMAINS:
        raise UserError(f"the {name} domain has no solo mode; only {', '.join(sorted(SOLO_DOMAINS))} has.")
    return _load_domain(name, max_tasks, solo_mode)


@functools.cache
def official_split(name: str, split: str) -> list[Task]:
    """tau2's tasks of an official split, in tau2's order (telecom's task file is 14 MB: read once)."""
    return as_list(registry.get_tasks_loader(name)(split))


@functools.cache
def _load_domain(name: str, max_tasks: int | None, solo_mode: bool) -> Domain:
    train, test = (official_split(name, split)[:max_tasks] for split in SPLITS)
    source = database_source(name)
    constructor = registry.get_env_constructor(name)
    solo_env = None
    if name in SOLO_DOMAINS:  # tau2's own solo constructor, once: it validates the tool names
        solo_env = constructor(solo_mode=True, **source.copies())
    env = solo_env if solo_mode else constructor(**source.copies())
    tools = _solo_agent_tools(name, env) if solo_mode else as_list(env.get_tools())
    schemas = [tool.openai_schema for tool in tools]
    user_tools = [] if solo_mode else user_tools_of(env)
    return Domain(
        name=name,
        solo_mode=solo_mode,
        train_tasks=train,
        test_tasks=test,
        policy=env.get_policy(),
        tool_schemas=schemas,
        tool_names=frozenset(s["function"]["name"] for s in schemas),
        source=source,
        solo_policy=solo_env.get_policy() if solo_env is not None else None,
        user_tool_schemas=[tool.openai_schema for tool in user_tools],
    )


def user_tools_of(env: Environment) -> list[Tool]:
    """The tools the user holds in this environment (telecom's phone); [] when it has none."""
    return as_list(env.get_user_tools()) if env.user_tools is not None else []


def _solo_agent_tools(name: str, env: Environment) -> list[Tool]:
    """The tools tau2's run_task gives LLMSoloAgent: assistant + user tools, then its `done`."""
    tasks = official_split(name, "train") + official_split(name, "test")
    task = next(t for t in tasks if LLMSoloAgent.check_valid_task(t))  # the agent insists on one
    tools = as_list(env.get_tools()) + as_list(env.get_user_tools())
    return LLMSoloAgent(tools=tools, domain_policy=env.get_policy(), task=task).tools
