"""Sequential fine-tuning: train on each domain in turn and do nothing against forgetting."""

from __future__ import annotations

from tau2cl.cl.strategies.base import CLStrategy


class Sequential(CLStrategy):
    """The baseline: every hook is the base class's no-op. Cost: none."""

    name = "sequential"
