"""Scoring finished trajectories: tau2's reward, tool accuracy and the reward trained on.

`--reward_fn tau2` trains on tau2's evaluator reward; `--reward_fn module:function` trains on
`function(domain_name, task, messages) -> float` while tau2's reward is still computed and
reported beside it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from tau2cl.agent.episode import Trajectory
from tau2cl.env.domains import Domain
from tau2cl.env.tau2_reward import compute_reward
from tau2cl.errors import UserError

RewardFn = Callable[[str, Any, list], float]


def load_reward_fn(spec: str) -> RewardFn | None:
    """None for "tau2"; else the function named by a `module:function` path."""
    if spec == "tau2":
        return None
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import reward_fn '{spec}': {exc}.") from None
    if not callable(fn):
        raise UserError(f"reward_fn '{spec}' is not callable.")
    return fn


def score_trajectories(
    trajectories: list[Trajectory],
    domains: dict[str, Domain],
    reward_fn: RewardFn | None = None,
    judge_model: str | None = None,
) -> None:
    """Fill reward, tool_accuracy, reward_info and train_reward of each trajectory in place.

    Each trajectory's environment is scored in place where that is provably tau2's result, and
    released afterwards.
    """
    for traj in trajectories:
        domain = domains[traj.domain]
        task = traj.task
        result = compute_reward(domain, task, traj.messages, traj.termination_reason, judge_model=judge_model,
                                episode_state=traj.episode_state)
        traj.episode_state = None  # scored: the environment is not needed any more
        traj.reward = float(result.reward)
        traj.tool_accuracy = result.tool_accuracy
        traj.reward_info = result.reward_info
        traj.train_reward = traj.reward if reward_fn is None else float(reward_fn(traj.domain, task, traj.messages))
