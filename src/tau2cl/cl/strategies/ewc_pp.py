"""EWC++ (Chaudhry et al. 2018, "Riemannian Walk"): a moving-average Fisher updated during training.

Every `--ewc_pp_interval` steps the diagonal Fisher of the step's own episodes of the current
domain is estimated (the squared gradient of each episode's generated tokens' log-likelihood under
the policy that sampled them, before the step's update; normalised by `--ewc_fisher_normalization`)
and folded into one running Fisher, F ← α·F_new + (1 − α)·F with α = `--ewc_pp_alpha` (the first
estimate is taken as it is). The running Fisher is never reset, so it spans every domain, the
older estimates decaying. At each domain's end the running Fisher and the weights are frozen as
the penalty's (F*, θ*), and every later step adds (λ/2) Σ F* (θ − θ*)² (λ = `--ewc_lambda`): no
penalty on the first domain.

How it differs from `online_ewc`: that one estimates a Fisher once per domain, at its end, from
`ewc_fisher_samples` extra rollouts, and sums the estimates with a decay; this one spends no
rollouts (it reuses the training episodes), its Fisher follows the domain's whole trajectory of
weights rather than only its end point, and it costs one backward pass per episode of every
`ewc_pp_interval`-th step. Memory: three fp32 copies of the trained weights (running Fisher,
frozen Fisher, anchor).
"""

from __future__ import annotations

from typing import Any

import torch

from tau2cl.agent.episode import Trajectory
from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.cl.strategies.ewc import (
    Tensors,
    episode_fisher,
    ewc_penalty,
    normalize_fisher,
    on_device_of,
)


def moving_average(running: Tensors | None, new: Tensors, alpha: float) -> Tensors:
    """F ← α·F_new + (1 − α)·F (the first Fisher is taken as it is)."""
    if running is None:
        return [f.clone() for f in new]
    return [alpha * f + (1.0 - alpha) * r.to(f.device) for r, f in zip(running, new, strict=True)]


def relative_change(old: Tensors, new: Tensors) -> float:
    """Σ|new − old| / Σ|old| over all entries (how far an update moved the Fisher); 0 for a zero old."""
    moved = sum(float((n - o).abs().sum()) for o, n in zip(old, new, strict=True))
    size = sum(float(o.abs().sum()) for o in old)
    return moved / size if size > 0 else 0.0


def is_update_step(step: int, interval: int) -> bool:
    """Whether the step numbered `step` (1-based, within the domain) updates the Fisher."""
    return step % interval == 0


class EWCPlusPlus(CLStrategy):
    name = "ewc_pp"

    def __init__(self, config):
        super().__init__(config)
        self.running: Tensors | None = None  # the moving-average Fisher
        self.fisher: Tensors | None = None  # the penalty's: the running Fisher at the last domain's end
        self.anchor: Tensors | None = None  # the weights at the last domain's end
        self.updates = 0  # Fisher updates so far (over the run)
        self.change: float | None = None  # relative change of the running Fisher by this step's update

    def after_rollout(self, ctx: CLContext, trajectories: list[Trajectory]) -> None:
        step = ctx.progress.step + 1  # the step under way (progress counts the finished ones)
        self.change = None
        if not is_update_step(step, self.config.ewc_pp_interval):
            return
        own = [t for t in trajectories if t.domain == ctx.current_domain]
        new = normalize_fisher(episode_fisher(ctx, own), self.config.ewc_fisher_normalization)
        previous, self.running = self.running, moving_average(self.running, new, self.config.ewc_pp_alpha)
        self.change = None if previous is None else relative_change(previous, self.running)
        self.updates += 1

    def after_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        if self.running is not None:
            self.fisher = [f.clone() for f in self.running]
            self.anchor = [p.detach().float().clone() for p in ctx.params]

    def loss_terms(self, ctx: CLContext) -> dict[str, torch.Tensor]:
        if self.fisher is None or self.config.ewc_lambda == 0:
            return {}
        self.fisher, self.anchor = on_device_of(self.fisher, ctx.params), on_device_of(self.anchor, ctx.params)
        return {"ewc_penalty": ewc_penalty(ctx.params, self.anchor, self.fisher, self.config.ewc_lambda)}

    def step_metrics(self, ctx: CLContext, trajectories: list[Trajectory]) -> dict[str, Any]:
        """Fisher updates so far, and how far this step's update moved the running Fisher
        (Σ|ΔF| / Σ|F|; None when the step made no update or the first one): the same on every rank."""
        return {"ewc_pp_updates": self.updates, "ewc_pp_fisher_change": self.change}

    def state_dict(self) -> dict:
        return {"running": self.running, "fisher": self.fisher, "anchor": self.anchor, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.running, self.fisher, self.anchor = state["running"], state["fisher"], state["anchor"]
        self.updates = state["updates"]
