"""compute_reward's shortcut (environments built from the in-memory database) gives tau2's numbers.

compute_reward runs tau2's `evaluate_simulation` with the registry's environment constructors
swapped for `Domain.base_environment` while it scores; the reward must not move. Each conversation
of a corpus is scored twice, by compute_reward and by `evaluate_simulation` called plainly (tau2's
own registry, which reads the database files from disk), and the whole RewardInfo must match:
reward, reward_breakdown, the DB check, action checks, communication checks.

The corpus, per domain: each task's golden conversation (reward 1.0), the same with its last
golden action dropped (truncated), and the same with one argument of its last write call changed
and the conversation replayed in a fresh environment so that every tool reply is the one tau2's
replay will see (perturbed). The corpus must contain both full and failing rewards, so the check
cannot pass on a single outcome.

compute_reward also builds and hashes a task's gold environment once and reuses its hashes
(gold_state.py). The corpus starts with no gold state recorded, so each task's first conversation
records it and its other conversations reuse it; each conversation is then scored a second time,
which must reuse the recorded gold state (one environment built, not two) and give the same RewardInfo.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
import tau2.evaluator.evaluator as tau2_evaluator
from tau2.data_model.simulation import SimulationRun, TerminationReason
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from tau2.registry import registry

from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest
from tau2cl.agent.policy import Generation, Policy
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.env import gold_state, predicted_state
from tau2cl.env.domains import DOMAIN_NAMES
from tau2cl.env.golden import reward_corpus
from tau2cl.env.tau2_reward import compute_reward

pytestmark = pytest.mark.slow  # ~20-40 s: every conversation goes through tau2's evaluator twice


def plain_tau2_reward(domain, task, messages, reason):
    """tau2's evaluate_simulation as tau2 runs it: its registry, its database files."""
    simulation = SimulationRun(
        id=str(uuid.uuid4()), task_id=task.id, start_time=messages[0].timestamp,
        end_time=messages[-1].timestamp, duration=0.0, termination_reason=reason, messages=list(messages),
    )
    return evaluate_simulation(
        simulation=simulation, task=task, evaluation_type=EvaluationType.ALL,
        solo_mode=domain.solo_mode, domain=domain.name,
    )


def uses_gold_environment(task, reason) -> bool:
    """Whether tau2's evaluator builds a gold environment for this conversation."""
    criteria = task.evaluation_criteria
    finished = reason in (TerminationReason.AGENT_STOP, TerminationReason.USER_STOP)
    return finished and criteria is not None and (criteria.actions is not None or criteria.env_assertions is not None)


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_compute_reward_equals_plain_tau2_evaluator(domains, name, monkeypatch):
    domain = domains[name]
    items = reward_corpus(domain, domain.train_tasks + domain.test_tasks)
    assert {kind for kind, *_ in items} == {"golden", "truncated", "perturbed"}
    built = []
    build = domain.base_environment
    monkeypatch.setattr(domain, "base_environment", lambda **kwargs: built.append(kwargs) or build(**kwargs))
    gold_state.clear()
    rewards = []
    for kind, task, messages, reason in items:
        ours = compute_reward(domain, task, messages, reason)
        # outside compute_reward the evaluator must see tau2's own constructor again
        assert tau2_evaluator.registry.get_env_constructor(name) is registry.get_env_constructor(name)
        theirs = plain_tau2_reward(domain, task, messages, reason)
        where = f"{name} task {task.id} ({kind})"
        assert ours.reward == theirs.reward, where
        assert ours.reward_info.reward_breakdown == theirs.reward_breakdown, where
        assert ours.breakdown == {k.value: float(v) for k, v in (theirs.reward_breakdown or {}).items()}, where
        assert ours.reward_info.model_dump() == theirs.model_dump(), where
        built.clear()
        again = compute_reward(domain, task, messages, reason)
        assert again.reward_info.model_dump() == theirs.model_dump(), f"{where}, gold state reused"
        if uses_gold_environment(task, reason):
            assert gold_state.recorded(gold_state.gold_key(name, task)) is not None, where
            assert built == [{"solo_mode": domain.solo_mode}], f"{where}: only the predicted environment is built"
        rewards.append((kind, ours.reward))
    assert all(r == 1.0 for kind, r in rewards if kind == "golden"), rewards
    assert any(r < 1.0 for _, r in rewards), f"{name}: no failing conversation in the corpus: {rewards}"
    assert gold_state.recorded_count() > 0, f"{name}: no conversation reached the gold environment"


# ---------------------------------------------------------------- the episode's own environment


