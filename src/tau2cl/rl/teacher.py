"""Log-probs under a frozen teacher kept as a copy of the policy's trainable tensors.

A teacher that differs from the policy only in its trainable parameters (the policy at an
earlier moment: all the weights in full fine-tuning, the adapters alone with LoRA) needs no
second model. Its tensors are exchanged with the policy's in place, the batch is scored, and
they are exchanged back. The exchanges are exact copies, so the policy comes back bit for bit
and the teacher's tensors stay the teacher's; the memory it costs is its own copy plus one
tensor at a time during an exchange.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

Weights = dict[str, torch.Tensor]


@contextlib.contextmanager
def weights_in_place(model: torch.nn.Module, weights: Weights) -> Iterator[torch.nn.Module]:
    """Inside the context `model` holds `weights` (by parameter name) and is in eval mode.

    `weights` must name parameters of `model` with their shapes and dtypes; on leaving, the
    model's own tensors and mode are back and `weights` holds what it held before.
    """
    params = dict(model.named_parameters())
    for name, value in weights.items():
        own = params.get(name)
        if own is None or own.shape != value.shape or own.dtype != value.dtype:
            raise ValueError(f"teacher tensor {name!r} does not match a parameter of the model")
    chosen = {name: params[name] for name in weights}
    was_training = model.training
    _exchange(chosen, weights)
    model.eval()  # a frozen teacher is deterministic: no dropout
    try:
        yield model
    finally:
        _exchange(chosen, weights)
        model.train(was_training)


@torch.no_grad()
def _exchange(params: Weights, weights: Weights) -> None:
    """Swap the contents of each parameter with its tensor in `weights`, one tensor at a time."""
    for name, param in params.items():
        held = param.detach().clone()
        param.copy_(weights[name])
        weights[name].copy_(held)

