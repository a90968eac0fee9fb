"""Rewards are tau2's: a conversation is scored by tau2's own `evaluate_simulation`.

The conversation handed in must be the full tau2 trajectory as tau2's orchestrator records it: the
task's initial `message_history` first (if any), then tau2's greeting and the turns (the rollout
engine and `golden.golden_conversation` build it that way). tau2's environment evaluator replays
every tool call of that trajectory in a fresh environment, so a missing history would change the
database it compares.

Beside tau2's reward this reports its breakdown by reward type and the tool accuracy: the fraction
of the task's golden actions that some tool call of the conversation matches, by tau2's own
`ActionEvaluator.evaluate_actions` (the same check tau2's ACTION reward uses, counted instead of
all-or-nothing).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
import tau2.evaluator.evaluator as tau2_evaluator
import tau2.evaluator.evaluator_nl_assertions as nl_assertions
from tau2.data_model.message import Message
from tau2.data_model.simulation import RewardInfo, SimulationRun, TerminationReason
from tau2.data_model.tasks import RewardType, Task
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from tau2.evaluator.evaluator_action import ActionEvaluator
from tau2.utils.utils import get_now

from tau2cl.env import gold_state, predicted_state
from tau2cl.env.domains import Domain, gc_paused
from tau2cl.env.predicted_state import EpisodeState
from tau2cl.env.tau2_compat import as_list
from tau2cl.errors import UserError


@dataclass
class RewardResult:
    """tau2's verdict on one conversation."""

    reward: float  # tau2's reward (0..1)
    breakdown: dict[str, float]  # tau2's reward_breakdown keyed by RewardType value ("DB", ...)
    tool_accuracy: float | None  # fraction of golden actions matched; None: no golden actions
    reward_info: RewardInfo  # tau2's object, saved into Results files


def make_simulation(
    task: Task,
    messages: list[Message],
    termination_reason: TerminationReason | str,
    *,
    reward_info: RewardInfo | None = None,
    duration: float = 0.0,
    seed: int | None = None,
    trial: int | None = None,
) -> SimulationRun:
    """The tau2 record of one conversation, as tau2's evaluator and Results files take it."""
    stamps = [m.timestamp for m in messages if getattr(m, "timestamp", None)]
    now = get_now()
    return SimulationRun(
        id=str(uuid.uuid4()),
        task_id=task.id,
        start_time=stamps[0] if stamps else now,
        end_time=stamps[-1] if stamps else now,
        duration=duration,
        termination_reason=TerminationReason(termination_reason),
        reward_info=reward_info,
        messages=list(messages),
        seed=seed,
        trial=trial,
    )


def compute_reward(
    domain: Domain,
    task: Task,
    messages: list[Message],
    termination_reason: TerminationReason | str,
    judge_model: str | None = None,
    judge_args: dict | None = None,
    episode_state: EpisodeState | None = None,
) -> RewardResult:
    """Score a full conversation with tau2's evaluator (see the module note on `messages`).

    Tasks whose reward basis has NL_ASSERTION are judged by `judge_model` (a litellm model;
    `judge_args` are extra litellm arguments such as api_base); without a judge they cannot be
    scored (a UserError), and a judge that fails gives reward 0 with the error in `info`.
    `episode_state`: the episode's environment after the rollout and its call log; where it is
    provably the environment tau2 would rebuild, it is scored in place (predicted_state.py).
    """
    simulation = make_simulation(task, messages, termination_reason)
    predicted = None
    if predicted_state.proven(episode_state, task, messages, domain.solo_mode):
        key = predicted_state.state_key(domain.name, task, episode_state, domain.solo_mode)
        lendable = predicted_state.lendable(episode_state, task, domain.solo_mode)
        predicted = predicted_state.EpisodeEnvironment(episode_state, key, lendable)
    info = _evaluate(domain, task, simulation, judge_model, judge_args or {}, predicted)
    return RewardResult(
        reward=float(info.reward),
        breakdown=reward_breakdown(info),
        tool_accuracy=tool_accuracy(task, messages),
        reward_info=info,
    )


