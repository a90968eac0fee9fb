"""Small helpers shared by sampling and the update: the autocast context of a forward pass, and the
longest prompt prefix a batch of token sequences shares."""

from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 compute over fp32 master weights; a no-op context for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one of its own."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n
