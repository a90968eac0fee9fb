"""The policy's weights as the update trains them, and the copy that rollouts sample from.

In one process and under DDP the rollout model *is* the trained model: DDP only wraps it for the
update's forward and backward. Under FSDP2 the trained model is a sharded copy and the rollout
model is a full copy on every rank, refreshed from the shards after every optimizer step, so
evaluation, checkpoints and strategies always see the current weights. Rollouts never run
through a wrapper: ranks decode different numbers of tokens, so per-forward collectives (FSDP's
all-gathers) would not line up across ranks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tau2cl.distributed import (
    DistInfo,
    as_local_tensor,
    full_optimizer_state,
    load_full_optimizer_state,
    load_full_state_dict,
    wrap_data_parallel,
)
from tau2cl.rl.update import TrainedLogprobs
from tau2cl.rl.weights import copy_weights, trainable_weights

_LM = "lm."  # TrainedLogprobs keeps the causal LM under this name


class TrainingModel:
    """The module the update trains (`module`), its parameters, and the rollout model's sync."""

    def __init__(self, rollout_model: torch.nn.Module, info: DistInfo, parallelism: str):
        self.rollout_model = rollout_model
        self.sharded = info.is_distributed and parallelism == "fsdp"
        lm = copy.deepcopy(rollout_model) if self.sharded else rollout_model
        self.module = wrap_data_parallel(TrainedLogprobs(lm), info, parallelism)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.followers: list[Callable[[], None]] = []  # told whenever the rollout model's weights change

    def follow(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` after every change of the rollout model's weights: each optimizer step,
        each load (a resume, a strategy's edit) and each swap in or out of evaluation weights (a
        sampler that keeps its own copy of the weights, such as a vLLM engine, reloads them)."""
        self.followers.append(on_change)

    def _changed(self) -> None:
        for on_change in self.followers:
            on_change()

    @torch.no_grad()
    def refresh_rollout_model(self) -> None:
        """Copy the trained weights into the rollout model (all ranks; only sharded training keeps a
        separate copy), then tell the followers.

        One parameter at a time, so the gather never holds more than one full tensor beyond the
        rollout copy itself.
        """
        if self.sharded:
            targets = dict(self.rollout_model.named_parameters())
            for name, param in self.module.named_parameters():
                if param.requires_grad:  # frozen weights (a LoRA base) never change
                    targets[name.removeprefix(_LM)].copy_(as_local_tensor(param))
        self._changed()

    @contextlib.contextmanager
    def rollout_weights(self, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Inside: the rollout model's trainable parameters hold `weights` (by name; None: unchanged).

        For sampling only (evaluation): the trained copy is not told, and the previous values are
        copied back on leaving, bit for bit, so training continues from exactly where it was.
        """
        if weights is None:
            yield
            return
        params = trainable_weights(self.rollout_model)
        saved = {n: p.detach().clone() for n, p in params.items()}
        copy_weights(params, weights, "rollout_weights")
        self._changed()
        try:
            yield
        finally:
            copy_weights(params, saved, "rollout_weights")
            self._changed()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Make `weights` (the trainable parameters by name) the policy's: the rollout model's, then
        the trained copy's."""
        copy_weights(trainable_weights(self.rollout_model), weights, "load_weights")
        self.load_from_rollout_model()

    def load_from_rollout_model(self) -> None:
        """Take the rollout model's weights (e.g. just read from a checkpoint) into training."""
        if self.sharded:
            state = {_LM + k: v for k, v in self.rollout_model.state_dict().items()}
            load_full_state_dict(self.module, state)
        self._changed()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state to checkpoint, whole (sharded: a collective; rank 0 gets it)."""
        return full_optimizer_state(self.module, optimizer) if self.sharded else optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.sharded:
            load_full_optimizer_state(self.module, optimizer, state)
        else:
            optimizer.load_state_dict(state)
