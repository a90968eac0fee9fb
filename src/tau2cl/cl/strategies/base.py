"""The continual-learning strategy interface: hooks named after the moment they run.

The trainer calls every hook at its moment and holds no strategy-specific code; a strategy acts
only through these hooks (Avalanche-style plugins). Order within a run:

    held_out_tasks (per domain) → setup → for each domain: stage_name, training_domains →
    before_domain → per step: augment_batch → after_rollout → teacher_weights → loss_terms →
    after_update → step_metrics → after_domain

and `evaluation_weights` before every evaluation of a domain.

Every hook receives the run's `CLContext` (context.py), never the trainer. Every hook runs on
every rank with the same arguments' shapes, so a strategy that issues a collective (e.g.
all-reducing a Fisher) does so on all ranks together.
"""

from __future__ import annotations

from typing import Any

import torch

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.registry import STRATEGIES, strategy_class
from tau2cl.env.domains import Domain, Task
from tau2cl.errors import UserError


class CLStrategy:
    """No-op defaults; a strategy overrides the hooks it needs."""

    name = "base"

    def __init__(self, config: Any):
        self.config = config

    def held_out_tasks(self, domain: Domain) -> list[Task]:
        """Train tasks of `domain` kept out of training: the trainer removes them from the domain's
        train split before anything samples it (steps, warm start, resampling, other hooks). Called
        once per domain when the run starts, before `setup`."""
        return []

    def setup(self, ctx: CLContext) -> None:
        """Once, after the model and domains are ready, before any evaluation."""

    def training_domains(self, order: list[str], domain_idx: int) -> list[str]:
        """The domains whose train tasks stage `domain_idx`'s warm start and GRPO steps draw from:
        the stage's own domain; a strategy that trains on several at once (joint) names them."""
        return [order[domain_idx]]

    def stage_name(self, order: list[str], domain_idx: int) -> str:
        """What the console calls stage `domain_idx` (its banner and bar); files keep the domain."""
        return order[domain_idx]

    def before_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        """Before the first step on a domain."""

    def augment_batch(self, ctx: CLContext, requests: list[RolloutRequest]) -> list[RolloutRequest]:
        """The step's rollout requests; a strategy may add or replace requests (replay)."""
        return requests

    def after_rollout(self, ctx: CLContext, trajectories: list[Trajectory]) -> None:
        """After the step's episodes are scored (rewards and advantages known)."""

    def teacher_weights(self, ctx: CLContext) -> dict[str, torch.Tensor] | None:
        """A frozen teacher, as trainable weights by name (those of `snapshot_weights`), or None.

        When given, the update scores the step's generated tokens under the policy with these
        weights in place (once per step, no gradient) and adds `distill_coef` × the per-token KL
        of the policy to it to the loss, masked like the policy loss, logged as `distill_kl`.
        """
        return None

    def loss_terms(self, ctx: CLContext) -> dict[str, torch.Tensor]:
        """Extra differentiable loss terms added once per optimizer step (e.g. a penalty)."""
        return {}

    def after_update(self, ctx: CLContext, step: int) -> None:
        """After each optimizer step."""

    def step_metrics(self, ctx: CLContext, trajectories: list[Trajectory]) -> dict[str, Any]:
        """Figures the strategy adds to the step's train record (the same on every rank)."""
        return {}

    def after_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        """After the last step on a domain, before its transfer evaluation."""

    def evaluation_weights(self, ctx: CLContext, domain: str) -> dict[str, torch.Tensor] | None:
        """The trainable weights (by name, as `ctx.snapshot_weights` gives them) that evaluating
        `domain` uses, swapped into the rollout model for that evaluation only; None: the current
        ones. A strategy that knows the task at test time picks per domain (progressive)."""
        return None

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to resume this strategy."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""


def build_strategy(config: Any) -> CLStrategy:
    """The strategy `config.cl_algorithm` names."""
    if config.cl_algorithm not in STRATEGIES:
        valid = ", ".join(STRATEGIES)
        raise UserError(f"unknown cl_algorithm '{config.cl_algorithm}'; choose one of: {valid}.")
    return strategy_class(config.cl_algorithm)(config)
