"""Weight-space fusion at each domain's end: the mean of the domain endpoints, or WiSE-FT.

`--fusion_mode endpoints` (model soup of the stages): after domain i the policy becomes the mean of
the weights reached at the end of domains 0..i, kept as a running sum, so the merge costs one fp32
copy of the weights. `--fusion_mode wise` (WiSE-FT, Wortsman et al. 2022): after each domain the
policy becomes (1 − α)·θ_start + α·θ_end with α = `--fusion_alpha`, where θ_start are the weights
the domain started from; one fp32 copy, taken at the domain's start. The merge happens before the
domain's transfer evaluation, so the accuracy matrix measures the merged policy, and the next
domain trains from it. Every rank computes the same merge from the same weights.
"""

from __future__ import annotations

import torch

from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy

Weights = dict[str, torch.Tensor]


def interpolate(start: Weights, end: Weights, alpha: float) -> Weights:
    """(1 − α)·start + α·end, tensor by tensor (α = 1: end; α = 0: start), on end's devices
    (a start read back from a checkpoint is on the CPU)."""
    return {name: (s := start[name].to(e.device)) + alpha * (e - s) for name, e in end.items()}


def add_into(total: Weights | None, weights: Weights) -> Weights:
    """Running sum of weights (the first call copies)."""
    if total is None:
        return {name: w.detach().clone() for name, w in weights.items()}
    return {name: total[name] + weights[name].to(total[name].device) for name in total}


def scaled(weights: Weights, factor: float) -> Weights:
    return {name: w * factor for name, w in weights.items()}


class Fusion(CLStrategy):
    name = "fusion"

    def __init__(self, config):
        super().__init__(config)
        self.start: Weights | None = None  # wise: the weights the current domain started from
        self.endpoint_sum: Weights | None = None  # endpoints: sum of the domain-end weights so far
        self.endpoints = 0

    def before_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        if self.config.fusion_mode == "wise":
            self.start = ctx.snapshot_weights()

    def after_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        end = ctx.snapshot_weights()
        if self.config.fusion_mode == "wise":
            assert self.start is not None, "before_domain saved the start"
            ctx.load_weights(interpolate(self.start, end, self.config.fusion_alpha))
            self.start = None
            return
        self.endpoint_sum = add_into(self.endpoint_sum, end)
        self.endpoints += 1
        ctx.load_weights(scaled(self.endpoint_sum, 1.0 / self.endpoints))

    def state_dict(self) -> dict:
        return {"start": self.start, "endpoint_sum": self.endpoint_sum, "endpoints": self.endpoints}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.endpoint_sum, self.endpoints = state["start"], state["endpoint_sum"], state["endpoints"]
