"""Rewards are tau2's: every train task's golden actions score 1.0; dropping a needed one scores less.

Which dropped action must matter: a read-only action changes nothing tau2 scores (airline and
retail compare the final database, telecom asserts on the final environment), and some golden
write actions do not matter either, because tau2's own data makes them no-ops: retail task 13
first tries a return with a payment method the tool rejects and then repeats it with the right
one, task 105's only write fails in tau2 too (insufficient gift-card balance: the expected
database is the unchanged one), task 22 sets an address and later sets it back, and several
telecom tasks reboot the phone twice. So the action dropped here is each task's *last write action
that succeeds in the golden run*; dropping it scores below 1.0 for every train task of every
domain (checked once over all of them; this test keeps a handful per domain to stay fast).
"""

from __future__ import annotations

import functools

import pytest

from tau2cl.env.domains import DOMAIN_NAMES, Domain, load_domain
from tau2cl.env.golden import CALL_ID_PREFIX, golden_conversation
from tau2cl.env.tau2_reward import compute_reward

# isort: split
from tau2.data_model.message import ToolMessage
from tau2.data_model.simulation import TerminationReason
from tau2.environment.toolkit import ToolType

pytestmark = pytest.mark.slow  # ~30 s: every train task of every domain through tau2's evaluator

DROPPED_TASKS_PER_DOMAIN = 5


@functools.cache
def golden(name: str) -> dict[str, tuple]:
    """Every train task's golden conversation and its tau2 reward, once per domain."""
    domain = load_domain(name)
    scored = {}
    for task in domain.train_tasks:
        messages, reason = golden_conversation(domain, task)
        scored[task.id] = (task, messages, reason, compute_reward(domain, task, messages, reason))
    return scored


def last_successful_write(domain: Domain, messages: list) -> int | None:
    """Index (among golden actions) of the last write call the environment did not reject."""
    env = domain.base_environment(solo_mode=domain.solo_mode)
    calls = {c.id: c for m in messages for c in (getattr(m, "tool_calls", None) or [])}
    found = None
    for reply in messages:
        if not isinstance(reply, ToolMessage) or reply.error or not reply.id.startswith(CALL_ID_PREFIX):
            continue
        name = calls[reply.id].name
        user_tool = env.user_tools is not None and env.user_tools.has_tool(name)
        toolkit = env.user_tools if user_tool else env.tools
        if toolkit.tool_type(name) == ToolType.WRITE:
            found = int(reply.id.removeprefix(CALL_ID_PREFIX))
    return found


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_every_train_task_scores_one_with_its_golden_actions(name):
    failures = {
        task_id: (result.reward, result.breakdown)
        for task_id, (_, _, _, result) in golden(name).items()
        if result.reward != 1.0
    }
    assert not failures, f"{name}: golden actions score below 1.0 for {failures}"
    for task, _, reason, result in golden(name).values():
        assert reason == (TerminationReason.AGENT_STOP if name == "telecom" else TerminationReason.USER_STOP)
        assert all(value == 1.0 for value in result.breakdown.values()) and result.breakdown
        has_actions = bool(task.evaluation_criteria.actions)
        assert result.tool_accuracy == (1.0 if has_actions else None)


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_dropping_a_needed_write_action_scores_less(name):
    domain = load_domain(name)
    dropped = 0
    for task, messages, _, _ in golden(name).values():
        index = last_successful_write(domain, messages)
        if index is None:
            continue  # read-only task (or its only write fails in tau2 too): nothing to drop
        partial, reason = golden_conversation(domain, task, drop=index)
        result = compute_reward(domain, task, partial, reason)
        assert result.reward < 1.0, f"{name} task {task.id}: dropping action {index} still scores 1.0"
        assert result.tool_accuracy < 1.0
        dropped += 1
        if dropped == DROPPED_TASKS_PER_DOMAIN:
            break
    assert dropped == DROPPED_TASKS_PER_DOMAIN


def test_a_premature_end_scores_zero_and_reasons_may_be_strings():
    task, messages, reason, _ = next(iter(golden("retail").values()))
    domain = load_domain("retail")
    assert compute_reward(domain, task, messages, reason.value).reward == 1.0
    assert compute_reward(domain, task, messages, "max_steps").reward == 0.0


def test_telecom_golden_actions_also_score_one_in_conversational_mode():
    """Without solo mode the user makes the phone actions (UserMessage tool calls), as in tau2."""
    domain = load_domain("telecom", solo_mode=False)
    user_calls = 0
    for task in domain.train_tasks:
        messages, reason = golden_conversation(domain, task)
        user_calls += sum(bool(m.role == "user" and getattr(m, "tool_calls", None)) for m in messages)
        assert compute_reward(domain, task, messages, reason).reward == 1.0, task.id
    assert user_calls > len(domain.train_tasks)
