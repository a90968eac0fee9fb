"""ScriptedUser on real tau2 tasks: opening, walking the instructions, stop and transfer markers."""

from __future__ import annotations

import pytest

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.data_model.message import AssistantMessage, ToolCall, ToolMessage, UserMessage
from tau2.user.base import STOP, TRANSFER

from tau2cl.agent.engine import GREETING
from tau2cl.agent.episode import Episode, RolloutRequest
from tau2cl.agent.users.base import is_stop_message
from tau2cl.agent.users.build import build_user
from tau2cl.agent.users.scripted import TRANSFER_TOOL_NAME, ScriptedUser
from tau2cl.env.domains import load_domain

GO_AHEAD = "Yes, please go ahead."
AGENT_QUESTION = "Could you give me more details, please?"
CLOSING = "Is there anything else I can help you with?"


def _episode(domain, task, user: ScriptedUser) -> Episode:
    """An episode as the engine starts it: tau2's greeting, then the user's opening."""
    episode = Episode(request=RolloutRequest(domain, task, group=0), env=None, messages=[])
    episode.messages.append(AssistantMessage(role="assistant", content=GREETING))
    episode.messages.append(UserMessage(role="user", content=user.opening(episode)))
    episode.user_turns = 1
    return episode


def _exchange(user: ScriptedUser, episode: Episode, agent_text: str) -> str:
    episode.messages.append(AssistantMessage(role="assistant", content=agent_text))
    [reply] = user.respond([episode])
    assert isinstance(reply, UserMessage) and not reply.is_tool_call()
    episode.messages.append(reply)
    return reply.content


@pytest.fixture(scope="module")
def domains():
    """airline and retail only (telecom's 14 MB task file is not needed here); load_domain caches."""
    return {name: load_domain(name, max_tasks=2) for name in ("airline", "retail")}


def _tasks(domains):
    return [(domains[n], t) for n in ("airline", "retail") for t in domains[n].train_tasks]


def test_opening_states_reason_and_known_info(domains):
    user = ScriptedUser()
    for domain, task in _tasks(domains):
        instructions = task.user_scenario.instructions
        opening = _episode(domain, task, user).messages[-1].content
        assert instructions.reason_for_call.strip() in opening
        assert instructions.known_info.strip() in opening
        assert instructions.task_instructions.strip() not in opening  # revealed turn by turn
        assert not is_stop_message(opening)


def test_replies_walk_the_instructions_then_go_ahead(domains):
    user = ScriptedUser(max_turns=50)
    for domain, task in _tasks(domains):
        episode = _episode(domain, task, user)
        replies = []
        while not replies or replies[-1] != GO_AHEAD:
            replies.append(_exchange(user, episode, AGENT_QUESTION))
            assert len(replies) < 50
        walked = " ".join(replies[:-1])
        assert walked.split() == task.user_scenario.instructions.task_instructions.split()
        assert _exchange(user, episode, AGENT_QUESTION) == GO_AHEAD  # and it keeps confirming
        assert not any(is_stop_message(r) for r in replies)


def test_respond_answers_each_episode_of_a_batch_from_its_own_history(domains):
    user = ScriptedUser(max_turns=50)
    (domain, task), (other_domain, other_task) = _tasks(domains)[0], _tasks(domains)[2]
    ahead, behind = _episode(domain, task, user), _episode(other_domain, other_task, user)
    first = _exchange(user, ahead, AGENT_QUESTION)
    second = _exchange(user, ahead, AGENT_QUESTION)
    for episode in (ahead, behind):
        episode.messages.append(AssistantMessage(role="assistant", content=AGENT_QUESTION))
    third, behind_first = (m.content for m in user.respond([ahead, behind]))
    assert first != second != third
    assert behind_first == ScriptedUser(max_turns=50).respond([behind])[0].content
    assert (
        behind_first.split()[0]
        == other_task.user_scenario.instructions.task_instructions.split()[0]
    )


@pytest.mark.parametrize("max_turns", [1, 3])
def test_stops_after_max_turns_replies(domains, max_turns):
    user = ScriptedUser(max_turns=max_turns)
    domain, task = _tasks(domains)[0]
    episode = _episode(domain, task, user)
    replies = [_exchange(user, episode, AGENT_QUESTION) for _ in range(max_turns + 1)]
    assert not any(is_stop_message(r) for r in replies[:-1])
    assert replies[-1] == STOP


@pytest.mark.parametrize(
    "closing", [CLOSING, "Your reservation is cancelled. Have a great day!", "Goodbye."]
)
def test_stops_when_the_agent_closes(domains, closing):
    user = ScriptedUser(max_turns=50)
    domain, task = _tasks(domains)[0]
    episode = _episode(domain, task, user)
    _exchange(user, episode, AGENT_QUESTION)
    assert _exchange(user, episode, closing) == STOP
    assert is_stop_message(STOP)


def test_transfers_after_a_transfer_to_human_agents_call(domains):
    user = ScriptedUser(max_turns=50)
    domain, task = _tasks(domains)[0]
    assert TRANSFER_TOOL_NAME in domain.tool_names
    episode = _episode(domain, task, user)
    _exchange(user, episode, AGENT_QUESTION)
    call = ToolCall(id="call_1_0", name=TRANSFER_TOOL_NAME, arguments={"summary": "refund request"})
    episode.messages.append(AssistantMessage(role="assistant", content=None, tool_calls=[call]))
    episode.messages.append(
        ToolMessage(
            id="call_1_0", role="tool", content="Transfer successful", requestor="assistant"
        )
    )
    reply = _exchange(user, episode, "You are being transferred to a human agent. Please hold on.")
    assert reply == TRANSFER and is_stop_message(reply)


def test_first_reply_is_the_opening(domains):
    user = ScriptedUser()
    domain, task = _tasks(domains)[0]
    episode = Episode(request=RolloutRequest(domain, task, group=0), env=None, messages=[])
    episode.messages.append(AssistantMessage(role="assistant", content=GREETING))
    [reply] = user.respond([episode])
    assert reply.content == user.opening(episode)


def test_build_user_is_scripted_with_the_configured_turns():
    class Config:
        user_model = None
        user_max_turns = 4

    user = build_user(Config())
    assert isinstance(user, ScriptedUser) and user.max_turns == 4
