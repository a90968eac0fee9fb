"""--judge_model: tau2's natural-language assertions, judged through litellm by a loopback server.

No official task's reward basis includes NL_ASSERTION today, so the test gives a copy of a real
airline task that basis and one assertion.
"""

from __future__ import annotations

import json

import pytest
from openai_server import FAIL, ChatServer

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.data_model.tasks import RewardType

from tau2cl.agent.engine import GREETING
from tau2cl.env.tau2_reward import compute_reward
from tau2cl.errors import UserError

ASSERTION = "The agent asks the customer for their user id."


@pytest.fixture(scope="module")
def judged(domains):
    """(domain, task whose reward is the judge's verdict, a short finished conversation)."""
    domain = domains["airline"]
    task = domain.train_tasks[0].model_copy(deep=True)
    task.evaluation_criteria.reward_basis = [RewardType.NL_ASSERTION]
    task.evaluation_criteria.nl_assertions = [ASSERTION]
    messages = [
        AssistantMessage(role="assistant", content=GREETING),
        UserMessage(role="user", content="I want to cancel my reservation."),
        AssistantMessage(role="assistant", content="Sure, what is your user id?"),
        UserMessage(role="user", content="###STOP###"),
    ]
    return domain, task, messages


def _verdict(met: bool):
    def reply(request):
        result = {"expectedOutcome": ASSERTION, "reasoning": "test", "metExpectation": met}
        return json.dumps({"results": [result]})

    return reply


def _judge_args(server: ChatServer) -> dict:
    return {"api_base": server.api_base, "api_key": "test-key", "num_retries": 0, "max_retries": 0}


@pytest.mark.parametrize("met", [True, False])
def test_the_judges_verdict_is_the_nl_assertion_reward(judged, met):
    domain, task, messages = judged
    with ChatServer(_verdict(met)) as server:
        result = compute_reward(domain, task, messages, "user_stop", "openai/judge", _judge_args(server))
    [request] = server.requests
    assert ASSERTION in request["messages"][-1]["content"]  # tau2's judge prompt with the assertion
    assert "Sure, what is your user id?" in request["messages"][-1]["content"]
    assert result.breakdown == {"NL_ASSERTION": float(met)} and result.reward == float(met)


def test_without_a_judge_such_a_task_names_the_flag(judged):
    domain, task, messages = judged
    with pytest.raises(UserError, match="set --judge_model"):
        compute_reward(domain, task, messages, "user_stop")
    plain = domain.train_tasks[0]  # an official task: no judge needed, none called
    assert 0.0 <= compute_reward(domain, plain, messages, "user_stop").reward <= 1.0


def test_a_failing_judge_does_not_end_the_run(judged):
    domain, task, messages = judged
    with ChatServer(lambda request: FAIL) as server:
        result = compute_reward(domain, task, messages, "user_stop", "openai/judge", _judge_args(server))
    assert len(server.requests) == 1
    assert result.reward == 0.0 and result.breakdown == {}
    assert result.reward_info.info["judge_error"].startswith("InternalServerError")
