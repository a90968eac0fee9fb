"""CLContext: exactly what a continual-learning strategy may read and call, and nothing more.

Strategies never see the trainer. The trainer builds one context per run and hands it to every
hook; a test can fake one in a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.distributed import DistInfo
from tau2cl.env.domains import Domain


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint and updated in place by the trainer."""

    task_idx: int = 0  # domain being trained (index into task_order)
    step: int = 0  # steps completed on that domain
    sft_step: int = 0  # supervised warm-start steps completed on that domain (they come first)
    global_step: int = 0
    stages_done: int = 0  # rows of the accuracy matrix filled (row 0 = before training)

    def set(self, **fields: int) -> None:
        for name, value in fields.items():
            if not hasattr(self, name):
                raise AttributeError(f"Progress has no field {name!r}")
            setattr(self, name, value)


@dataclass
class CLContext:
    """A strategy's view of the run.

    `rollout` samples episodes with the current policy (the training engine and the run's random
    stream); `generated_logprob` is the differentiable sum of log-probs, under the current policy,
    of the tokens a trajectory's policy generated (for Fisher estimates).
    """

    config: Any  # the run's GRPOConfig, read-only
    dist: DistInfo
    order: list[str]  # the domain sequence
    domains: dict[str, Domain]
    params: list[torch.Tensor]  # the trainable parameters (the full weights on every rank)
    progress: Progress
    rollout: Callable[[list[RolloutRequest]], list[Trajectory]]
    generated_logprob: Callable[[Trajectory], torch.Tensor]

    @property
    def current_domain(self) -> str:
        return self.order[self.progress.task_idx]

    @property
    def earlier_domains(self) -> list[str]:
        return self.order[: self.progress.task_idx]
