"""Dynamic sampling (DAPO): replace groups whose rewards are all equal with fresh tasks' groups.

A group whose samples all earn the same reward has zero advantage everywhere and gives no
gradient. After a step's rollouts, each rank rolls out a fresh train task of the same domain for
each such group of its own, and takes the new group in its place when the new group's rewards
differ; this repeats for up to `max_rounds` rounds. Whether another round runs is decided from
the zero-variance count summed over all ranks, so every rank runs the same number of rounds (a
rank with nothing left to replace rolls out nothing in that round).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.distributed import all_reduce_sum_
from tau2cl.env.domains import Domain


def zero_variance_groups(rewards: Sequence[float], group_size: int) -> list[int]:
    """Indices of the groups (consecutive blocks of `group_size`) whose rewards are all equal."""
    blocks = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    return [g for g, block in enumerate(blocks) if max(block) == min(block)]


@dataclass
class ResampleReport:
    """Figures over all ranks: zero-variance share before and after, extra episodes, rounds run."""

    zero_std_before: float
    zero_std_after: float
    extra_episodes: int
    rounds: int
    groups: int

    def stats(self) -> dict[str, float]:
        return {
            "frac_reward_zero_std_before_resample": self.zero_std_before,
            "frac_reward_zero_std_after_resample": self.zero_std_after,
            "resample_extra_episodes": float(self.extra_episodes),
            "resample_rounds": float(self.rounds),
        }

    def exhausted_message(self, max_rounds: int) -> str | None:
        """A line when groups with equal rewards remain after every allowed round, else None."""
        left = round(self.zero_std_after * self.groups)
        if not left or self.rounds < max_rounds:
            return None
        return (
            f"[DYNAMIC SAMPLING] {left} of {self.groups} groups still have equal rewards after "
            f"{max_rounds} resample round(s); they are trained on with zero advantage"
        )


def resample_zero_variance(
    trajectories: list[Trajectory],
    group_size: int,
    domains: dict[str, Domain],
    rollout: Callable[[list[RolloutRequest]], list[Trajectory]],
    max_rounds: int,
    rng: random.Random,
) -> tuple[list[Trajectory], ResampleReport]:
    """The batch with zero-variance groups replaced where fresh groups vary; and the figures.

    `rollout` runs and scores requests (train_reward filled). `rng` draws the fresh tasks (seed
    it per rank and step). Collective: every rank must call it at the same step.
    """
    batch = list(trajectories)
    local_groups = len(batch) // group_size
    zero = zero_variance_groups([t.train_reward for t in batch], group_size)
    totals = _sum_over_ranks([len(zero), local_groups, 0])
    before, groups = totals[0], totals[1]
    extra = 0
    rounds = 0
    while rounds < max_rounds and totals[0] > 0:
        rounds += 1
        requests = []
        for n, g in enumerate(zero):
            domain = domains[batch[g * group_size].domain]
            task = domain.train_tasks[rng.randrange(len(domain.train_tasks))]
            requests += [RolloutRequest(domain, task, group=n) for _ in range(group_size)]
        fresh = rollout(requests)  # every rank calls it, with or without requests: it may hold a collective
        extra += len(fresh)
        still = []
        for n, g in enumerate(zero):
            new = fresh[n * group_size : (n + 1) * group_size]
            for t in new:
                t.group = batch[g * group_size].group  # it takes the dropped group's place
            if zero_variance_groups([t.train_reward for t in new], group_size):
                still.append(g)
            else:
                batch[g * group_size : (g + 1) * group_size] = new
        zero = still
        totals = _sum_over_ranks([len(zero), 0, extra])
    extra_all = totals[2] if rounds else 0
    report = ResampleReport(
        zero_std_before=before / max(groups, 1),
        zero_std_after=totals[0] / max(groups, 1),
        extra_episodes=int(extra_all),
        rounds=rounds,
        groups=int(groups),
    )
    return batch, report


def _sum_over_ranks(values: list[float]) -> list[float]:
    return [float(v) for v in all_reduce_sum_(torch.tensor(values, dtype=torch.float64)).tolist()]
