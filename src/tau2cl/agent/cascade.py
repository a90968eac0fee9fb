"""Cascade attention: the batch's shared prompt prefix attended once for all rows, not once per row.

Every row of a sampling batch starts with the same system prompt and tool block (thousands of
tokens). Stored once per row, its keys and values are copied into every row and read by every
row at every decode step. Here the batch's cache holds only each row's tokens after that prefix,
and the prefix's keys and values are kept once, (1, kv_heads, P, head_dim) per layer. Attention
is split in two and merged exactly: all rows' queries against the prefix in one matrix product
(every query sees the whole prefix, which comes before all of its row's tokens), each row's
queries against its own tokens (causal and padding mask as the model builds it), and the two
softmax parts combined by their maxima and sums (the log-sum-exp merge): the same attention as
over the concatenated keys, up to floating-point rounding.

While a batch samples, the model's attention implementation is this module's (registered with
transformers under `NAME`, its mask built as for SDPA); outside `active` it is the model's own
again, and any call without a prefix goes to SDPA unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tau2cl.agent.kv_cache import LayerKV, Prefix

NAME = "tau2cl_cascade"
MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama"})  # attention through transformers' interface, RoPE in the keys
MAX_SCORES = 1 << 22  # prefix scores computed at once: 16 MB in fp32 (prefill queries go in chunks)


_PREFIX: ContextVar[list[LayerKV] | None] = ContextVar("tau2cl_cascade_prefix", default=None)


def _register() -> None:
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def supported(model: Any) -> bool:
    """Whether the model's attention can be split this way: full causal attention in every layer."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (
        getattr(config, "model_type", None) in MODEL_TYPES
        and config._attn_implementation in ("sdpa", "eager")
        and not getattr(config, "use_sliding_window", False)
        and all(t == "full_attention" for t in layer_types)
    )


@contextlib.contextmanager
def active(model: Any, prefix: Prefix) -> Iterator[None]:
    """Within this block, every attention of `model` also attends to `prefix` (held outside its cache)."""
    _register()
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = NAME
    token = _PREFIX.set(prefix.layers)
    try:
        yield
    finally:
        _PREFIX.reset(token)
        config._attn_implementation = saved


def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (B, H, M, D) queries, (B, kv_heads, S, D) keys and values
    of the rows' own tokens; returns (B, M, H, D) as SDPA's wrapper does."""
    prefix = _PREFIX.get()
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    prefix_k, prefix_v = prefix[module.layer_idx]
    batch, heads, m, dim = query.shape
    groups = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    dtype = torch.promote_types(query.dtype, torch.float32)  # fp32 at least: half types go through fp32
    q = query.to(dtype).reshape(batch, groups, heads // groups, m, dim)  # head h reads kv head h // (heads // groups)
    parts = [_prefix_part(q, prefix_k[0].to(dtype), prefix_v[0].to(dtype), scale),
             _own_part(q, key.to(dtype), value.to(dtype), attention_mask, scale)]
    out = merge_parts(parts)  # (B, G, R, M, D)
    return out.reshape(batch, heads, m, dim).transpose(1, 2).contiguous().to(query.dtype), None


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax-weighted outputs of disjoint key sets, each (unnormalised output, max, sum), merged."""
    top = parts[0][1]
    for _, mx, _ in parts[1:]:
        top = torch.maximum(top, mx)
    num = sum(o * torch.exp(mx - top) for o, mx, _ in parts)
    den = sum(s * torch.exp(mx - top) for _, mx, s in parts)
    return num / den


def _prefix_part(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """Every query of every row against the shared keys (G, P, D): one product per chunk of queries."""
    batch, groups, reps, m, dim = q.shape
    flat = q.permute(1, 0, 2, 3, 4).reshape(groups, batch * reps * m, dim)  # (G, N, D)
    chunk = max(1, MAX_SCORES // max(1, groups * keys.shape[1]))
    outs, maxes, sums = [], [], []
    for start in range(0, flat.shape[1], chunk):
        scores = torch.matmul(flat[:, start : start + chunk], keys.transpose(-1, -2)) * scale  # (G, n, P)
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - top)
        sums.append(weights.sum(-1, keepdim=True))
        maxes.append(top)
        outs.append(torch.matmul(weights, values))

    def rows(parts: list[torch.Tensor]) -> torch.Tensor:  # (G, N, X) -> (B, G, R, M, X)
        joined = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return joined.reshape(groups, batch, reps, m, -1).permute(1, 0, 2, 3, 4)

    return rows(outs), rows(maxes), rows(sums)


def _own_part(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """Each row's queries (B, G, R, M, D) against its own keys (B, G, S, D), masked as the model asks."""
    scores = torch.matmul(q, keys[:, :, None].transpose(-1, -2)) * scale  # (B, G, R, M, S)
    m, s = q.shape[3], keys.shape[2]
    if mask is None and m > 1:  # no padding: causal, the queries being the last M keys
        mask = torch.ones(m, s, dtype=torch.bool, device=q.device).tril(s - m)[None, None]
    if mask is not None:
        mask = mask[:, :, None]  # (B|1, 1, 1, M, S): the same for every head
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    top = scores.amax(-1, keepdim=True)
    # a padding query (left of a row's block) may see none of its row's keys: it gets the prefix alone
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weights = torch.exp(scores - top)
    return torch.matmul(weights, values[:, :, None]), top, weights.sum(-1, keepdim=True)
