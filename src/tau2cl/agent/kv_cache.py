"""KV caches for batched sampling: an episode's cache across turns, and right-aligned batches.

Layout: a batch's rows are right-aligned, [pad | row], so every row's tokens are contiguous and
the only padding is on the left (none at all when the rows have equal lengths, and then no
attention mask is needed). The cache grows in place in a buffer sized for the whole call, instead
of a `torch.cat` per token and layer, and rows can leave the batch (`select`).

An episode's `KVSlot` holds the keys and values of the first `len(slot.ids)` tokens of its
context, copied out of the batch buffer so that a finished batch frees its memory; a slot is
emptied when its episode ends. Where the batch attended to a shared prompt prefix held once
(cascade.py), the slot refers to that prefix and holds only the tokens after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (1, kv_heads, n, head_dim) each


@dataclass(eq=False)
class Prefix:
    """A prompt prefix shared by rows: its ids and its keys and values (1, kv_heads, P, head_dim) per layer."""

    ids: list[int]
    layers: list[LayerKV]

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class KVSlot:
    """One episode's cache across its turns: the keys and values of the context `ids`.

    With a `prefix` (shared with other episodes, held once), `layers` hold the tokens after it.
    """

    ids: list[int] = field(default_factory=list)
    layers: list[LayerKV] = field(default_factory=list)
    prefix: Prefix | None = None

    def covers(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` this slot holds (0 unless it is a strict prefix)."""
        n = len(self.ids)
        return n if 0 < n < len(prompt) and prompt[:n] == self.ids else 0

    def store(self, ids: list[int], layers: list[LayerKV], prefix: Prefix | None = None) -> None:
        self.ids, self.layers, self.prefix = ids, layers, prefix

    def clear(self) -> None:
        self.ids, self.layers, self.prefix = [], [], None

    @property
    def num_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class GrowingLayer(DynamicLayer):
    """A layer cache in a preallocated (B, H, capacity, D) buffer, filled up to `length` columns."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, length: int, capacity: int):
        super().__init__()
        self.buffer_k, self.buffer_v = keys, values
        self.length, self.capacity = length, capacity
        self.is_initialized = keys is not None
        if keys is not None:
            self.device = keys.device
            self._expose()

    def _expose(self) -> None:
        self.keys = self.buffer_k[:, :, : self.length]
        self.values = self.buffer_v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> LayerKV:
        n = key_states.shape[-2]
        if self.buffer_k is None:  # first write into an empty cache: allocate for the whole call
            batch, heads, _, dim = key_states.shape
            shape = (batch, heads, max(self.capacity, n), dim)
            self.buffer_k = key_states.new_zeros(shape)
            self.buffer_v = value_states.new_zeros(shape)
            self.device = key_states.device
            self.is_initialized = True
        if self.length + n > self.buffer_k.shape[2]:
            raise RuntimeError(f"KV buffer full: {self.length} + {n} > {self.buffer_k.shape[2]} columns")
        self.buffer_k[:, :, self.length : self.length + n] = key_states
        self.buffer_v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.buffer_k = self.buffer_k.index_select(0, rows)
        self.buffer_v = self.buffer_v.index_select(0, rows)
        self._expose()

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` columns (padding in every row); a view, no copy."""
        self.buffer_k = self.buffer_k[:, :, columns:]
        self.buffer_v = self.buffer_v[:, :, columns:]
        self.length -= columns
        self._expose()


def growing_cache(layers: list[GrowingLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def empty_cache(num_layers: int, capacity: int) -> DynamicCache:
    return growing_cache([GrowingLayer(None, None, 0, capacity) for _ in range(num_layers)])


def assemble(rows: list[tuple[list[LayerKV], int]], width: int, capacity: int) -> DynamicCache | None:
    """A batch cache of `width` filled columns: row i holds its first n_i cached tokens right-aligned.

    `rows` is [(per-layer (keys, values) of the row, n_i)]; rows with n_i = 0 are all padding (zero
    keys and values, to be masked). Returns None when width is 0 (nothing cached yet).
    """
    if width == 0:
        return None
    source = next(layers for layers, n in rows if n > 0)
    out = []
    for layer, (k0, v0) in enumerate(source):
        _, heads, _, dim = k0.shape
        shape = (len(rows), heads, capacity, dim)
        keys, values = k0.new_zeros(shape), v0.new_zeros(shape)
        for i, (layers, n) in enumerate(rows):
            if n > 0:
                k, v = layers[layer]
                keys[i, :, width - n : width] = k[0, :, :n]
                values[i, :, width - n : width] = v[0, :, :n]
        out.append(GrowingLayer(keys, values, width, capacity))
    return growing_cache(out)


def row_layers(cache: DynamicCache, row: int, start: int, end: int, copy: bool) -> list[LayerKV]:
    """Row `row`'s columns [start, end) of every layer, as (1, H, end - start, D) tensors."""
    out = []
    for layer in cache.layers:
        k = layer.keys[row : row + 1, :, start:end]
        v = layer.values[row : row + 1, :, start:end]
        out.append((k.clone(), v.clone()) if copy else (k, v))
    return out


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.select(rows)


def trim_left(cache: DynamicCache, columns: int) -> None:
    for layer in cache.layers:
        layer.trim_left(columns)


def layers_of(cache: DynamicCache) -> list[LayerKV]:
    """The (keys, values) of every layer of a plain cache (e.g. a batch-1 prefix)."""
    return [(layer.keys, layer.values) for layer in cache.layers]
