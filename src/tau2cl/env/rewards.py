"""Scoring finished trajectories: tau2's reward, tool accuracy and the reward trained on.

`--reward_fn tau2` trains on tau2's evaluator reward; `--reward_fn module:function` trains on
`function(domain_name, task, messages) -> float` while tau2's reward is still computed and
reported beside it. A custom function is the user's code: a call that raises, returns anything but
a finite number, or outlasts its timeout is a RewardFnError naming the function, the task and what
came back, never a substitute reward. With a timeout the call runs in a daemon helper thread, so
the caller keeps checking for a stop request while it waits (a hung call is abandoned, not killed).
"""

from __future__ import annotations

import importlib
import math
import numbers
import threading
from collections.abc import Callable
from typing import Any, Protocol

from tau2cl.env.domains import Domain
from tau2cl.env.tau2_reward import compute_reward
from tau2cl.errors import UserError

RewardFn = Callable[[str, Any, list], float]
_WAIT_SLICE = 0.2  # seconds between stop checks while a reward call runs


class ScoredEpisode(Protocol):
    """What scoring reads from a finished episode (the rollout engine's Trajectory) and fills in."""

    domain: str
    task: Any
    messages: list
    termination_reason: Any
    episode_state: Any
    reward: float
    tool_accuracy: float | None
    reward_info: Any
    train_reward: float


class RewardFnError(UserError):
    """A custom reward function failed on one task; the message says which, where and how."""


def _name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def checked_reward(fn: RewardFn, domain: str, task: Any, messages: list, timeout: float | None = None,
                   check_stop: Callable[[], None] | None = None) -> float:
    """fn(domain, task, messages) as a finite float, or a RewardFnError that names the fault."""
    where = f"reward_fn {_name(fn)} on {domain} task {getattr(task, 'id', '?')}"
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn(domain, task, messages)
        except Exception as exc:  # the user's code: any failure is reported, none absorbed
            outcome["error"] = exc

    if timeout is None and check_stop is None:
        call()
    else:
        worker = threading.Thread(target=call, daemon=True, name="tau2cl-reward")
        worker.start()
        waited = 0.0
        while worker.is_alive() and (timeout is None or waited < timeout):
            worker.join(_WAIT_SLICE)
            waited += _WAIT_SLICE
            if check_stop is not None:
                check_stop()
        if worker.is_alive():
            raise RewardFnError(f"{where} did not return within --reward_timeout {timeout:g} s.")
    if "error" in outcome:
        exc = outcome["error"]
        raise RewardFnError(f"{where} raised {type(exc).__name__}: {str(exc).strip()[:200]}.")
    value = outcome.get("value")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardFnError(f"{where} returned {value!r:.100}, not a number.")
    if not math.isfinite(float(value)):
        raise RewardFnError(f"{where} returned {float(value)}, not a finite number.")
    return float(value)


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
    trajectories: list[ScoredEpisode],
    domains: dict[str, Domain],
    reward_fn: RewardFn | None = None,
    judge_model: str | None = None,
    reward_timeout: float | None = None,
    check_stop: Callable[[], None] | None = None,
) -> None:
    """Fill reward, tool_accuracy, reward_info and train_reward of each trajectory in place.

    `check_stop` is called between episodes (and while a custom reward call runs); it raises to
    abandon the scoring when the run must stop.
    Each trajectory's environment is scored in place where that is provably tau2's result, and
    released afterwards.
    """
    for traj in trajectories:
        if check_stop is not None:
            check_stop()
        domain = domains[traj.domain]
        task = traj.task
        result = compute_reward(domain, task, traj.messages, traj.termination_reason, judge_model=judge_model,
                                episode_state=traj.episode_state)
        traj.episode_state = None  # scored: the environment is not needed any more
        traj.reward = float(result.reward)
        traj.tool_accuracy = result.tool_accuracy
        traj.reward_info = result.reward_info
        traj.train_reward = (
            traj.reward if reward_fn is None
            else checked_reward(reward_fn, traj.domain, task, traj.messages, reward_timeout, check_stop)
        )
