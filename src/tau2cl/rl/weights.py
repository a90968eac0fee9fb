"""The policy's trained tensors by name: reading them, and copying a named set into a model."""

from __future__ import annotations

import torch

Weights = dict[str, torch.Tensor]


def trainable_weights(model: torch.nn.Module) -> Weights:
    """The model's trained parameters by name (LoRA: the adapters alone)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def copy_weights(targets: Weights, weights: Weights, what: str) -> None:
    """Copy each of `weights` into the target of the same name; the two must name the same tensors
    (`what` names the caller in the error)."""
    if set(weights) != set(targets):
        raise ValueError(f"{what} needs exactly the trainable parameters, by name")
    for name, value in weights.items():
        targets[name].copy_(value)
