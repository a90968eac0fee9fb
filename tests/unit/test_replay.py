"""Replay puts earlier domains' tasks into the batch, run in their own domain's environment."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.cl.context import CLContext, Progress
from tau2cl.cl.strategies.base import build_strategy
from tau2cl.cl.strategies.replay import BufferEntry, Reservoir, replay_count
from tau2cl.config import GRPOConfig
from tau2cl.env.domains import load_domain


def test_replay_count_rounds_up_and_is_zero_only_for_a_zero_ratio():
    assert replay_count(4, 0.25) == 1  # 0.25 * 4 = 1
    assert replay_count(4, 0.3) == 2  # 1.2 -> 2
    assert replay_count(1, 0.01) == 1  # any nonzero ratio replays one task
    assert replay_count(4, 0.0) == 0


def test_reservoir_keeps_capacity_and_samples_uniformly():
    rng = random.Random(0)
    counts = [0] * 10
    for _ in range(2000):
        buffer = Reservoir(3)
        for i in range(10):
            buffer.offer(BufferEntry(str(i), 0.0), rng)
        assert len(buffer.entries) == 3 and buffer.seen == 10
        for e in buffer.entries:
            counts[int(e.task_id)] += 1
    # each item is kept with probability 3/10: 600 of 2000 draws expected
    assert all(500 < c < 700 for c in counts)


def _context(domain_idx: int, domains: dict, config: GRPOConfig) -> CLContext:
    """The strategy's whole view of a run at `domain_idx`, global step 7, on rank 0."""
    return CLContext(
        config=config, dist=SimpleNamespace(rank=0), order=list(domains), domains=domains, params=[],
        progress=Progress(domain_idx=domain_idx, global_step=7), rollout=None, episode_gradients=None,
        snapshot_weights=None, load_weights=None, accuracy_matrix=None,
    )


def _trajectory(domain: str, task, group: int, reward: float) -> Trajectory:
    return Trajectory(
        domain=domain, task=task, group=group, token_ids=[1], loss_mask=[0], sampling_logprobs=[0.0],
        messages=[], termination_reason=None, prompt_length=1, assistant_turns=0, tool_errors=0,
        train_reward=reward,
    )


@pytest.fixture(scope="module")
def domains():
    return {"airline": load_domain("airline", 3), "retail": load_domain("retail", 3)}


def test_second_domain_batches_hold_first_domain_tasks_in_their_own_domain(domains):
    config = GRPOConfig(
        model_name_or_path="tiny", cl_algorithm="replay", replay_ratio=0.5, batch_size_per_gpu=4,
        num_samples_per_prompt=2, task_order=["airline", "retail"],
    )
    strategy = build_strategy(config)
    airline, retail = domains["airline"], domains["retail"]
    # while training airline: its trained tasks enter the airline buffer
    ctx = _context(0, domains, config)
    first = [_trajectory("airline", t, g, 1.0) for g, t in enumerate(airline.train_tasks) for _ in range(2)]
    strategy.after_rollout(ctx, first)
    assert {e.task_id for e in strategy.buffers["airline"].entries} == {t.id for t in airline.train_tasks}
    # nothing to replay during the first domain
    own = [RolloutRequest(airline, airline.train_tasks[0], g) for g in range(4) for _ in range(2)]
    assert strategy.augment_batch(ctx, own) == own
    # in the second domain half of the 4 tasks come from airline, each with its 2 samples
    ctx = _context(1, domains, config)
    requests = [RolloutRequest(retail, retail.train_tasks[g % 3], g) for g in range(4) for _ in range(2)]
    batch = strategy.augment_batch(ctx, requests)
    assert len(batch) == 8
    replayed = [r for r in batch if r.domain.name == "airline"]
    assert len(replayed) == 4 and batch[4:] == replayed
    assert all(r.domain is airline for r in replayed)  # its env, prompt, tools and evaluator
    assert [r.group for r in batch] == [0, 0, 1, 1, 2, 2, 3, 3]
    airline_ids = {t.id for t in airline.train_tasks}
    assert all(r.task.id in airline_ids for r in replayed)


def test_replayed_episode_runs_in_the_first_domains_environment_with_its_prompt(domains):
    from tau2cl.agent.chat import ChatRenderer
    from tau2cl.agent.engine import RolloutEngine, RolloutSettings
    from tau2cl.agent.policy import load_tokenizer
    from tau2cl.agent.users.scripted import ScriptedUser

    renderer = ChatRenderer(load_tokenizer("tiny"))
    engine = RolloutEngine(SimpleNamespace(renderer=renderer), ScriptedUser(), RolloutSettings(2, 8, 10_000, 1.0))
    airline = domains["airline"]
    episode = engine._start(RolloutRequest(airline, airline.train_tasks[0], 0))
    assert episode.env.get_domain_name() == "airline"
    engine._user_turns([episode])  # the scripted user's opening: the agent's prompt is rendered
    prompt = renderer.tokenizer.decode(episode.token_ids)
    assert airline.policy[:200] in prompt
    assert all(name in prompt for name in airline.tool_names)


def test_replay_state_round_trips(domains):
    config = GRPOConfig(model_name_or_path="tiny", cl_algorithm="replay", task_order=["airline", "retail"])
    strategy = build_strategy(config)
    airline = domains["airline"]
    strategy.after_rollout(_context(0, domains, config), [_trajectory("airline", airline.train_tasks[1], 0, 0.5)])
    restored = build_strategy(config)
    restored.load_state_dict(strategy.state_dict())
    assert restored.state_dict() == strategy.state_dict()
    assert restored.buffers["airline"].entries == [BufferEntry(airline.train_tasks[1].id, 0.5)]
