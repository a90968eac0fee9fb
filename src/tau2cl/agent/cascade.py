"""Cascade attention: each shared prompt prefix attended once for all its rows, not once per row.

Every row of a sampling batch starts with its domain's system prompt and tool block (thousands of
tokens), the same for all the domain's rows. Stored once per row, its keys and values are copied
into every row and read by every row at every decode step. Here the batch's cache holds only each
row's tokens after its prefix, and each prefix's keys and values are kept once, (1, kv_heads, P,
head_dim) per layer; one batch may mix rows of several prefixes (domains). Attention is split in
two and merged exactly: the queries of all rows of a prefix against that prefix in one matrix
product (every query sees the whole prefix, which comes before all of its row's tokens), each
row's queries against its own tokens (causal and padding mask as the model builds it), and the
two softmax parts combined by their maxima and sums (the log-sum-exp merge): the same attention
as over the concatenated keys, up to floating-point rounding.

While a batch samples, the model's attention implementation is this module's (registered with
transformers under `NAME`, its mask built as for SDPA); outside `active` it is the model's own
again, and any call without a prefix goes to SDPA unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tau2cl.agent.kv_cache import Prefix

NAME = "tau2cl_cascade"
MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama"})  # attention through transformers' interface, RoPE in the keys
MAX_SCORES = 1 << 22  # prefix scores computed at once off the CPU kernel: 16 MB in fp32 (queries in chunks)


@dataclass(eq=False)
class Shared:
    """The prefixes a batch attends once, and which of them each row of the model's next call follows."""

    prefixes: list[Prefix]
    of_row: list[int]  # index into `prefixes` of every row of the caller's batch
    batch_rows: list[int] = field(default_factory=list)  # the caller's rows in the model's next call, in order
    _spans: list[tuple[int, slice | torch.Tensor]] | None = None

    @classmethod
    def of(cls, row_prefixes: list[Prefix]) -> Shared:
        """The distinct prefixes (by identity) of a batch's rows, in order of first appearance."""
        prefixes: list[Prefix] = []
        of_row = []
        for prefix in row_prefixes:
            index = next((i for i, p in enumerate(prefixes) if p is prefix), len(prefixes))
            if index == len(prefixes):
                prefixes.append(prefix)
            of_row.append(index)
        return cls(prefixes, of_row, list(range(len(of_row))))

    def select(self, batch_rows: list[int]) -> None:
        """The caller's rows that the model's next call runs, in its batch order."""
        self.batch_rows = list(batch_rows)
        self._spans = None

    def spans(self, device: torch.device) -> list[tuple[int, slice | torch.Tensor]]:
        """(prefix index, the call's batch rows that follow it): a slice where they are contiguous."""
        if self._spans is None:
            groups: dict[int, list[int]] = {}
            for j, row in enumerate(self.batch_rows):
                groups.setdefault(self.of_row[row], []).append(j)
            self._spans = [(i, _rows_index(js, device)) for i, js in groups.items()]
        return self._spans