def _evaluate(
    domain: Domain, task: Task, simulation: SimulationRun, judge_model: str | None, judge_args: dict,
    predicted: Any | None = None,
) -> RewardInfo:
    kwargs = dict(simulation=simulation, task=task, solo_mode=domain.solo_mode, domain=domain.name)
    if not _needs_judge(task):
        with _environments_from(domain, task, predicted), gc_paused():
            return evaluate_simulation(evaluation_type=EvaluationType.ALL, **kwargs)
    if judge_model is None:
        raise UserError(f"task {task.id} is scored by natural-language assertions; set --judge_model.")
    try:
        with _environments_from(domain, task, predicted), _judge(judge_model, judge_args):
            return evaluate_simulation(evaluation_type=EvaluationType.ALL_WITH_NL_ASSERTIONS, **kwargs)
    except Exception as exc:  # the judge's API failed: this episode scores 0, the run goes on
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
        return RewardInfo(reward=0.0, info={"note": "the NL-assertion judge failed", "judge_error": error})


_JUDGE_LOCK = threading.Lock()


@contextlib.contextmanager
def _judge(model: str, extra_args: dict) -> Iterator[None]:
    """tau2 reads its judge from module constants; set them for this call only (one at a time)."""
    with _JUDGE_LOCK:
        saved = nl_assertions.DEFAULT_LLM_NL_ASSERTIONS, nl_assertions.DEFAULT_LLM_NL_ASSERTIONS_ARGS
        nl_assertions.DEFAULT_LLM_NL_ASSERTIONS = model
        nl_assertions.DEFAULT_LLM_NL_ASSERTIONS_ARGS = {**saved[1], **extra_args}
        try:
            yield
        finally:
            nl_assertions.DEFAULT_LLM_NL_ASSERTIONS, nl_assertions.DEFAULT_LLM_NL_ASSERTIONS_ARGS = saved


# ---- tau2's evaluator, with environments built from memory -----------------------------------
# evaluate_simulation builds two environments per call through tau2's registry, which reads the
# domain's database files from disk each time (airline: ~0.2 s a read). While compute_reward runs,
# the registry the evaluator sees hands out `Domain.base_environment` instead: the same tau2
# constructor on an in-memory copy of the same data, so the reward is the same number; and the
# gold environment (the task's golden actions replayed) is built and hashed once per task
# (gold_state.py). Anything else that calls tau2 (and compute_reward's callers on other threads)
# still sees tau2's registry.
@dataclass(frozen=True)
class _Scoring:
    """What the evaluator is scoring on this thread: the domain and the task."""

    domain: Domain
    task: Task
    predicted: Any | None = None  # the episode's own environment, standing in for tau2's rebuilt one


_ACTIVE: ContextVar[_Scoring | None] = ContextVar("tau2cl_active_scoring", default=None)


class _MemoryRegistry:
    """tau2's registry, except the environments of the domain being scored by this thread."""

    def __init__(self, base: Any):
        self._base = base

    def get_env_constructor(self, name: str) -> Callable[..., Any]:
        scoring = _ACTIVE.get()
        if scoring is not None and scoring.domain.name == name:
            return gold_state.gold_aware_constructor(
                scoring.domain.base_environment, name, scoring.task, scoring.predicted
            )
        return self._base.get_env_constructor(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


@contextlib.contextmanager
def _environments_from(domain: Domain, task: Task, predicted: Any | None) -> Iterator[None]:
    if not isinstance(tau2_evaluator.registry, _MemoryRegistry):
        tau2_evaluator.registry = _MemoryRegistry(tau2_evaluator.registry)
    token = _ACTIVE.set(_Scoring(domain, task, predicted))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _needs_judge(task: Task) -> bool:
    criteria = task.evaluation_criteria
    return criteria is not None and RewardType.NL_ASSERTION in as_list(criteria.reward_basis)


def reward_breakdown(info: RewardInfo) -> dict[str, float]:
    """tau2's per-type rewards keyed by the type's value ("DB", "COMMUNICATE", ...)."""
    breakdown = info.reward_breakdown or {}
    return {getattr(k, "value", str(k)): float(v) for k, v in breakdown.items()}


def tool_accuracy(task: Task, messages: list[Message]) -> float | None:
    """Fraction of the task's golden actions matched by a tool call (None: no golden actions)."""
    criteria = task.evaluation_criteria
    golden = as_list(criteria.actions) if criteria is not None else []
    if not golden:
        return None
    checks = as_list(ActionEvaluator.evaluate_actions(messages, golden))
    return sum(1.0 for check in checks if check.action_match) / len(checks)
