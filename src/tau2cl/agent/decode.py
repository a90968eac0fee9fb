"""Batched sampling over right-aligned KV caches: prefill by buckets, decode with a shrinking batch.

Each row starts from the keys and values it already has (its episode's cache from the previous
turn, or the batch's shared prompt prefix) and prefills only the rest of its prompt. Rows are
right-aligned ([pad | row], no padding inside a row; no attention mask when the rows have equal
lengths). Rows whose new-token counts differ a lot are prefilled in separate buckets; within a
bucket, a row with fewer new tokens than the bucket's widest recomputes a few of its cached
tokens instead of being padded in the middle. Decoding reads the sampled tokens back every
`STOP_CHECK_EVERY` tokens (not every token), and rows that have stopped leave the batch then.

When every row starts from a shared prompt prefix (its domain's, keys and values held once), the
batch's cache holds only the rows' tokens after their prefixes and each prefix is attended once
for all its rows (cascade.py), so one batch mixes domains without copying any prefix; otherwise
each row's prefix is copied in front of its own keys.

The log-prob of every sampled token is taken from the same temperature-scaled distribution the
GRPO update recomputes (`grpo.token_logprobs`), without keeping (steps, batch, vocab) logits.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from tau2cl.agent import cascade
from tau2cl.agent.kv_cache import (
    KVSlot,
    LayerKV,
    Prefix,
    assemble,
    empty_cache,
    row_layers,
    select_rows,
    trim_left,
)

STOP_CHECK_EVERY = 8  # decode steps between reading sampled tokens back to the host
PREFILL_WASTE = 1.5  # a prefill bucket computes at most this many times its rows' new tokens
PREFILL_SLACK = 64  # ... or this many tokens per row more, whichever is larger


@dataclass
class Generation:
    """One sampled assistant turn."""

    token_ids: list[int]  # (n,) sampled ids, ending with a stop token when `finished`
    logprobs: list[float]  # (n,) log-prob of each sampled id under the sampling distribution
    finished: bool  # ended with a stop token (False: cut by max_new_tokens)


@dataclass
class Row:
    """A prompt to continue, the keys and values already at hand for its first `cached` tokens."""

    prompt: list[int]
    cached: int
    layers: list[LayerKV]  # (1, H, >= cached - P, D) per layer: the cached tokens after the prefix (P tokens)
    slot: KVSlot | None = None  # where the row's cache goes after sampling (None: dropped)
    prefix: Prefix | None = None  # shared keys and values of the prompt's first P tokens (P <= cached)

    @property
    def new_tokens(self) -> int:
        return len(self.prompt) - self.cached


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    stop_ids: list[int]
    pad_id: int
    cascade: bool = True  # attend a prefix shared by every row once for the batch (cascade.py)


def cache_kwarg(model: Any) -> str:
    """transformers renamed `past_key_values` to `cache`; pass whichever this model takes."""
    return "cache" if "cache" in forward_parameters(type(model)) else "past_key_values"


def last_logits_kwargs(model: Any) -> dict[str, int]:
    """Ask for the last position's logits only, where the model supports it.

    A prefill projects every prompt position to the vocabulary otherwise: with Qwen's 151,936-token
    vocabulary that is ~0.6 MB per position in fp32, gigabytes for a batch of long prompts.
    """
    return {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(type(model)) else {}


@functools.cache
def forward_parameters(model_class: type) -> frozenset[str]:
    """The keyword names a model class's forward takes (read once per class, not per call)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) and their log-probs (B,) under softmax(logits / T) (T = 1 when greedy)."""
    logits = logits.float()  # (B, V)
    if temperature <= 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def prefill_buckets(new_tokens: list[int]) -> list[list[int]]:
    """Row indices grouped so a bucket's width (its most new tokens) x rows stays near their sum.

    Rows sorted by new-token count; a row joins the current bucket while the bucket's padded
    work, rows x widest, stays within PREFILL_WASTE x its real work (or PREFILL_SLACK per row).
    """
    order = sorted(range(len(new_tokens)), key=lambda i: (new_tokens[i], i))
    buckets: list[list[int]] = []
    total = 0
    for i in order:
        if buckets:
            rows = len(buckets[-1]) + 1
            padded = rows * new_tokens[i]  # sorted: this row is the widest so far
            if padded <= max(PREFILL_WASTE * (total + new_tokens[i]), total + new_tokens[i] + PREFILL_SLACK * rows):
                buckets[-1].append(i)
                total += new_tokens[i]
                continue
        buckets.append([i])
        total = new_tokens[i]
    return buckets


@dataclass
class _Batch:
    """The decode state: a right-aligned cache and what each of its rows needs."""

    cache: Any
    pads: list[int]  # left padding of each row
    mask: torch.Tensor | None  # (B, capacity) 1 on real columns; None when no row is padded
    positions: torch.Tensor  # (B, 1) position of each row's next fed token
    logits: torch.Tensor  # (B, V) logits of each row's next token
    rows: list[int]  # the caller's row index of each batch row

    @property
    def width(self) -> int:
        return self.cache.layers[0].length


