"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) and its online variant (Schwarz et al. 2018).

After each domain, a diagonal Fisher F is estimated under the policy itself: episodes are
sampled on the domain's train tasks, and for each one the gradient of the log-likelihood of the
tokens the policy generated is squared and averaged over episodes. (The squared gradient of the
GRPO loss would be the wrong quantity: group-normalised advantages sum to zero within a group,
so that gradient carries the reward signal, not the curvature of the policy.) The penalty
(λ/2) Σ F (θ − θ*)² is then added to the loss at every later step.

Costs: `ewc` keeps one Fisher and one anchor (fp32, the size of the weights each) per finished
domain; `online_ewc` keeps one of each in all, F ← γF + F_new with the anchor at the latest
domain's end. Estimating a Fisher costs `ewc_fisher_samples` rollouts and backward passes.
"""

from __future__ import annotations

import math
import random

import torch

from tau2cl.agent.episode import RolloutRequest, Trajectory
from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.distributed import all_reduce_sum_

Tensors = list[torch.Tensor]


def on_device_of(tensors: Tensors, params: Tensors) -> Tensors:
    """The tensors on their parameters' devices (a checkpoint is read onto the CPU; moved once)."""
    if all(t.device == p.device for t, p in zip(tensors, params, strict=True)):
        return tensors
    return [t.to(p.device) for t, p in zip(tensors, params, strict=True)]


def ewc_penalty(params: Tensors, anchors: Tensors, fisher: Tensors, lam: float) -> torch.Tensor:
    """(λ/2) Σ_i F_i (θ_i − θ*_i)² over all parameter tensors (differentiable in params)."""
    total = params[0].new_zeros((), dtype=torch.float32)
    for p, a, f in zip(params, anchors, fisher, strict=True):
        total = total + (f * (p.float() - a) ** 2).sum()
    return 0.5 * lam * total


def normalize_fisher(fisher: Tensors, how: str) -> Tensors:
    """Scale a Fisher by its mean or maximum entry (none: unchanged); an all-zero Fisher stays zero."""
    if how == "none":
        return fisher
    flat = torch.cat([f.reshape(-1) for f in fisher])
    scale = float(flat.mean() if how == "mean" else flat.max())
    return fisher if scale <= 0 else [f / scale for f in fisher]


def online_update(running: Tensors | None, new: Tensors, gamma: float) -> Tensors:
    """F ← γF + F_new (the first Fisher is taken as it is)."""
    if running is None:
        return [f.clone() for f in new]
    return [gamma * r.to(f.device) + f for r, f in zip(running, new, strict=True)]  # r: maybe read to the CPU


class EWC(CLStrategy):
    """One (Fisher, anchor) pair per finished domain; the penalty sums over all of them."""

    name = "ewc"

    def __init__(self, config):
        super().__init__(config)
        self.fishers: list[Tensors] = []
        self.anchors: list[Tensors] = []

    def after_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        fisher = normalize_fisher(estimate_fisher(ctx, domain), self.config.ewc_fisher_normalization)
        anchor = [p.detach().float().clone() for p in ctx.params]
        self.consolidate(fisher, anchor)

    def consolidate(self, fisher: Tensors, anchor: Tensors) -> None:
        self.fishers.append(fisher)
        self.anchors.append(anchor)

    def loss_terms(self, ctx: CLContext) -> dict[str, torch.Tensor]:
        if not self.fishers or self.config.ewc_lambda == 0:
            return {}
        self.fishers = [on_device_of(f, ctx.params) for f in self.fishers]
        self.anchors = [on_device_of(a, ctx.params) for a in self.anchors]
        penalty = sum(
            ewc_penalty(ctx.params, a, f, self.config.ewc_lambda) for f, a in zip(self.fishers, self.anchors, strict=True)
        )
        return {"ewc_penalty": penalty}

    def state_dict(self) -> dict:
        return {"fishers": self.fishers, "anchors": self.anchors}

    def load_state_dict(self, state: dict) -> None:
        self.fishers, self.anchors = state["fishers"], state["anchors"]


class OnlineEWC(EWC):
    """A single running Fisher F ← γF + F_new and a single anchor at the latest domain's end."""

    name = "online_ewc"

    def consolidate(self, fisher: Tensors, anchor: Tensors) -> None:
        running = self.fishers[0] if self.fishers else None
        self.fishers = [online_update(running, fisher, self.config.ewc_gamma)]
        self.anchors = [anchor]


def estimate_fisher(ctx: CLContext, domain_name: str) -> Tensors:
    """Diagonal Fisher of the policy on a domain's train tasks, identical on every rank.

    Each rank samples its share of `ewc_fisher_samples` episodes, then `episode_fisher`.
    """
    cfg, dist = ctx.config, ctx.dist
    domain = ctx.domains[domain_name]
    per_rank = math.ceil(cfg.ewc_fisher_samples / dist.world_size)
    rng = random.Random(f"{cfg.seed}-fisher-{domain_name}-{dist.rank}")
    requests = [RolloutRequest(domain, rng.choice(domain.train_tasks), group=i) for i in range(per_rank)]
    return episode_fisher(ctx, ctx.rollout(requests))


def episode_fisher(ctx: CLContext, trajectories: list[Trajectory]) -> Tensors:
    """Diagonal Fisher of the policy from episodes, identical on every rank (all ranks call it).

    Per episode the log-likelihood of its generated tokens is backpropagated alone and the squared
    gradient accumulated; the sums and the episode count are all-reduced, so every rank divides
    the same totals. Gradients are cleared before and after.
    """
    dist = ctx.dist
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in ctx.params]
    count = 0
    _clear_grads(ctx.params)
    for _ in ctx.episode_gradients(trajectories):
        for s, p in zip(sums, ctx.params, strict=True):
            if p.grad is not None:
                s += p.grad.float() ** 2
        count += 1
        _clear_grads(ctx.params)
    for s in sums:
        all_reduce_sum_(s)
    total = all_reduce_sum_(torch.tensor([float(count)], device=dist.device)).item()
    return [s / max(total, 1.0) for s in sums]


def _clear_grads(params: Tensors) -> None:
    for p in params:
        p.grad = None
