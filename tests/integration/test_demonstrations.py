"""Golden demonstrations run through the real rollout engine and score 1.0 with tau2's evaluator."""

from __future__ import annotations

import functools

import pytest

from tau2cl.agent.demonstrations import CLOSING_QUESTION, DemoSettings, demonstrations, golden_turns
from tau2cl.agent.policy import Policy, load_model, load_tokenizer
from tau2cl.agent.tool_calls import parse_tool_calls
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.env.domains import DOMAIN_NAMES, STOP_TOOL_NAME, load_domain

# isort: split
from tau2.data_model.simulation import TerminationReason


@functools.cache
def tiny_policy() -> Policy:
    return Policy(load_model("tiny", "float32", "cpu"), load_tokenizer("tiny"))


def agent_turns(traj) -> list[list[int]]:
    """The runs of loss-masked tokens: one per agent turn."""
    turns, current = [], []
    for token, mask in zip(traj.token_ids, traj.loss_mask, strict=True):
        if mask:
            current.append(token)
        elif current:
            turns.append(current)
            current = []
    return turns + ([current] if current else [])


@pytest.mark.slow  # ~35 s: every train task of the three domains through the engine and tau2's evaluator
@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_every_train_demonstration_scores_one(name):
    domain = load_domain(name)
    policy = tiny_policy()
    trajs = demonstrations(policy, ScriptedUser(), domain, domain.train_tasks, DemoSettings(max_context_tokens=32768))
    assert len(trajs) == len(domain.train_tasks)
    failures = {t.task_id: (t.reward, t.termination_reason, t.end_note) for t in trajs if t.reward != 1.0}
    assert not failures, failures
    stop = TerminationReason.AGENT_STOP if domain.solo_mode else TerminationReason.USER_STOP
    for traj in trajs:
        assert traj.termination_reason == stop
        turns = golden_turns(domain, traj.task)
        masked = agent_turns(traj)
        assert traj.assistant_turns == len(turns) == len(masked)
        for tokens, turn in zip(masked, turns, strict=True):
            assert tokens[-1] in policy.stop_ids  # every agent turn ends as the model must end it
            parsed = parse_tool_calls(policy.decode(tokens[:-1]))
            assert [(c.name, c.arguments) for c in parsed.calls] == [
                (c["function"]["name"], c["function"]["arguments"]) for c in turn.get("tool_calls", [])
            ]
        assert (turns[-1]["tool_calls"][0]["function"]["name"] == STOP_TOOL_NAME) if domain.solo_mode else (
            CLOSING_QUESTION in turns[-1]["content"]
        )
        assert traj.prompt_length > 0 and sum(traj.loss_mask[: traj.prompt_length]) == 0