def _right_aligned_mask(pads: list[int], capacity: int, device: torch.device) -> torch.Tensor | None:
    if not any(pads):
        return None
    pads_t = torch.tensor(pads, device=device)[:, None]
    return (torch.arange(capacity, device=device)[None, :] >= pads_t).long()  # (B, capacity)


def _run_bucket(model: Any, rows: list[Row], extra: int, device: torch.device, pad_id: int,
                offsets: list[int]) -> _Batch:
    """Prefill rows together: [pad | cached tokens | block of the last M tokens of every row].

    `offsets`: each row's tokens before it that the cache does not hold (its cascade prefix).
    """
    lengths = [len(r.prompt) for r in rows]
    width = max(lengths)
    block = max(r.new_tokens for r in rows)  # M
    kept = [max(0, n - block) for n in lengths]  # cached tokens each row keeps before the block
    capacity = width + extra
    cache = assemble([(r.layers, k) for r, k in zip(rows, kept, strict=True)], width - block, capacity)
    if cache is None:
        cache = empty_cache(model.config.get_text_config().num_hidden_layers, capacity)
    ids = torch.full((len(rows), block), pad_id, dtype=torch.long)
    for i, (row, k) in enumerate(zip(rows, kept, strict=True)):
        tail = row.prompt[k:]
        ids[i, block - len(tail) :] = torch.tensor(tail, dtype=torch.long)
    pads = [width - n for n in lengths]
    columns = torch.arange(width - block, width)[None, :]  # (1, M)
    offset = torch.tensor(offsets)[:, None]
    positions = (columns - torch.tensor(pads)[:, None]).clamp(min=0) + offset  # (B, M)
    mask = _right_aligned_mask(pads, capacity, device)
    out = model(
        input_ids=ids.to(device),
        attention_mask=None if mask is None else mask[:, :width],
        position_ids=positions.to(device),
        use_cache=True,
        **{cache_kwarg(model): cache},
        **last_logits_kwargs(model),
    )
    last = (torch.tensor(lengths)[:, None] + offset).to(device)
    return _Batch(cache, pads, mask, last, out.logits[:, -1].float(), list(range(len(rows))))


def prefill(model: Any, rows: list[Row], extra: int, device: torch.device, pad_id: int, offsets: list[int],
            shared: cascade.Shared | None) -> _Batch:
    """One decode batch of all rows, each prefilled from what it has cached.

    `offsets`: each row's tokens before it that the cache does not hold; `shared`: the cascade's
    prefixes (None without cascade attention), told which rows each bucket runs.
    """
    buckets = prefill_buckets([r.new_tokens for r in rows])
    if len(buckets) == 1:
        if shared is not None:
            shared.select(list(range(len(rows))))
        return _run_bucket(model, rows, extra, device, pad_id, offsets)
    parts: dict[int, tuple[list[LayerKV], torch.Tensor]] = {}
    for bucket in buckets:
        if shared is not None:
            shared.select(bucket)
        batch = _run_bucket(model, [rows[i] for i in bucket], 0, device, pad_id, [offsets[i] for i in bucket])
        for j, i in enumerate(bucket):
            parts[i] = (row_layers(batch.cache, j, batch.pads[j], batch.width, copy=False), batch.logits[j])
    lengths = [len(r.prompt) for r in rows]
    width = max(lengths)
    cache = assemble([(parts[i][0], lengths[i]) for i in range(len(rows))], width, width + extra)
    pads = [width - n for n in lengths]
    logits = torch.stack([parts[i][1] for i in range(len(rows))])
    positions = (torch.tensor(lengths)[:, None] + torch.tensor(offsets)[:, None]).to(device)
    return _Batch(cache, pads, _right_aligned_mask(pads, width + extra, device), positions, logits, list(range(len(rows))))


def sample_batch(model: Any, rows: list[Row], sampling: Sampling, device: torch.device) -> list[Generation]:
    """Sample one turn per row; rows with a slot get their cache (prompt + turn, last token aside)."""
    # measured on CPUs only: elsewhere the prefix is copied into every row and attended by SDPA, as before
    use = sampling.cascade and torch.device(device).type == "cpu" and cascade.supported(model)
    if not (use and all(r.prefix is not None for r in rows)):
        return _sample(model, [_whole(r) for r in rows], sampling, device, [None] * len(rows))
    # the batch's cache holds each row's tokens after its prefix; each prefix is attended once
    prefixes = [r.prefix for r in rows]
    own = [Row(r.prompt[r.prefix.length :], r.cached - r.prefix.length, r.layers, r.slot) for r in rows]
    for row in rows:  # only `own` holds the cached keys and values now (freed once in the batch)
        row.layers = []
    with cascade.active(model, prefixes) as shared:
        return _sample(model, own, sampling, device, prefixes, shared)


