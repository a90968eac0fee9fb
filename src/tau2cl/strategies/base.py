"""The continual-learning strategy interface: hooks named after the moment they run.

The trainer calls every hook at its moment and holds no strategy-specific code; a strategy acts
only through these hooks (Avalanche-style plugins). Order within a run:

    setup → for each domain: before_domain → per step: augment_batch → after_rollout →
    loss_terms → after_update → after_domain

Every hook runs on every rank with the same arguments' shapes, so a strategy that issues a
collective (e.g. all-reducing a Fisher) does so on all ranks together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tau2cl.rollout import RolloutRequest, Trajectory
    from tau2cl.trainer import GRPOTrainer


class CLStrategy:
    """No-op defaults; a strategy overrides the hooks it needs."""

    name = "base"

    def __init__(self, config: Any):
        self.config = config

    def setup(self, trainer: GRPOTrainer) -> None:
        """Once, after the model and domains are ready, before any evaluation."""

    def before_domain(self, trainer: GRPOTrainer, task_idx: int, domain: str) -> None:
        """Before the first step on a domain."""

    def augment_batch(self, trainer: GRPOTrainer, requests: list[RolloutRequest]) -> list[RolloutRequest]:
        """The step's rollout requests; a strategy may add or replace requests (replay)."""
        return requests

    def after_rollout(self, trainer: GRPOTrainer, trajectories: list[Trajectory]) -> None:
        """After the step's episodes are scored (rewards and advantages known)."""

    def loss_terms(self, trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
        """Extra differentiable loss terms added once per optimizer step (e.g. a penalty)."""
        return {}

    def after_update(self, trainer: GRPOTrainer, step: int) -> None:
        """After each optimizer step."""

    def after_domain(self, trainer: GRPOTrainer, task_idx: int, domain: str) -> None:
        """After the last step on a domain, before its transfer evaluation."""

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to resume this strategy."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""


_REGISTRY: dict[str, type[CLStrategy]] = {}


def register(cls: type[CLStrategy]) -> type[CLStrategy]:
    _REGISTRY[cls.name] = cls
    return cls


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def build_strategy(config: Any) -> CLStrategy:
    from tau2cl.errors import UserError

    if config.cl_algorithm not in _REGISTRY:
        valid = ", ".join(registered_names())
        raise UserError(f"unknown cl_algorithm '{config.cl_algorithm}'; choose one of: {valid}.")
    return _REGISTRY[config.cl_algorithm](config)
