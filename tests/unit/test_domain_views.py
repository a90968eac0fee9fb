"""--task_ids, --test_task_ids and --compact_domains: which tasks a domain keeps, and what the agent sees."""

from __future__ import annotations

import pytest

from tau2cl.agent.demonstrations import agent_turns_to_finish, short_turn_limit_lines
from tau2cl.config import GRPOConfig, parse_task_ids
from tau2cl.env.domain_views import (
    COMPACT_POLICIES,
    compact,
    golden_tool_names,
    with_test_tasks,
    with_train_tasks,
)
from tau2cl.env.domains import STOP_TOOL_NAME, load_domain
from tau2cl.errors import UserError

TELECOM_TRANSFER = "[service_issue]lock_sim_card_pin|overdue_bill_suspension[PERSONA:Easy]"


def test_task_ids_group_by_domain_in_the_order_given():
    entries = ["airline:27", "retail:88", "airline:9", f"telecom:{TELECOM_TRANSFER}"]
    assert parse_task_ids(entries) == {"airline": ["27", "9"], "retail": ["88"], "telecom": [TELECOM_TRANSFER]}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["27"], "DOMAIN:TASK_ID"),
        (["airline:"], "DOMAIN:TASK_ID"),
        (["hotel:3"], "unknown domain 'hotel'"),
        (["airline:27", "airline:27"], "twice"),
    ],
)
def test_bad_task_ids_are_refused_with_one_sentence(entries, message):
    with pytest.raises(UserError, match=message):
        GRPOConfig(task_ids=entries)


def test_bad_test_task_ids_are_refused_naming_their_flag():
    with pytest.raises(UserError, match="--test_task_ids entries are DOMAIN:TASK_ID"):
        GRPOConfig(test_task_ids=["19"])
    with pytest.raises(UserError, match="--test_task_ids names 'retail:90' twice"):
        GRPOConfig(test_task_ids=["retail:90", "retail:90"])


def test_task_ids_of_a_domain_outside_the_order_are_unused():
    config = GRPOConfig(task_order=["airline"], task_ids=["retail:88"])  # e.g. a file's ids, a narrower order
    assert config.task_ids == ["retail:88"] and config.task_order == ["airline"]


def test_with_train_tasks_keeps_exactly_the_named_tasks_in_order():
    domain = load_domain("airline", max_tasks=2)
    chosen = with_train_tasks(domain, ["27", "9"])
    assert [t.id for t in chosen.train_tasks] == ["27", "9"]  # not in the first 2, still found
    assert chosen.test_tasks == domain.test_tasks
    test_id = domain.test_tasks[0].id  # a task of the other split is not a train task
    with pytest.raises(UserError, match=f"airline has no train task '{test_id}'"):
        with_train_tasks(domain, ["27", test_id])


def test_with_test_tasks_keeps_exactly_the_named_test_tasks_and_compact_gives_their_tools():
    domain = with_train_tasks(load_domain("airline", max_tasks=1), ["27"])
    chosen = with_test_tasks(domain, ["19", "6"])
    assert [t.id for t in chosen.test_tasks] == ["19", "6"]  # beyond the first test task, in this order
    assert chosen.train_tasks == domain.train_tasks
    assert "cancel_reservation" in golden_tool_names(chosen)  # task 19's golden call
    assert "cancel_reservation" in {s["function"]["name"] for s in compact(chosen).tool_schemas}
    with pytest.raises(UserError, match="--test_task_ids: airline has no test task '27'"):
        with_test_tasks(domain, ["27"])  # a train task is not a test task


def test_compact_domain_shows_a_one_line_policy_and_only_the_golden_tools():
    domain = with_train_tasks(load_domain("airline", max_tasks=1), ["27"])
    small = compact(domain)
    test_tools = {a.name for a in domain.test_tasks[0].evaluation_criteria.actions}
    assert golden_tool_names(domain) == {"get_user_details", "send_certificate"} | test_tools
    assert {s["function"]["name"] for s in small.tool_schemas} == golden_tool_names(domain)
    assert small.tool_names == frozenset(golden_tool_names(domain))
    assert small.policy == COMPACT_POLICIES["airline"] and COMPACT_POLICIES["airline"] not in domain.policy
    task = small.train_tasks[0]
    assert len(small.system_prompt(task)) < len(domain.system_prompt(task)) / 10
    assert small.train_tasks == domain.train_tasks and small.source is domain.source


def test_compact_solo_telecom_keeps_the_stop_tool():
    domain = with_train_tasks(load_domain("telecom", max_tasks=1), [TELECOM_TRANSFER])
    names = {s["function"]["name"] for s in compact(domain).tool_schemas}
    assert domain.solo_mode and STOP_TOOL_NAME in names and "transfer_to_human_agents" in names
    assert names < {s["function"]["name"] for s in domain.tool_schemas}


def test_turns_to_finish_count_the_users_stop_outside_solo_mode_and_flag_a_short_limit():
    airline = with_train_tasks(load_domain("airline", max_tasks=1), ["27", "9"])
    # task 27: get_user_details, send_certificate, the closing message, then the user's stop
    assert [agent_turns_to_finish(airline, t) for t in airline.train_tasks] == [4, 4]
    telecom = with_train_tasks(load_domain("telecom", max_tasks=1), [TELECOM_TRANSFER])
    assert agent_turns_to_finish(telecom, telecom.train_tasks[0]) == 2  # the transfer, then tau2's `done`
    domains = {"airline": airline, "telecom": telecom}
    assert short_turn_limit_lines(domains, 4) == []
    (line,) = short_turn_limit_lines(domains, 3)
    assert line.startswith("[TURNS] airline: 2 of 2 train tasks need up to 4 agent turns") and "--max_turns 3" in line
    assert len(short_turn_limit_lines(domains, 1)) == 2
