"""Every torch.distributed call of tau2cl lives here, so the rest reads the same with 1 or N processes.

Rank, local rank and world size come from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE),
never from counting GPUs. A plain `python -m tau2cl.train` runs as one process with no group.
Besides the collectives, this module wraps a module for data-parallel training (DDP or FSDP2's
`fully_shard`), switches gradient synchronisation per micro-batch, and moves full state dicts in
and out of a sharded module.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
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


_STARTED: list[Any] = []  # the process group compute_init started, if any


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
        _STARTED.append(dist.group.WORLD)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def compute_cleanup() -> None:
    """Tear down only what compute_init set up (an in-process vLLM engine may hold a group of its own)."""
    if _STARTED and dist.is_initialized():
        dist.destroy_process_group()
    _STARTED.clear()


@contextlib.contextmanager
def own_group_kept() -> Iterator[None]:
    """Inside, a teardown that destroys the default process group leaves it alone when it is the one
    compute_init started (the ranks' own, which an in-process vLLM engine joins under torchrun and
    destroys in its shutdown); every other group is destroyed as usual."""
    if not _STARTED:
        yield
        return
    destroy = dist.destroy_process_group

    def destroy_others(group: Any = None) -> None:
        if group is not None and group is not dist.group.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_others
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def group_rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of ranks in the default process group ((0, 1) without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (a one-element list without a group)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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


# ----------------------------------------------------------------------------- data parallel


def wrap_data_parallel(module: torch.nn.Module, info: DistInfo, parallelism: str) -> torch.nn.Module:
    """`module` ready for data-parallel training; unchanged in a single process.

    ddp: DistributedDataParallel, which averages gradients across ranks during the backward of
    the last micro-batch (buffers are not broadcast: the model's only buffers are constants).
    fsdp: FSDP2, each of the model's repeated blocks (its `_no_split_modules`, e.g. the decoder
    layers) and then the root get `fully_shard`, so a rank keeps 1/N of the parameters,
    gradients and optimizer state and gathers a block's weights only while it runs.
    """
    if not info.is_distributed:
        return module
    if parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in _repeated_blocks(module):
            fully_shard(block, mesh=mesh)
        return fully_shard(module, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # newer torch names the switch forward_sync_buffers (buffers are still synced once at init)
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=device_ids, **no_sync)


def _repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model (the classes it names as unsplittable)."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    return [sub for sub in module.modules() if type(sub).__name__ in names]


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Forward + backward inside this context synchronise gradients across ranks only if `enabled`.

    Gradient accumulation syncs on the last micro-batch alone: DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`; a module that is not wrapped needs nothing.
    """
    if is_sharded(module):
        module.set_requires_gradient_sync(enabled)
        yield
        module.set_requires_gradient_sync(True)
    elif not enabled and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def as_local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. the total norm of sharded gradients); others unchanged."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard full tensors (present on every rank) into a sharded module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A sharded module's optimizer state, whole, on rank 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(module, optimizer, options=options)


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a whole optimizer state (read by every rank) into a sharded module's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)