def _whole(row: Row) -> Row:
    """The row with its prefix's keys and values in front of its own (for a batch without a shared prefix)."""
    if row.prefix is None:
        return row
    p = row.prefix.length
    if row.cached == p:
        return Row(row.prompt, row.cached, row.prefix.layers, row.slot)
    layers = [(torch.cat([pk, k[:, :, : row.cached - p]], dim=2), torch.cat([pv, v[:, :, : row.cached - p]], dim=2))
              for (pk, pv), (k, v) in zip(row.prefix.layers, row.layers, strict=True)]
    return Row(row.prompt, row.cached, layers, row.slot)


def _sample(model: Any, rows: list[Row], sampling: Sampling, device: torch.device, prefixes: list[Prefix | None],
            shared: cascade.Shared | None = None) -> list[Generation]:
    """The decode loop over rows whose caches (and prompts) start after their `prefixes` (None: at the start)."""
    s = sampling
    offsets = [0 if p is None else p.length for p in prefixes]
    batch = prefill(model, rows, s.max_new_tokens, device, s.pad_id, offsets, shared)
    if shared is not None:
        shared.select(batch.rows)
    for row in rows:  # their keys and values are in the batch now
        row.layers = []
        if row.slot is not None:
            row.slot.clear()
    stops = set(s.stop_ids)
    tokens: list[list[int]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    finished = [False] * len(rows)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    kw = cache_kwarg(model)
    for step in range(s.max_new_tokens):
        tok, lp = sample_tokens(batch.logits, s.temperature, s.top_p, s.generator)
        pending.append((tok, lp))
        last = step + 1 == s.max_new_tokens
        if last or (step + 1) % STOP_CHECK_EVERY == 0:
            done = _read_back(pending, batch.rows, tokens, logprobs, finished, stops)
            pending = []
            leaving = list(range(len(batch.rows))) if last else done
            _save_slots(batch, leaving, rows, tokens, prefixes)
            if last or len(leaving) == len(batch.rows):
                break
            if leaving:
                keep = [j for j in range(len(batch.rows)) if j not in set(leaving)]
                batch = _keep_rows(batch, keep)
                tok = tok[torch.tensor(keep, device=device)]
                if shared is not None:
                    shared.select(batch.rows)
        width = batch.width
        out = model(
            input_ids=tok[:, None],
            attention_mask=None if batch.mask is None else batch.mask[:, : width + 1],
            position_ids=batch.positions,
            use_cache=True,
            **{kw: batch.cache},
        )
        batch.logits = out.logits[:, -1].float()
        batch.positions = batch.positions + 1
    return [Generation(t, lp, f) for t, lp, f in zip(tokens, logprobs, finished, strict=True)]


def _read_back(pending, batch_rows, tokens, logprobs, finished, stops) -> list[int]:
    """Append the pending samples to each row (cut after a stop token); batch rows that stopped."""
    toks = torch.stack([t for t, _ in pending], dim=1).tolist()  # (B, k): one host sync
    lps = torch.stack([lp for _, lp in pending], dim=1).tolist()
    done = []
    for j, row in enumerate(batch_rows):
        for t, lp in zip(toks[j], lps[j], strict=True):
            tokens[row].append(t)
            logprobs[row].append(lp)
            if t in stops:
                finished[row] = True
                done.append(j)
                break
    return done


def _save_slots(batch: _Batch, leaving: list[int], rows: list[Row], tokens: list[list[int]],
                prefixes: list[Prefix | None]) -> None:
    """Copy the cache of rows leaving the batch into their slots: prompt + turn, last token aside.

    Rows after a shared prefix keep referring to it and store only their own tokens.
    """
    for j in leaving:
        row = rows[batch.rows[j]]
        if row.slot is None:
            continue
        prefix = prefixes[batch.rows[j]]
        ids = row.prompt + tokens[batch.rows[j]][:-1]
        start = batch.pads[j]
        layers = row_layers(batch.cache, j, start, start + len(ids), copy=True)
        row.slot.store(ids if prefix is None else prefix.ids + ids, layers, prefix)


def _keep_rows(batch: _Batch, keep: list[int]) -> _Batch:
    """The batch without its finished rows; left columns that are padding in every row are dropped."""
    pads = [batch.pads[j] for j in keep]
    index = torch.tensor(keep, device=batch.positions.device)
    select_rows(batch.cache, index)
    drop = min(pads)
    if drop:
        trim_left(batch.cache, drop)
    pads = [p - drop for p in pads]
    mask = None
    if any(pads):
        mask = batch.mask[index][:, drop:]
    return _Batch(batch.cache, pads, mask, batch.positions[index], batch.logits[index], [batch.rows[j] for j in keep])