class GoldenActionsPolicy(Policy):
    """Writes every golden action of the episode's task as tool calls, then closes the conversation."""

    def __init__(self, model, tokenizer, tasks_by_prompt_start):
        super().__init__(model, tokenizer)
        self.calls_made: set[int] = set()
        self.tasks = tasks_by_prompt_start

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, generator=None, caches=None, groups=None):
        out = []
        for prompt in prompts:
            task = next(t for key, t in self.tasks if key in self.decode(prompt))
            first = id(task) not in self.calls_made
            self.calls_made.add(id(task))
            actions = task.evaluation_criteria.actions or [] if first else []
            text = "".join(
                f"<tool_call>{json.dumps({'name': a.name, 'arguments': a.arguments})}</tool_call>" for a in actions
            ) or "All done. Have a good day!"
            ids = self.renderer.encode(text) + [self.tokenizer.eos_token_id]
            out.append(Generation(token_ids=ids, logprobs=[-1.0] * len(ids), finished=True))
        return out


def _episodes(policy, domains, names, user_turns: int, temperature: float = 1.0):
    requests = [RolloutRequest(domains[n], t, group=i) for i, (n, t) in enumerate(
        (n, t) for n in names for t in domains[n].train_tasks)]
    settings = RolloutSettings(max_turns=4, max_new_tokens=24, max_context_tokens=32768, temperature=temperature)
    engine = RolloutEngine(policy, ScriptedUser(max_turns=user_turns), settings)
    return engine.run(requests, torch.Generator().manual_seed(7))


def _check_in_place(domains, trajectories, monkeypatch) -> tuple[int, list[float], int]:
    """Every trajectory scores tau2's RewardInfo with its own environment: (how many in place, rewards, lent)."""
    in_place, rewards, lent = 0, [], 0
    for traj in trajectories:
        domain = domains[traj.domain]
        state = traj.episode_state
        assert predicted_state.proven(state, traj.task, traj.messages, domain.solo_mode)  # the engine's log is tau2's
        gold = uses_gold_environment(traj.task, traj.termination_reason)
        lends = (gold and predicted_state.lendable(state, traj.task, domain.solo_mode)
                 and gold_state.recorded(gold_state.gold_key(domain.name, traj.task)) is None)
        built: list[dict] = []
        build = domain.base_environment
        monkeypatch.setattr(domain, "base_environment", lambda b=build, log=built, **kw: log.append(kw) or b(**kw))
        ours = compute_reward(domain, traj.task, traj.messages, traj.termination_reason, episode_state=state)
        monkeypatch.setattr(domain, "base_environment", build)
        theirs = plain_tau2_reward(domain, traj.task, traj.messages, traj.termination_reason)
        assert ours.reward_info.model_dump() == theirs.model_dump(), f"{traj.domain} task {traj.task_id}"
        if gold:
            assert {"solo_mode": domain.solo_mode} not in built, "the predicted environment was rebuilt"
            in_place += 1
        assert state.spent == lends
        if lends:  # the episode's environment became the gold one: nothing was built
            assert built == []
            lent += 1
            # spent: scored again, it is not trusted any more and tau2's full path gives the same
            assert not predicted_state.proven(state, traj.task, traj.messages, domain.solo_mode)
            again = compute_reward(domain, traj.task, traj.messages, traj.termination_reason, episode_state=state)
            assert again.reward_info.model_dump() == theirs.model_dump()
        rewards.append(ours.reward)
    return in_place, rewards, lent


@pytest.mark.slow  # ~15 s on 2 busy cores: tau2 scores each of four episodes plainly too
def test_episode_environment_scores_tau2s_reward_golden_calls(tiny_model, tiny_tokenizer, domains, monkeypatch):
    """Engine episodes that make every golden action, and score 1.0, in their own environments."""
    names = ("airline", "retail")
    tasks = [(t.user_scenario.instructions.reason_for_call[:40], t)
             for n in names for t in domains[n].train_tasks + domains[n].test_tasks]
    policy = GoldenActionsPolicy(tiny_model, tiny_tokenizer, tasks)
    trajectories = _episodes(policy, domains, names, user_turns=1)
    gold_state.clear()
    in_place, rewards, _ = _check_in_place(domains, trajectories, monkeypatch)
    assert in_place == len(trajectories)
    assert rewards.count(1.0) >= len(rewards) // 2  # golden actions made: most tasks pass
    # a log that is not tau2's replay list is not trusted: the full path rebuilds the environment
    traj = max(trajectories, key=lambda t: len(t.episode_state.calls))
    assert traj.episode_state.calls
    forged = predicted_state.EpisodeState(traj.episode_state.env, traj.episode_state.calls[1:])
    assert not predicted_state.proven(forged, traj.task, traj.messages, False)


@pytest.mark.slow  # ~20 s on 2 busy cores: four sampled episodes
def test_episode_environment_scores_tau2s_reward_sampled(tiny_policy, domains, monkeypatch, single_torch_thread):
    """Episodes sampled from the tiny model (garbage calls, text turns, user stops)."""
    trajectories = _episodes(tiny_policy, domains, ("airline", "retail"), user_turns=1)
    gold_state.clear()
    in_place, _, lent = _check_in_place(domains, trajectories, monkeypatch)
    assert in_place > 0, [t.termination_reason for t in trajectories]
    assert lent > 0  # episodes without writes lend their environment to their task's first gold state
