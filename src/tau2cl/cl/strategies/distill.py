"""Self-distillation to the previous stage: a KL penalty towards the policy as it was when the
current domain began (an on-policy form of Learning without Forgetting, Li & Hoiem 2017).

At the start of every domain after the first, the teacher becomes a frozen copy of the policy's
trainable weights as they are then (all the weights in full fine-tuning, the adapters alone with
LoRA). At every step the update scores the step's generated tokens under the teacher once (the
policy with the teacher's weights in place, no gradient) and adds `distill_coef` × the k3
estimate of KL(policy ‖ teacher) per token to the GRPO loss, masked like the policy loss; the
first domain has no teacher and no penalty. The KL is exactly 0 at a domain's first step (the
teacher is the policy) and grows as the domain moves the policy away from what it was.

Costs: one copy of the trainable weights (full fine-tuning: an fp32 copy of the model's weights,
what a frozen copy of the model would take; LoRA: a copy of the adapters), held while the domain
trains and stored in the checkpoints taken meanwhile, so that a run resumed mid-domain keeps its
domain's teacher exactly (one taken at a domain's end needs none: the next domain takes its own);
and one no-grad forward over the step's batch, like the reference model's for `--kl_coef`.
"""

from __future__ import annotations

import torch

from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy

Weights = dict[str, torch.Tensor]


class Distill(CLStrategy):
    name = "distill"

    def __init__(self, config):
        super().__init__(config)
        self.teacher: Weights | None = None  # the policy's trainable weights at this domain's start

    def before_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        self.teacher = ctx.snapshot_weights() if domain_idx > 0 else None

    def teacher_weights(self, ctx: CLContext) -> Weights | None:
        if self.teacher is None or self.config.distill_coef == 0:
            return None
        device = ctx.params[0].device
        if any(w.device != device for w in self.teacher.values()):  # read from a checkpoint onto the CPU
            self.teacher = {name: w.to(device) for name, w in self.teacher.items()}
        return self.teacher

    def after_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        """The domain is done with its teacher: the evaluation and the domain's checkpoint go without."""
        self.teacher = None

    def state_dict(self) -> dict:
        return {"teacher": self.teacher}

    def load_state_dict(self, state: dict) -> None:
        self.teacher = state["teacher"]
