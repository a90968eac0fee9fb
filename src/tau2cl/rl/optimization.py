"""The parts every optimizer step shares, supervised or GRPO: the batch draw, the token count that
normalises the loss, the micro-batch loop, and clip-then-step with a count of skipped updates.

Both the warm start (rl/sft.py) and the GRPO step take their batches, gradients and steps from here,
so the two read the same and a fix to one is a fix to both.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tau2cl.distributed import all_reduce_sum_, as_local_tensor, gradient_sync


def draw_shard(seed_key: str, pool: Sequence[int], per_rank: int, world: int, rank: int) -> list[int]:
    """This rank's disjoint shard of one draw of `per_rank * world` items from `pool`.

    Every rank draws the same sequence (the key alone seeds it, so a resumed run draws it again);
    items repeat only once the pool is used up.
    """
    rng = random.Random(seed_key)
    picks: list[int] = []
    while len(picks) < per_rank * world:
        picks += rng.sample(list(pool), min(len(pool), per_rank * world - len(picks)))
    return picks[rank * per_rank : (rank + 1) * per_rank]


def draw_from_passes(seed_key: str, pool: Sequence[int], step: int, per_rank: int, world: int, rank: int) -> list[int]:
    """This rank's shard of step `step` (1, 2, ...) of an endless stream of shuffled passes over
    `pool` (pass p shuffled by the key and p): by the end of every pass each item has been drawn
    equally often, so k steps draw any two items a number of times that differ by at most one.

    Every rank draws the same stream (the key alone seeds it, so a resumed run draws it again); an
    item repeats within a step only when the pool is smaller than the step or the step spans the
    end of a pass.
    """
    size, passes = per_rank * world, {}

    def item(i: int) -> int:
        index, offset = divmod(i, len(pool))
        if index not in passes:
            passes[index] = list(pool)
            random.Random(f"{seed_key}-pass-{index}").shuffle(passes[index])
        return passes[index][offset]

    first = (step - 1) * size
    picks = [item(i) for i in range(first, first + size)]
    return picks[rank * per_rank : (rank + 1) * per_rank]


def token_normalizer(num_tokens: int, world_size: int) -> float:
    """What each rank divides its token-sum loss by, so that the gradient averaged over ranks is the
    token mean over the whole global batch: global tokens / world size (at least 1 / world size)."""
    total = float(all_reduce_sum_(torch.tensor([num_tokens], dtype=torch.float64)).item())
    return max(total, 1.0) / world_size


LossOf = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


def accumulate(
    forward: torch.nn.Module,
    micro_batches: Sequence[Any],
    loss_of: LossOf,
    extra_loss: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> tuple[list[dict[str, float]], dict[str, float], float]:
    """Backward `loss_of(micro_batch)` for each micro-batch, gradients summed.

    A wrapped model (DDP/FSDP) syncs gradients on the last micro-batch only; `extra_loss` terms (a
    strategy's penalty) join the last micro-batch's loss once. Returns each micro-batch's
    statistics, the extra terms' values and the sum of the losses backpropagated.
    """
    stats: list[dict[str, float]] = []
    terms: dict[str, float] = {}
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with gradient_sync(forward, enabled=last):
            loss, mb_stats = loss_of(mb)
            if extra_loss is not None and last:
                for name, term in extra_loss().items():
                    loss = loss + term
                    terms[name] = float(term.detach())
            loss.backward()
        loss_sum += float(loss.detach())
        stats.append(mb_stats)
    return stats, terms, loss_sum


class ClippedStep:
    """Clip the gradient norm, step unless it is not finite, clear the gradients.

    One per run, shared by the warm start's optimizer and the GRPO one, so `skipped` counts every
    update the run skipped; it is checkpointed with the run.
    """

    def __init__(self, params: list[torch.Tensor], max_grad_norm: float):
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.skipped = 0

    def __call__(self, optimizer: torch.optim.Optimizer) -> float:
        """The gradient norm before clipping (inf or nan: the step was skipped)."""
        grad_norm = as_local_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            self.skipped += 1
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)
