"""Progressive LoRA adapters: a new adapter for each domain, earlier ones frozen, chosen by domain.

As in progressive networks (Rusu et al. 2016), each domain gets its own trainable capacity and
the capacity of earlier domains is frozen, and the task identity is known at test time: domain j
is evaluated with adapter j, so training a later domain cannot change how an earlier one is
answered (no forgetting, by construction). There are no lateral connections; forward transfer
comes from `--progressive_init previous`, which starts each new adapter from the previous
domain's final one (`fresh`: from the adapters' initialisation, A random and B zero, so a new
adapter adds nothing until it trains).

The model holds one set of LoRA parameters, the live adapter, which is the current domain's:
the optimizer, DDP/FSDP and the reference model (adapters off) never see another set. A finished
domain's adapter is kept as a frozen fp32 copy on the CPU; evaluating an earlier domain swaps its
copy into the rollout model for that evaluation only (`evaluation_weights`). A domain not trained
yet is evaluated with the adapter it would start from. Each new adapter starts with fresh AdamW
moments. Checkpoints hold the live adapter in the adapter files and the frozen ones (and the
initialisation) in the strategy's state, so a run resumes exactly, mid-domain or at a boundary.

Cost: one adapter-sized fp32 copy per finished domain and one of the initialisation (CPU memory),
and a copy of an adapter into the rollout model around each evaluation of an earlier domain.
"""

from __future__ import annotations

import torch

from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy

Weights = dict[str, torch.Tensor]


def on_cpu(weights: Weights) -> Weights:
    return {name: w.detach().float().cpu().clone() for name, w in weights.items()}


class Progressive(CLStrategy):
    name = "progressive"

    def __init__(self, config):
        super().__init__(config)
        self.initial: Weights | None = None  # the adapters' initialisation (a fresh adapter's start)
        self.adapters: dict[str, Weights] = {}  # each finished domain's adapter, frozen

    def setup(self, ctx: CLContext) -> None:
        if self.initial is None:  # a resumed run keeps the one it saved
            self.initial = on_cpu(ctx.snapshot_weights())

    def before_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        if domain_idx == 0:
            return  # the first adapter is the one the model was built with
        ctx.restart_optimizer()  # new parameters: AdamW's moments of the previous adapter do not apply
        if self.config.progressive_init == "fresh":
            ctx.load_weights(self.initial)
        # previous: the live adapter already holds the previous domain's final weights

    def after_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        self.adapters[domain] = on_cpu(ctx.snapshot_weights())

    def evaluation_weights(self, ctx: CLContext, domain: str) -> Weights | None:
        """Adapter j for a finished domain j; the live adapter for the current one; for a domain not
        trained yet, the adapter it would start from."""
        if domain not in ctx.order or domain == ctx.current_domain:
            return None
        if domain in self.adapters:
            return self.adapters[domain]
        return self.initial if self.config.progressive_init == "fresh" else None

    def state_dict(self) -> dict:
        return {"initial": self.initial, "adapters": self.adapters}

    def load_state_dict(self, state: dict) -> None:
        self.initial, self.adapters = state["initial"], dict(state["adapters"])
