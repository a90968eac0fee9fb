"""Domains come from tau2 unchanged: official splits, tau2's prompts and tools, fresh environments."""

from __future__ import annotations

import pytest

from tau2cl.env import domains
from tau2cl.env.domains import DOMAIN_NAMES, STOP_TOOL_NAME, load_domain

# isort: split
import tau2.environment.db as tau2_db
from tau2.agent.llm_agent import (
    AGENT_INSTRUCTION,
    AGENT_SOLO_INSTRUCTION,
    SYSTEM_PROMPT,
    SYSTEM_PROMPT_SOLO,
)
from tau2.data_model.message import ToolCall
from tau2.environment.toolkit import ToolType
from tau2.registry import registry

from tau2cl.errors import UserError

OFFICIAL_SPLIT_SIZES = {"airline": (30, 20), "retail": (74, 40), "telecom": (74, 40)}


@pytest.fixture(scope="module")
def loaded() -> dict[str, domains.Domain]:
    return {name: load_domain(name) for name in DOMAIN_NAMES}


def tau2_environment(name: str, solo_mode: bool = False):
    """An environment as tau2 itself builds it (reads the database from disk)."""
    return registry.get_env_constructor(name)(solo_mode=solo_mode)


# ---- tasks and splits --------------------------------------------------------------------------
@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_splits_are_tau2s_official_splits(loaded, name):
    domain = loaded[name]
    split_ids = registry.get_task_splits_loader(name)()  # tau2's split_tasks.json
    for split, size in zip(("train", "test"), OFFICIAL_SPLIT_SIZES[name], strict=True):
        ids = [task.id for task in domain.tasks(split)]
        assert len(ids) == size == len(split_ids[split])
        assert ids == [task.id for task in registry.get_tasks_loader(name)(split)]  # tau2's order
        assert set(ids) == set(split_ids[split])
    assert not {t.id for t in domain.train_tasks} & {t.id for t in domain.test_tasks}


def test_max_tasks_caps_each_split_to_its_first_tasks(loaded):
    capped = load_domain("retail", max_tasks=3)
    full = loaded["retail"]
    assert [t.id for t in capped.train_tasks] == [t.id for t in full.train_tasks[:3]]
    assert [t.id for t in capped.test_tasks] == [t.id for t in full.test_tasks[:3]]
    assert load_domain("retail", max_tasks=3) is capped  # cached per (name, max_tasks, solo_mode)
    assert len(load_domain("airline", max_tasks=1000).train_tasks) == 30


def test_unknown_domain_is_a_user_error_naming_the_valid_ones():
    with pytest.raises(UserError, match="airline, retail, telecom"):
        load_domain("banking")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_tasks": 0}, "max_tasks"), ({"solo_mode": True}, "no solo mode")],
)
def test_bad_domain_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_domain("airline", **kwargs)


def test_unknown_split_is_rejected(loaded):
    with pytest.raises(ValueError, match="split"):
        loaded["airline"].tasks("validation")


def test_dict_shaped_task_list_from_tau2_is_accepted(loaded, monkeypatch):
    """Code must not assume one shape of a tau2 collection (`.values()` on a list would crash)."""
    original = registry.get_tasks_loader

    def dict_loader(name):
        return lambda split: {task.id: task for task in original(name)(split)}

    monkeypatch.setattr(domains.registry, "get_tasks_loader", dict_loader)
    split = domains.official_split.__wrapped__("airline", "train")  # bypass the cache
    assert [t.id for t in split] == [t.id for t in loaded["airline"].train_tasks]
    monkeypatch.setattr(domains, "official_split", domains.official_split.__wrapped__)
    domain = domains._load_domain.__wrapped__("airline", 4, False)
    assert [t.id for t in domain.train_tasks] == [t.id for t in loaded["airline"].train_tasks[:4]]


# ---- what the agent sees -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["airline", "retail"])
def test_conversational_domains_use_tau2s_prompt_and_assistant_tools(loaded, name):
    domain, env = loaded[name], tau2_environment(name)
    assert not domain.solo_mode
    expected = SYSTEM_PROMPT.format(agent_instruction=AGENT_INSTRUCTION, domain_policy=env.get_policy())
    assert domain.system_prompt(domain.train_tasks[0]) == expected
    assert domain.tool_schemas == [tool.openai_schema for tool in env.get_tools()]
    assert STOP_TOOL_NAME not in domain.tool_names


