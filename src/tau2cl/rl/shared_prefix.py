"""The update's forward with the batch's common prefix computed once.

In tau2 most of every row is the same: the system prompt, the domain policy and the tool schemas
(~5k tokens with Qwen's template) come before anything a row does differently. So the rows of a
micro-batch share a prefix of P tokens. The body runs that prefix once (batch 1, with gradients
when training) and keeps its keys and values; every row's suffix then runs on top of them, as
decoding does. Gradients flow through the shared keys and values back into the one prefix
forward, so they are the per-row computation's, summed over rows, up to floating-point order.

The suffix forward needs no attention mask: rows are right-padded, and under causal attention
no real token ever sees a pad after it.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

import torch

MIN_SHARED_PREFIX = 64  # shorter common prefixes are cheaper to recompute per row


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Tokens every row of (B, T) right-padded `input_ids` shares, leaving each row one of its own."""
    lengths = attention_mask.sum(dim=1)  # (B,)
    limit = int(lengths.min()) - 1
    if input_ids.shape[0] < 2 or limit <= 0:
        return 0
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(dim=0)  # (limit,)
    differ = (~same).nonzero()
    return int(differ[0]) if len(differ) else limit


def hidden_at(
    body: Any, input_ids: torch.Tensor, prefix: int, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """(N, H) final hidden states at (rows, positions) of the batch, the first `prefix` tokens run once.

    `positions` are the columns whose hidden states are wanted (the trained token's column - 1).
    """
    head, cache = run_prefix(body, input_ids[:1, :prefix])
    tail = run_after(body, cache, input_ids[:, prefix:], prefix)
    return pick_hidden(head, tail, prefix, rows, positions)


def run_prefix(body: Any, prefix_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The (1, P, H) final hidden states of a (1, P) prefix and the cache of its keys and values."""
    from transformers import DynamicCache

    cache = DynamicCache()
    head = body(input_ids=prefix_ids, use_cache=True, **{_cache_kwarg(type(body)): cache}).last_hidden_state
    return head, cache


def run_after(body: Any, cache: Any, suffix_ids: torch.Tensor, start: int) -> torch.Tensor:
    """(B, S, H) final hidden states of (B, S) rows that follow the prefix held in `cache`.

    The prefix's keys and values are shared by every row (expanded, not copied); `cache` itself is
    left as it was, so several calls can follow the same prefix.
    """
    batch, width = suffix_ids.shape
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]  # a layer's update rebinds, never writes
    for layer in view.layers:
        layer.keys = layer.keys.expand(batch, -1, -1, -1)
        layer.values = layer.values.expand(batch, -1, -1, -1)
    columns = torch.arange(start, start + width, device=suffix_ids.device)
    return body(
        input_ids=suffix_ids, use_cache=True, **{_cache_kwarg(type(body)): view},
        position_ids=columns[None, :].expand(batch, -1),
    ).last_hidden_state


def pick_hidden(head: torch.Tensor, tail: torch.Tensor, prefix: int, rows: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """(N, H) hidden states at (rows, positions): the prefix's where a position is in it, else the row's."""
    in_prefix = (positions < prefix)[:, None]  # (N, 1)
    from_head = head[0, positions.clamp(max=prefix - 1)]  # (N, H)
    from_tail = tail[rows, (positions - prefix).clamp(min=0)]  # (N, H)
    return torch.where(in_prefix, from_head, from_tail)


def usable(model: Any) -> bool:
    """Whether the body keeps a cache in this mode (gradient checkpointing turns caches off)."""
    return not (model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))


@functools.cache
def _cache_kwarg(body_class: type) -> str:
    """transformers renamed `past_key_values` to `cache`; pass whichever this body takes."""
    return "cache" if "cache" in inspect.signature(body_class.forward).parameters else "past_key_values"
