"""Golden demonstrations: each task's golden actions played by a scripted policy in the real engine.

A demonstration is the episode in which the agent makes the task's golden calls, one per turn,
then closes: outside solo mode with a message stating every `communicate_info` string (and a
closing question the user answers with its stop), in solo mode with tau2's `done` call. The
turns are produced by `ScriptedPolicy` inside the run's own `RolloutEngine` with the run's user
simulator, so the token ids, the chat rendering, the tool results and the user's turns are
exactly those the policy sees in training; only the agent's turns carry loss mask. Actions tau2
assigns to the user are left to the user outside solo mode. Each demonstration is scored with
tau2's evaluator; a supervised warm start trains on those that score 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.data_model.tasks import Task

from tau2cl.agent.chat import assistant_chat_message
from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.agent.policy import Generation, Policy
from tau2cl.agent.users.base import UserSimulator
from tau2cl.env.domains import STOP_TOOL_NAME, Domain
from tau2cl.env.golden import CLOSING_WITHOUT_INFO
from tau2cl.env.rewards import score_trajectories
from tau2cl.env.tau2_compat import as_list

CLOSING_QUESTION = "Is there anything else I can help you with?"  # the scripted user stops on it
OFF_SCRIPT_TEXT = "I am sorry, I cannot help further."  # asked past the script: the demo has failed


def golden_turns(domain: Domain, task: Task) -> list[dict]:
    """The agent's turns of the task's demonstration, as chat dicts (one golden call per turn)."""
    criteria = task.evaluation_criteria
    actions = as_list(criteria.actions) if criteria is not None else []
    turns = [
        assistant_chat_message("", [(a.name, dict(a.arguments))])
        for a in actions
        if domain.solo_mode or a.requestor != "user"
    ]
    if domain.solo_mode:
        return turns + [assistant_chat_message("", [(STOP_TOOL_NAME, {})])]
    info = as_list(criteria.communicate_info) if criteria is not None else []
    closing = "\n".join(info) or CLOSING_WITHOUT_INFO
    return turns + [assistant_chat_message(f"{closing}\n{CLOSING_QUESTION}", [])]


def agent_turns_to_finish(domain: Domain, task: Task) -> int:
    """The agent turns the task's golden conversation takes up to the stop tau2 requires: its golden
    turns, and outside solo mode one more, in which the user answers the closing question with its
    stop (tau2 scores an episode that no stop ended 0, whatever its calls did)."""
    return len(golden_turns(domain, task)) + (0 if domain.solo_mode else 1)


def short_turn_limit_lines(domains: dict[str, Domain], max_turns: int) -> list[str]:
    """One line per domain whose train tasks' golden conversations cannot finish in `max_turns`."""
    lines = []
    for name, domain in domains.items():
        needed = [agent_turns_to_finish(domain, task) for task in domain.train_tasks]
        short = [n for n in needed if n > max_turns]
        if short:
            lines.append(
                f"[TURNS] {name}: {len(short)} of {len(needed)} train tasks need up to {max(short)} agent turns "
                f"to reach the stop their golden conversation ends with, over --max_turns {max_turns}; tau2 "
                f"scores an episode that no stop ended 0, so even a perfect policy scores 0 on them."
            )
    return lines


class ScriptedPolicy:
    """A policy that writes a fixed list of assistant turns, one per call, for one episode, then
    `off_script` on every later call (with no turns it plays any number of episodes at once).

    It borrows the real policy's tokenizer, renderer and stop tokens, so the engine renders and
    parses its turns exactly as it does the model's. Its log-probs are 0 (nothing is sampled).
    """

    def __init__(self, policy: Policy, turns: list[dict], off_script: str = OFF_SCRIPT_TEXT):
        self.policy = policy
        self.renderer = policy.renderer
        self.tokenizer = policy.tokenizer
        self.stop_ids = policy.stop_ids
        self.end_of_turn_text = policy.end_of_turn_text
        self.turn_ids = [self.renderer.assistant_turn_ids(t, self.end_of_turn_text) for t in turns]
        for ids in self.turn_ids:
            if not ids or ids[-1] not in self.stop_ids:
                raise ValueError("a rendered assistant turn does not end with a stop token")
        self.off_script = self.renderer.assistant_turn_ids(assistant_chat_message(off_script, []), self.end_of_turn_text)
        self.turns_written = 0

    def reset_prefix_cache(self) -> None:
        pass

    def closes_turn(self, generation: Generation) -> bool:
        return self.policy.closes_turn(generation)

    def decode(self, token_ids: list[int]) -> str:
        return self.policy.decode(token_ids)

    @property
    def longest_turn(self) -> int:
        return max(len(ids) for ids in self.turn_ids + [self.off_script])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *args, **kwargs) -> list[Generation]:
        if not self.turn_ids:  # stateless: the same turn for every episode
            return [Generation(token_ids=list(self.off_script), logprobs=[0.0] * len(self.off_script), finished=True)
                    for _ in prompts]
        if len(prompts) != 1:
            raise ValueError("a ScriptedPolicy with a script plays one episode at a time")
        index = self.turns_written
        ids = self.turn_ids[index] if index < len(self.turn_ids) else self.off_script
        self.turns_written += 1
        return [Generation(token_ids=list(ids), logprobs=[0.0] * len(ids), finished=True)]


@dataclass
class DemoSettings:
    max_context_tokens: int
    judge_model: str | None = None


def demonstration(policy: Policy, user: UserSimulator, domain: Domain, task: Task, settings: DemoSettings) -> Trajectory:
    """The task's golden demonstration, run by the real engine and scored by tau2's evaluator."""
    scripted = ScriptedPolicy(policy, golden_turns(domain, task))
    rollout = RolloutSettings(
        max_turns=len(scripted.turn_ids) + 1,  # one spare turn: a user that does not stop ends it
        max_new_tokens=scripted.longest_turn,
        max_context_tokens=settings.max_context_tokens,
        temperature=0.0,
    )
    engine = RolloutEngine(scripted, user, rollout)  # type: ignore[arg-type]  (duck-typed policy)
    (trajectory,) = engine.run([RolloutRequest(domain, task, group=0)], torch.Generator())
    score_trajectories([trajectory], {domain.name: domain}, None, settings.judge_model)
    return trajectory


def demonstrations(
    policy: Policy, user: UserSimulator, domain: Domain, tasks: list[Task], settings: DemoSettings
) -> list[Trajectory]:
    """Every task's demonstration, in task order (each carries its tau2 reward)."""
    return [demonstration(policy, user, domain, task, settings) for task in tasks]
