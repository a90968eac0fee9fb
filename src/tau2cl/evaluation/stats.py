"""Summary statistics of one evaluation run on one domain: plain numbers in, an EvalSummary out.

Kept pure (no I/O, no torch) so the numbers the tracker prints and the trainer puts into the
accuracy matrix are tested by hand-computed values.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

# tau2 counts an episode as a success when its reward is 1 up to float noise (tau2's is_successful).
SUCCESS_TOLERANCE = 1e-6


def is_success(reward: float) -> bool:
    """True when the episode solved its task: reward == 1.0 within SUCCESS_TOLERANCE."""
    return reward >= 1.0 - SUCCESS_TOLERANCE


@dataclass
class EvalSummary:
    """Figures of one domain's evaluation, each averaged over episodes unless said otherwise."""

    domain: str
    reward_mean: float
    reward_std: float  # population std (divide by N) over episodes, not the sample std
    pass_rate: float  # share of episodes with reward == 1.0
    tool_accuracy: float | None  # mean over episodes that have golden actions; None if none has
    num_episodes: int
    # tau2's pass^k for k = 1..n (n trials per task), averaged over tasks; empty unless every task
    # has the same number of trials.
    pass_hat_k: dict[int, float] = field(default_factory=dict)
    custom_reward_mean: float | None = None

    def to_dict(self) -> dict:
        """Plain dict for JSON; pass_hat_k keeps int keys (json writes them as strings)."""
        return asdict(self)


def pass_hat_k(trials: int, successes: int, k: int) -> float:
    """tau2's pass^k for one task: chance that k trials drawn without replacement all succeed."""
    return math.comb(successes, k) / math.comb(trials, k)


def pass_hat_k_by_task(rewards: list[float], task_ids: list[str]) -> dict[int, float]:
    """pass^k for k = 1..n averaged over tasks; {} when tasks differ in their number of trials."""
    trials = Counter(task_ids)
    num_trials = set(trials.values())
    if len(num_trials) != 1:
        return {}
    n = num_trials.pop()
    successes = Counter(tid for tid, r in zip(task_ids, rewards, strict=True) if is_success(r))
    return {
        k: sum(pass_hat_k(n, successes[tid], k) for tid in trials) / len(trials)
        for k in range(1, n + 1)
    }


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def summarize(
    domain: str,
    rewards: list[float],
    tool_accuracies: list[float | None],
    task_ids: list[str],
    custom_rewards: list[float] | None = None,
) -> EvalSummary:
    """Summarise one evaluation: one entry per episode in each list, in the same order."""
    n = len(rewards)
    if n == 0:
        raise ValueError(f"no episodes to summarise for domain {domain!r}")
    if len(tool_accuracies) != n or len(task_ids) != n:
        raise ValueError(
            f"rewards ({n}), tool_accuracies ({len(tool_accuracies)}) and task_ids "
            f"({len(task_ids)}) must have one entry per episode"
        )
    if custom_rewards is not None and len(custom_rewards) != n:
        raise ValueError(f"custom_rewards has {len(custom_rewards)} entries for {n} episodes")
    mean = _mean(rewards)
    known_tool_acc = [a for a in tool_accuracies if a is not None]
    return EvalSummary(
        domain=domain,
        reward_mean=mean,
        reward_std=math.sqrt(_mean([(r - mean) ** 2 for r in rewards])),
        pass_rate=_mean([1.0 if is_success(r) else 0.0 for r in rewards]),
        tool_accuracy=_mean(known_tool_acc) if known_tool_acc else None,
        num_episodes=n,
        pass_hat_k=pass_hat_k_by_task(rewards, task_ids),
        custom_reward_mean=_mean(custom_rewards) if custom_rewards else None,
    )
