"""Every torch.distributed call of tau2cl lives here, so the rest reads the same with 1 or N processes.

Rank, local rank and world size come from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE),
never from counting GPUs. A plain `python -m tau2cl.train` runs as one process with no group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def compute_init(timeout: timedelta | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if not launched_by_torchrun():
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            from tau2cl.errors import UserError

            raise UserError(
                f"process {local_rank} on this machine has no GPU: only {torch.cuda.device_count()} are "
                "visible; lower --nproc_per_node."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout or DEFAULT_TIMEOUT)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def compute_cleanup() -> None:
    """Tear down only what was set up."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (a one-element list without a group)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (returns the tensor)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max across ranks (returns the tensor)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_grads_(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients across ranks in place, once per optimizer step (not per micro-batch).

    A parameter without a gradient on this rank takes part with zeros, so every rank issues the
    same collectives in the same order whatever its batch held.
    """
    if not _active():
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world_size)
