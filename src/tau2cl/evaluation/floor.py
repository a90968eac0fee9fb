"""The do-nothing floor: tau2's reward of an agent that never acts and lets the user end the call.

Some tasks need no write and no information from the agent (tau2 scores them 1.0 for any
conversation the user ends), so every accuracy figure is read against this floor. It is computed
once per run, per domain, on exactly the tasks evaluated (the --eval_split split, capped by
--eval_max_tasks), through the real rollout engine with the scripted user (no model, no
network): outside solo mode the agent answers every user turn with DO_NOTHING_TEXT until the
user stops; in solo mode (telecom) it calls `done` at once. Each conversation is scored by tau2's
evaluator.
"""

from __future__ import annotations

from tau2cl.agent.chat import assistant_chat_message
from tau2cl.agent.demonstrations import ScriptedPolicy
from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.agent.policy import Policy
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.env.domains import STOP_TOOL_NAME, Domain
from tau2cl.env.rewards import score_trajectories
from tau2cl.evaluation.runner import evaluated_tasks

DO_NOTHING_TEXT = "I see."  # no tool call, no information, nothing the scripted user takes as a closing
FLOOR_MAX_CONTEXT = 1 << 20  # the floor's conversations are never cut for length


def do_nothing_trajectories(policy: Policy, domain: Domain, tasks: list, user_max_turns: int) -> list[Trajectory]:
    """One scored do-nothing episode per task, in task order."""
    user = ScriptedUser(max_turns=user_max_turns)
    if domain.solo_mode:
        trajectories = []
        for task in tasks:  # a script plays one episode at a time
            scripted = ScriptedPolicy(policy, [assistant_chat_message("", [(STOP_TOOL_NAME, {})])])
            trajectories += _engine(scripted, user, 2).run([RolloutRequest(domain, task, group=0)])
    else:
        scripted = ScriptedPolicy(policy, [], off_script=DO_NOTHING_TEXT)
        requests = [RolloutRequest(domain, task, group=i) for i, task in enumerate(tasks)]
        trajectories = _engine(scripted, user, user_max_turns + 2).run(requests)
    score_trajectories(trajectories, {domain.name: domain})
    return trajectories


def _engine(scripted: ScriptedPolicy, user: ScriptedUser, max_turns: int) -> RolloutEngine:
    settings = RolloutSettings(max_turns=max_turns, max_new_tokens=scripted.longest_turn,
                               max_context_tokens=FLOOR_MAX_CONTEXT, temperature=0.0)
    return RolloutEngine(scripted, user, settings)  # type: ignore[arg-type]  (duck-typed policy)


def do_nothing_floor(
    policy: Policy, domains: dict[str, Domain], split: str, max_tasks: int | None, user_max_turns: int
) -> dict[str, float]:
    """Each domain's mean do-nothing reward over the evaluated tasks of `split`."""
    floor = {}
    for name, domain in domains.items():
        tasks = evaluated_tasks(domain, split, max_tasks)
        rewards = [t.reward for t in do_nothing_trajectories(policy, domain, tasks, user_max_turns)]
        floor[name] = sum(rewards) / len(rewards) if rewards else 0.0
    return floor
