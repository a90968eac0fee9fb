"""CLContext: exactly what a continual-learning strategy may read and call, and nothing more.

Strategies never see the trainer. The trainer builds one context per run and hands it to every
hook; a test can fake one in a few lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.distributed import DistInfo
from tau2cl.env.domains import Domain

SAVED_DOMAIN_INDEX = "task_idx"  # the domain index's name in checkpoints, as in metrics.jsonl


class Pending(str, Enum):
    """Work a stop interrupted at the run's position, redone first on resume."""

    NOTHING = ""
    MID_DOMAIN_EVAL = "eval"  # the mid-domain evaluation after `step`
    STAGE_EVAL = "stage"  # the evaluation stage after the domain (its after_domain hook is done)


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint and updated in place by the trainer."""

    domain_idx: int = 0  # domain being trained (index into task_order)
    step: int = 0  # steps completed on that domain
    sft_step: int = 0  # supervised warm-start steps completed on that domain (they come first)
    global_step: int = 0
    stages_done: int = 0  # rows of the accuracy matrix filled (row 0 = before training)
    pending: Pending = Pending.NOTHING

    def to_dict(self) -> dict[str, int | str]:
        """Plain values as a checkpoint stores them (the domain index under the run files' name,
        `task_idx`)."""
        values = {**vars(self), "pending": self.pending.value}
        values[SAVED_DOMAIN_INDEX] = values.pop("domain_idx")
        return values

    def load(self, saved: dict[str, int | str]) -> None:
        """Take the values of `to_dict`, as read from a checkpoint."""
        fields = {("domain_idx" if k == SAVED_DOMAIN_INDEX else k): v for k, v in saved.items()}
        fields["pending"] = Pending(fields.get("pending", ""))
        self.set(**fields)

    def set(self, **fields: int | str) -> None:
        for name, value in fields.items():
            if not hasattr(self, name):
                raise AttributeError(f"Progress has no field {name!r}")
            setattr(self, name, value)


@dataclass
class CLContext:
    """A strategy's view of the run.

    `rollout` samples episodes with the current policy (the training engine and the run's random
    stream); `episode_gradients(trajectories)` backpropagates, one trajectory at a time, the sum of
    log-probs under the current policy of the tokens each trajectory's policy generated, and yields
    each trajectory (skipping those that generated none) once that gradient is in the parameters'
    `.grad` (accumulated: clear them before resuming; for Fisher estimates). `snapshot_weights` is a
    detached fp32 copy of the policy's full weights by name, and `load_weights` makes such a dict
    the policy's weights (training copy and rollout copy alike, on every rank). `accuracy_matrix`
    is the reward matrix as filled so far (row 0 before training, row i after the i-th domain).
    `restart_optimizer` resets AdamW's moments (for a strategy that gives the trained parameters a
    new meaning, such as a new adapter), on every rank.
    `evaluate(domain, tasks, label)` is the mean trained reward (the custom `--reward_fn` when one
    is set, else tau2's) of the current policy on the given tasks, greedy, `eval_samples_per_task`
    runs each, the same on every rank (all ranks take part); its episodes go nowhere else (not the
    accuracy matrix, no results file), and its random stream depends only on the run's seed and
    `label`, so the same weights and label give the same figure after a resume. `log(figures,
    line)` writes a `strategy` record to metrics.jsonl and prints `line` (rank 0; a no-op elsewhere).
    """

    config: Any  # the run's GRPOConfig, read-only
    dist: DistInfo
    order: list[str]  # the domain sequence
    domains: dict[str, Domain]
    params: list[torch.Tensor]  # the trainable parameters, whole on every rank (LoRA: the adapters)
    progress: Progress
    rollout: Callable[[list[RolloutRequest]], list[Trajectory]]
    episode_gradients: Callable[[list[Trajectory]], Iterator[Trajectory]]
    snapshot_weights: Callable[[], dict[str, torch.Tensor]]
    load_weights: Callable[[dict[str, torch.Tensor]], None]
    accuracy_matrix: Callable[[], list[list[float | None]]]
    restart_optimizer: Callable[[], None] = lambda: None
    evaluate: Callable[[str, list[Any], str], float] | None = None
    log: Callable[[dict[str, Any], str], None] | None = None

    @property
    def current_domain(self) -> str:
        return self.order[self.progress.domain_idx]

    @property
    def earlier_domains(self) -> list[str]:
        return self.order[: self.progress.domain_idx]