def test_telecom_solo_mode_sees_user_tools_done_and_the_ticket(loaded):
    domain, env = loaded["telecom"], tau2_environment("telecom", solo_mode=True)
    assert domain.solo_mode
    assistant = {t.name for t in env.get_tools()}
    user = {t.name for t in env.get_user_tools()}
    assert user and domain.tool_names == assistant | user | {STOP_TOOL_NAME}
    assert len(domain.tool_schemas) == len(assistant) + len(user) + 1
    task = domain.train_tasks[0]
    instruction = AGENT_SOLO_INSTRUCTION.format(stop_function_name=STOP_TOOL_NAME)
    expected = SYSTEM_PROMPT_SOLO.format(
        agent_instruction=instruction, domain_policy=env.get_policy(), ticket=task.ticket
    )
    assert task.ticket and domain.system_prompt(task) == expected


def test_telecom_without_solo_mode_is_conversational(loaded):
    domain = load_domain("telecom", max_tasks=2, solo_mode=False)
    assert domain.policy == tau2_environment("telecom").get_policy() != loaded["telecom"].policy
    assert STOP_TOOL_NAME not in domain.tool_names


# ---- environments ------------------------------------------------------------------------------
def _first_write(env, task):
    """Run the task's golden actions until the first write tool; return that call's reply."""
    for action in task.evaluation_criteria.actions or []:
        call = ToolCall(id="w", name=action.name, arguments=action.arguments, requestor=action.requestor)
        reply = env.get_response(call)
        if env.tools.tool_type(action.name) == ToolType.WRITE:
            return reply
    return None


@pytest.mark.parametrize("name", ["airline", "retail"])
def test_environments_are_independent_copies(loaded, name):
    domain = loaded[name]
    task = next(t for t in domain.train_tasks if _first_write(domain.new_environment(t), t))
    writer, bystander = domain.new_environment(task), domain.new_environment(task)
    before = bystander.get_db_hash()
    assert writer.get_db_hash() == before == tau2_environment(name).get_db_hash()
    reply = _first_write(writer, task)
    assert not reply.error
    assert writer.get_db_hash() != before  # the write happened ...
    assert bystander.get_db_hash() == before  # ... in one environment only
    assert domain.new_environment(task).get_db_hash() == before  # and not in the shared source


def test_telecom_environment_starts_in_the_tasks_initial_state(loaded):
    domain = loaded["telecom"]
    task = domain.train_tasks[0]
    state = task.initial_state
    assert state.initialization_actions
    env = domain.new_environment(task)
    reference = tau2_environment("telecom", solo_mode=True)  # what tau2's orchestrator does
    reference.set_state(state.initialization_data, state.initialization_actions, [])
    reference.sync_tools()
    assert env.get_user_db_hash() == reference.get_user_db_hash()
    assert env.get_db_hash() == reference.get_db_hash()
    assert env.get_user_db_hash() != domain.base_environment(solo_mode=True).get_user_db_hash()
    assert env.solo_mode and env.get_policy() == reference.get_policy()


def test_telecom_solo_environment_routes_user_tools_like_tau2s(loaded):
    ours, theirs = loaded["telecom"].base_environment(solo_mode=True), tau2_environment("telecom", True)
    call = ToolCall(id="c", name="check_status_bar", arguments={}, requestor="assistant")
    reply = ours.get_response(call)
    assert not reply.error and reply.content == theirs.get_response(call).content
    with pytest.raises(ValueError, match="solo mode"):
        loaded["airline"].base_environment(solo_mode=True)


def test_database_file_is_read_once_per_process(monkeypatch):
    reads: list[str] = []
    original = tau2_db.load_file

    def counting_load_file(path, *args, **kwargs):
        reads.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(tau2_db, "load_file", counting_load_file)
    _clear_caches()
    try:
        domain = load_domain("retail")
        load_domain("retail", max_tasks=2)
        task = domain.train_tasks[0]
        for _ in range(3):
            domain.new_environment(task)
        domain.base_environment()
        assert len(reads) == 1 and reads[0].endswith("db.json")
    finally:
        _clear_caches()


def _clear_caches() -> None:
    """Forget loaded domains and databases, so that file reads can be counted."""
    domains._load_domain.cache_clear()
    domains.official_split.cache_clear()
    domains.database_source.cache_clear()