def _rows_index(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


_SHARED: ContextVar[Shared | None] = ContextVar("tau2cl_cascade_shared", default=None)


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
def active(model: Any, row_prefixes: list[Prefix]) -> Iterator[Shared]:
    """Within this block, every attention of `model` also attends to each row's prefix (held outside
    its cache); the caller says through the yielded `Shared.select` which rows each call runs."""
    _register()
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = NAME
    shared = Shared.of(row_prefixes)
    token = _SHARED.set(shared)
    try:
        yield shared
    finally:
        _SHARED.reset(token)
        config._attn_implementation = saved


def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (B, H, M, D) queries, (B, kv_heads, S, D) keys and values
    of the rows' own tokens; returns (B, M, H, D) as SDPA's wrapper does."""
    shared = _SHARED.get()
    if shared is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, m, dim = query.shape
    groups = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    dtype = torch.promote_types(query.dtype, torch.float32)  # fp32 at least: half types go through fp32
    q = query.to(dtype).reshape(batch, groups, heads // groups, m, dim)  # head h reads kv head h // (heads // groups)
    parts = [_prefix_parts(q, shared, module.layer_idx, scale),
             _own_part(q, key.to(dtype), value.to(dtype), attention_mask, scale)]
    out = merge_parts(parts)  # (B, G, R, M, D)
    return out.reshape(batch, heads, m, dim).transpose(1, 2).contiguous().to(query.dtype), None


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over disjoint key sets, each (normalised output, log-sum-exp of its scores), merged.

    A part whose query saw none of its keys (log-sum-exp -inf) weighs 0.
    """
    total = parts[0][1]
    for _, lse in parts[1:]:
        total = torch.logaddexp(total, lse)
    out = 0
    for o, lse in parts:
        out = out + torch.where(torch.isneginf(lse), 0.0, o * torch.exp(lse - total))
    return out


def _prefix_parts(q: torch.Tensor, shared: Shared, layer: int, scale: float):
    """Every row's queries (B, G, R, M, D) against its own prefix's keys of this layer."""
    spans = shared.spans(q.device)
    if len(spans) != 1 and q.shape[0] != len(shared.batch_rows):
        raise RuntimeError(f"cascade: a call of {q.shape[0]} rows, {len(shared.batch_rows)} selected")

    def part(index: int, rows_q: torch.Tensor):
        keys, values = shared.prefixes[index].layers[layer]
        return _prefix_part(rows_q, keys[0].to(q.dtype), values[0].to(q.dtype), scale)

    if len(spans) == 1:
        return part(spans[0][0], q)
    out = q.new_empty(q.shape)
    lse = q.new_empty((*q.shape[:-1], 1))
    for index, rows in spans:
        out[rows], lse[rows] = part(index, q[rows])
    return out, lse


def _prefix_part(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """Every query of every row against the shared keys (G, P, D), as one sequence of queries per kv head."""
    batch, groups, reps, m, dim = q.shape
    flat = q.permute(1, 0, 2, 3, 4).reshape(1, groups, batch * reps * m, dim)  # (1, G, N, D)
    if q.device.type == "cpu" and _FUSED_CPU is not None:  # one fused kernel: no (N, P) scores in memory
        out, lse = _FUSED_CPU(flat, keys[None], values[None], scale=scale)
        out, lse = out[0], lse[0, ..., None]
    else:
        out, lse = _chunked(flat[0], keys, values, scale)

    def rows(t: torch.Tensor) -> torch.Tensor:  # (G, N, X) -> (B, G, R, M, X)
        return t.reshape(groups, batch, reps, m, -1).permute(1, 0, 2, 3, 4)

    return rows(out), rows(lse)


def _chunked(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """(G, N, D) queries against (G, P, D) keys, N in chunks: (normalised output, log-sum-exp)."""
    chunk = max(1, MAX_SCORES // max(1, q.shape[0] * keys.shape[1]))
    outs, lses = [], []
    for start in range(0, q.shape[1], chunk):
        scores = torch.matmul(q[:, start : start + chunk] * scale, keys.transpose(-1, -2))  # (G, n, P)
        lse = torch.logsumexp(scores, -1, keepdim=True)
        outs.append(torch.matmul(scores.sub_(lse).exp_(), values))
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _own_part(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """Each row's queries (B, G, R, M, D) against its own keys (B, G, S, D), masked as the model asks."""
    if q.shape[3] == 1 and q.device.type == "cpu" and _FUSED_CPU is not None:  # decoding: one fused kernel
        return _own_decode(q, keys, values, mask, scale)
    scores = torch.matmul(q * scale, keys[:, :, None].transpose(-1, -2))  # (B, G, R, M, S)
    m, s = q.shape[3], keys.shape[2]
    if mask is None and m > 1:  # no padding: causal, the queries being the last M keys
        mask = torch.ones(m, s, dtype=torch.bool, device=q.device).tril(s - m)[None, None]
    if mask is not None:
        mask = mask[:, :, None]  # (B|1, 1, 1, M, S): the same for every head
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    # a padding query (left of a row's block) may see none of its row's keys: lse -inf, weight 0
    lse = torch.logsumexp(scores, -1, keepdim=True)
    weights = scores.sub_(torch.where(torch.isneginf(lse), 0.0, lse)).exp_()
    return torch.matmul(weights, values[:, :, None]), lse


def _own_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """One query per row: a kv head's R query heads go as R query positions, all under the row's mask."""
    batch, groups, reps, _, dim = q.shape
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        mask = mask.to(q.dtype)
    out, lse = _FUSED_CPU(q[:, :, :, 0], keys, values, attn_mask=mask, scale=scale)  # mask (B, 1, 1, S)
    return out[:, :, :, None], lse[..., None, None]


_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
