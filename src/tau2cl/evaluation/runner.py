"""Evaluation of the policy on a domain's test (or train) split, sharded across ranks and gathered.

Episode i (task i // k, sample i % k) runs on rank i % world_size; the gathered records are put
back in episode order, so the figures equal a single-process evaluation of the same episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tau2cl.agent.engine import RolloutEngine
from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.distributed import all_gather_objects
from tau2cl.env.domains import Domain
from tau2cl.env.rewards import RewardFn, score_trajectories
from tau2cl.evaluation.stats import EvalSummary, summarize
from tau2cl.runs.files import EVAL_RESULTS_DIR


@dataclass
class EvalRecord:
    """What rank 0 needs of one evaluated episode (small enough to gather)."""

    index: int
    task_id: str
    reward: float
    tool_accuracy: float | None
    custom_reward: float | None
    simulation: Any  # tau2 SimulationRun with its reward_info


@dataclass
class EvalSettings:
    samples_per_task: int
    max_tasks: int | None
    episodes_per_batch: int
    judge_model: str | None = None  # litellm judge of tau2's NL assertions (None: not evaluated)
    reward_timeout: float | None = None  # seconds a custom reward call may take
    split: str = "test"  # "train" evaluates the tasks trained on


def evaluate_domain(
    engine: RolloutEngine,
    domain: Domain,
    settings: EvalSettings,
    rank: int,
    world_size: int,
    reward_fn: RewardFn | None = None,
    generator: torch.Generator | None = None,
    guard: Callable[[Callable[[], Any]], Any] = lambda work: work(),
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    tasks: list | None = None,
) -> tuple[EvalSummary, list[EvalRecord]]:
    """Evaluate on `settings.split` (or on `tasks`, when given); every rank returns the same
    summary and all records.

    `guard` runs this rank's episodes (no collectives inside) before they are gathered, so a stop
    can leave on every rank together; `on_progress(done, total)` follows the episodes (rank 0's
    share times the ranks, an estimate of the whole).
    """
    if tasks is None:
        tasks = evaluated_tasks(domain, settings.split, settings.max_tasks)
    k = settings.samples_per_task
    total = len(tasks) * k
    mine = [i for i in range(total) if i % world_size == rank]

    def run_mine() -> list[EvalRecord]:
        records: list[EvalRecord] = []
        on_progress(0, total)
        for start in range(0, len(mine), settings.episodes_per_batch):
            chunk = mine[start : start + settings.episodes_per_batch]
            requests = [RolloutRequest(domain, tasks[i // k], group=i) for i in chunk]
            trajectories = engine.run(requests, generator)
            score_trajectories(
                trajectories, {domain.name: domain}, reward_fn, settings.judge_model,
                settings.reward_timeout, engine.check_stop,
            )
            records += [_record(i, i % k, t, reward_fn is not None) for i, t in zip(chunk, trajectories, strict=True)]
            on_progress(min(total, (start + len(chunk)) * world_size), total)
        return records

    records = guard(run_mine)
    gathered = sorted((r for part in all_gather_objects(records) for r in part), key=lambda r: r.index)
    summary = summarize(
        domain.name,
        [r.reward for r in gathered],
        [r.tool_accuracy for r in gathered],
        [r.task_id for r in gathered],
        [r.custom_reward for r in gathered] if reward_fn is not None else None,
    )
    return summary, gathered


def evaluated_tasks(domain: Domain, split: str, max_tasks: int | None) -> list:
    """The tasks an evaluation runs: the split's first `max_tasks` (all when None)."""
    return domain.tasks(split)[:max_tasks] if max_tasks else domain.tasks(split)


def _record(index: int, trial: int, traj: Trajectory, custom: bool) -> EvalRecord:
    return EvalRecord(
        index=index,
        task_id=traj.task_id,
        reward=traj.reward,
        tool_accuracy=traj.tool_accuracy,
        custom_reward=traj.train_reward if custom else None,
        simulation=to_simulation(traj, index, trial),
    )


def to_simulation(traj: Trajectory, index: int, trial: int) -> Any:
    """The trajectory as a tau2 SimulationRun (for tau2 Results files)."""
    from tau2.data_model.simulation import SimulationRun
    from tau2.utils.utils import get_now

    from tau2cl.env import tau2_compat  # noqa: F401

    now = get_now()
    return SimulationRun(
        id=f"{traj.domain}-{traj.task_id}-{index}",
        task_id=traj.task_id,
        start_time=now,
        end_time=now,
        duration=0.0,
        termination_reason=traj.termination_reason,
        reward_info=traj.reward_info,
        messages=traj.messages,
        trial=trial,
    )


def results_path(log_dir: str | Path, label: str, domain: str) -> Path:
    return Path(log_dir) / EVAL_RESULTS_DIR / f"{label}_{domain}.json"
