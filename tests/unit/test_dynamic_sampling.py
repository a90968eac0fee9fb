"""Dynamic sampling: zero-variance groups are replaced by fresh groups that vary, or the rounds run out."""

from __future__ import annotations

import random
from dataclasses import dataclass

from tau2cl.rl.dynamic_sampling import resample_zero_variance, zero_variance_groups


@dataclass
class FakeTrajectory:
    domain: str
    task: str
    group: int
    train_reward: float


@dataclass
class FakeDomain:
    train_tasks: list


def rollout_with(rewards_of: dict[str, list[float]], calls: list):
    """A rollout whose rewards depend only on the task: `rewards_of[task]` cycled over its samples."""

    def rollout(requests):
        calls.append([r.task for r in requests])
        seen: dict[str, int] = {}
        out = []
        for r in requests:
            i = seen.get(r.task, 0) % len(rewards_of[r.task])
            seen[r.task] = seen.get(r.task, 0) + 1
            out.append(FakeTrajectory("airline", r.task, r.group, rewards_of[r.task][i]))
        return out

    return rollout


def batch(tasks: list[str], rewards_of: dict[str, list[float]], size: int = 2) -> list[FakeTrajectory]:
    return [FakeTrajectory("airline", t, g, rewards_of[t][s % len(rewards_of[t])]) for g, t in enumerate(tasks) for s in range(size)]


def test_zero_variance_groups_are_the_blocks_with_equal_rewards():
    assert zero_variance_groups([1, 1, 0, 1, 0, 0], 2) == [0, 2]
    assert zero_variance_groups([0.5, 0.5, 0.5], 3) == [0]


def test_constant_groups_are_replaced_by_varying_ones_and_logged():
    rewards = {"const0": [0.0], "const1": [1.0], "varies": [0.0, 1.0]}
    domains = {"airline": FakeDomain(train_tasks=["varies"])}
    calls: list = []
    trajs = batch(["const0", "varies", "const1"], rewards)
    out, report = resample_zero_variance(trajs, 2, domains, rollout_with(rewards, calls), 3, random.Random(0))
    assert [t.task for t in out] == ["varies"] * 6  # groups 0 and 2 replaced, group 1 kept
    assert [t.group for t in out] == [0, 0, 1, 1, 2, 2]  # each new group takes the old one's place
    assert calls == [["varies"] * 4]  # one round: 2 groups x 2 samples
    # before: 2 of 3 groups constant; after: none; 4 extra episodes
    assert report.stats() == {
        "frac_reward_zero_std_before_resample": 2 / 3, "frac_reward_zero_std_after_resample": 0.0,
        "resample_extra_episodes": 4.0, "resample_rounds": 1.0,
    }
    assert report.exhausted_message(3) is None


def test_when_nothing_varies_it_stops_after_the_set_rounds_and_says_so():
    rewards = {"const": [0.0]}
    domains = {"airline": FakeDomain(train_tasks=["const"])}
    calls: list = []
    trajs = batch(["const", "const"], rewards, size=3)
    out, report = resample_zero_variance(trajs, 3, domains, rollout_with(rewards, calls), 2, random.Random(0))
    assert out == trajs and len(calls) == 2 and report.rounds == 2
    assert report.extra_episodes == 2 * 2 * 3 and report.zero_std_before == report.zero_std_after == 1.0
    assert report.exhausted_message(2) == (
        "[DYNAMIC SAMPLING] 2 of 2 groups still have equal rewards after 2 resample round(s); "
        "they are trained on with zero advantage"
    )


def test_no_round_runs_when_every_group_varies():
    rewards = {"varies": [0.0, 1.0]}
    calls: list = []
    trajs = batch(["varies"], rewards)
    out, report = resample_zero_variance(trajs, 2, {}, rollout_with(rewards, calls), 5, random.Random(0))
    assert out == trajs and calls == [] and report.rounds == 0 and report.extra_episodes == 0
