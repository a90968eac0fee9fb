"""Joint (multi-task) training: the upper bound that sequential strategies are read against.

Every stage's warm start and GRPO steps draw from the train tasks of all domains in --task_order,
mixed in one pool (each task still runs in its own domain's environment). The run keeps the
sequential schedule: one stage per domain of --task_order, each with --sft_steps_per_task
supervised and --num_steps_per_task GRPO steps, and an evaluation of every domain after each. So a
joint run takes exactly as many steps, of the same batch size, as a sequential one, and its matrix
has the same shape: row i is the mixed stream after i of the T equal parts. Only the data differs.
Without a domain order, BWT, FWT and forgetting do not apply to it; its final ACC is the bound.
Cost: none beyond sequential's.
"""

from __future__ import annotations

from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy


def part_name(order: list[str], domain_idx: int) -> str:
    """Which part of the mixed stream stage `domain_idx` is, e.g. "joint part 1/3"."""
    return f"joint part {domain_idx + 1}/{len(order)}"


class Joint(CLStrategy):
    """Trains every stage on all domains' tasks mixed."""

    name = "joint"

    def training_domains(self, order: list[str], domain_idx: int) -> list[str]:
        return list(order)

    def stage_name(self, order: list[str], domain_idx: int) -> str:
        """Every stage trains on all of them: "airline+retail+telecom"."""
        return "+".join(order)

    def before_domain(self, ctx: CLContext, domain_idx: int, domain: str) -> None:
        sizes = {name: len(ctx.domains[name].train_tasks) for name in ctx.order}
        pool = ", ".join(f"{name} {n}" for name, n in sizes.items())
        if ctx.log is None:
            return
        ctx.log(
            {"pool_tasks": sum(sizes.values())},
            f"{part_name(ctx.order, domain_idx)}: warm start and GRPO steps draw from all domains' train "
            f"tasks mixed ({pool})",
        )
