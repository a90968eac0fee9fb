"""WiSE-FT whose interpolation coefficient is chosen at each domain's end on held-out train tasks.

The last `--fusion_holdout_tasks` train tasks of every domain are held out: the trainer removes
them from the domain's train split (`held_out_tasks`), so no step, warm start or resampling ever
samples them. After domain i, with θ_start the weights it started from and θ_end those it reached,
each α of `--fusion_alpha_grid` is tried: the policy becomes (1 − α)·θ_start + α·θ_end (fusion.py's
`interpolate`) and is run greedily on the held-out tasks of domains 0..i; the α with the highest
mean of the per-domain mean rewards is kept (ties: the largest α, the least merging) before the
domain's transfer evaluation, and the next domain trains from it. Each grid point's reward and the
choice are logged (a `strategy` record and a `[FUSION]` line).

Every rank evaluates its share of the same episodes and gets the same gathered figures, and the
choice is rank 0's (all_gather), so the ranks load the same weights. Resume: θ_start, θ_end and the
rewards measured so far are in the strategy's state, so a stop during the search resumes it from
the domain's end weights and measures only the grid points not yet measured; each evaluation's
random stream depends only on the seed and its label, so a measured point gives the same figure.

Cost: two fp32 copies of the trained weights during the search (θ_start during the domain), and per
domain end one greedy evaluation of the held-out tasks of the domains seen so far per grid value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.cl.strategies.fusion import Weights, interpolate
from tau2cl.distributed import all_gather_objects
from tau2cl.env.domains import Domain, Task
from tau2cl.errors import UserError


def format_alpha_search(
    domain_idx: int, scores: Mapping[float, float], chosen: float, domains: Sequence[str]
) -> str:
    """The search's console line: "[FUSION] Task 1 α search on held-out airline, retail:
    0.5 → 0.250 | 1 → 0.125 | chosen α = 0.5" (grid points in increasing α)."""
    figures = " | ".join(f"{alpha:g} → {reward:.3f}" for alpha, reward in sorted(scores.items()))
    return f"[FUSION] Task {domain_idx} α search on held-out {', '.join(domains)}: {figures} | chosen α = {chosen:g}"


def best_alpha(scores: Mapping[float, float]) -> float:
    """The α with the highest reward; among equal rewards the largest α."""
    return max(scores, key=lambda alpha: (scores[alpha], alpha))


def holdout_split(domain: Domain, count: int) -> list[Task]:
    """The last `count` train tasks of a domain, refused when none would be left to train on."""
    tasks = domain.train_tasks
    if count >= len(tasks):
        raise UserError(
            f"--fusion_holdout_tasks {count} leaves none of the {len(tasks)} {domain.name} train tasks to train "
            "on; lower it or raise --max_tasks_per_domain."
        )
    return tasks[len(tasks) - count :]


class AdaptiveFusion(CLStrategy):
    name = "adaptive_fusion"

    def __init__(self, config):
        super().__init__(config)
        self.held: dict[str, list[Task]] = {}  # per domain; recomputed from the config on resume
        self.start: Weights | None = None  # the weights the current domain started from
        self.end: Weights | None = None  # its end weights, kept while the search runs
        self.scores: dict[float, float] = {}  # the search under way: reward per α measured so far
        self.chosen: list[dict[str, Any]] = []  # per finished domain: task_idx, alpha, scores

    def held_out_tasks(self, domain: Domain) -> list[Task]:
        self.held[domain.name] = holdout_split(domain, self.config.fusion_holdout_tasks)
        return self.held[domain.name]

    def before_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        self.start = ctx.snapshot_weights()

    def after_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        assert self.start is not None, "before_domain saved the start"
        if self.end is None:  # not a resumed search: the weights are the domain's end
            self.end = ctx.snapshot_weights()
        seen = ctx.order[: domain_idx + 1]
        for alpha in self.config.fusion_alpha_grid:
            if alpha not in self.scores:
                ctx.load_weights(interpolate(self.start, self.end, alpha))
                self.scores[alpha] = self._held_out_reward(ctx, domain_idx, alpha, seen)
        alpha = all_gather_objects(best_alpha(self.scores))[0]  # rank 0's choice, on every rank
        ctx.load_weights(interpolate(self.start, self.end, alpha))
        self.chosen.append({"domain_idx": domain_idx, "alpha": alpha, "scores": dict(self.scores)})
        figures = {
            "fusion_alpha": alpha,
            **{f"fusion_reward/alpha_{a:g}": r for a, r in self.scores.items()},
            "held_out_tasks": {name: [t.id for t in self.held[name]] for name in seen},
        }
        ctx.log(figures, format_alpha_search(domain_idx, self.scores, alpha, seen))
        self.start, self.end, self.scores = None, None, {}

    def _held_out_reward(self, ctx: CLContext, domain_idx: int, alpha: float, seen: list[str]) -> float:
        """Mean over the seen domains of the mean reward on their held-out tasks."""
        label = f"α search after task {domain_idx}, α={alpha:g}"
        return sum(ctx.evaluate(name, self.held[name], label) for name in seen) / len(seen)

    def state_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "scores": self.scores, "chosen": self.chosen}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.end = state["start"], state["end"]
        self.scores, self.chosen = dict(state["scores"]), list(state["chosen"])
