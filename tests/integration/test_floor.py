"""The do-nothing floor is tau2's score of a do-nothing conversation, task by task (hand-checked)."""

from __future__ import annotations

import functools

import pytest

from tau2cl.agent.policy import Policy, load_model, load_tokenizer
from tau2cl.env.domains import load_domain
from tau2cl.env.tau2_reward import compute_reward
from tau2cl.evaluation.floor import DO_NOTHING_TEXT, do_nothing_floor, do_nothing_trajectories

# isort: split
from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.data_model.simulation import TerminationReason
from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE
from tau2.user.base import STOP

# airline 0: no action, nothing to say (do-nothing scores 1); 27: a certificate must be sent and
# 9: a reservation cancelled (the database differs: 0). retail 10 needs no write (1); retail 0 does (0).
HAND_CHECKED = {"airline": {"0": 1.0, "27": 0.0, "9": 0.0}, "retail": {"10": 1.0, "0": 0.0}}


@functools.cache
def tiny_policy() -> Policy:
    return Policy(load_model("tiny", "float32", "cpu"), load_tokenizer("tiny"))


def by_hand(domain, task) -> float:
    """greeting, the user's request, one do-nothing reply, the user's stop: scored by tau2."""
    messages = [
        DEFAULT_FIRST_AGENT_MESSAGE.model_copy(deep=True),
        UserMessage(role="user", content="I need help."),
        AssistantMessage(role="assistant", content=DO_NOTHING_TEXT),
        UserMessage(role="user", content=STOP),
    ]
    for i, m in enumerate(messages):
        m.turn_idx = i
    return compute_reward(domain, task, messages, TerminationReason.USER_STOP).reward


@pytest.mark.slow  # ~15 s: a handful of do-nothing episodes through the engine and tau2's evaluator
@pytest.mark.parametrize("name", sorted(HAND_CHECKED))
def test_floor_equals_tau2s_score_of_a_do_nothing_conversation(name):
    domain = load_domain(name)
    tasks = [domain.task(tid) for tid in HAND_CHECKED[name]]
    trajectories = do_nothing_trajectories(tiny_policy(), domain, tasks, user_max_turns=3)
    for traj in trajectories:
        assert traj.termination_reason == TerminationReason.USER_STOP  # the user ended it
        assert traj.num_generated_tokens > 0 and "tool_calls" not in str(traj.messages[-2])
        assert traj.reward == HAND_CHECKED[name][traj.task_id] == by_hand(domain, traj.task)


def test_floor_is_the_mean_over_the_evaluated_tasks_and_telecom_solo_stops_at_once():
    airline = load_domain("airline", max_tasks=3)  # test tasks 1, 6, 13 ... capped at 3
    telecom = load_domain("telecom", max_tasks=2)
    policy = tiny_policy()
    floor = do_nothing_floor(policy, {"airline": airline, "telecom": telecom}, "test", 2, user_max_turns=1)
    rewards = [t.reward for t in do_nothing_trajectories(policy, airline, airline.test_tasks[:2], 1)]
    assert floor["airline"] == sum(rewards) / 2
    solo = do_nothing_trajectories(policy, telecom, telecom.test_tasks[:1], 1)
    assert solo[0].termination_reason == TerminationReason.AGENT_STOP and solo[0].assistant_turns == 1
    assert floor["telecom"] == 0.0  # every telecom task needs the agent to fix something
