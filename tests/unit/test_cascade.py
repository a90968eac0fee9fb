"""Cascade attention: a prefix attended once for its rows, merged with each row's own keys, equals
attention over the concatenated keys (fp64, 1e-12), for decode and prefill, with padding and GQA,
and with rows of two prefixes (two domains) mixed in one batch."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tau2cl.agent import cascade
from tau2cl.agent.kv_cache import Prefix


def _reference(query, prefix_k, prefix_v, keys, values, own_mask):
    """Plain SDPA over [prefix | row's own keys], the prefix copied into every row and always visible."""
    batch = query.shape[0]
    k = torch.cat([prefix_k.expand(batch, -1, -1, -1), keys], dim=2)
    v = torch.cat([prefix_v.expand(batch, -1, -1, -1), values], dim=2)
    seen = torch.ones(batch, 1, query.shape[2], prefix_k.shape[2], dtype=torch.bool)
    mask = torch.cat([seen, own_mask], dim=-1)
    module = types.SimpleNamespace(num_key_value_groups=query.shape[1] // keys.shape[1], layer_idx=0, is_causal=True)
    return sdpa_attention_forward(module, query, k, v, mask, scaling=0.3)[0]


def _case(m: int, pads: list[int], own: int, prefix: int = 7, heads: int = 4, groups: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(m * 100 + own)
    batch = len(pads)
    query = torch.randn(batch, heads, m, dim, generator=g, dtype=torch.float64)
    keys, values = (torch.randn(batch, groups, own, dim, generator=g, dtype=torch.float64) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(1, groups, prefix, dim, generator=g, dtype=torch.float64) for _ in range(2))
    # row b: `pads[b]` padding columns on the left of its own keys; queries are the last m columns, causal
    column = torch.arange(own)[None, None, None, :]
    row_query = torch.arange(own - m, own)[None, None, :, None]
    mask = (column <= row_query) & (column >= torch.tensor(pads)[:, None, None, None])
    return query, prefix_k, prefix_v, keys, values, mask


def _attend(query, keys, values, mask, row_prefixes):
    """cascade.attention with each row's prefix (a list of (keys, values) per row) held once."""
    module = types.SimpleNamespace(layer_idx=0)
    prefixes = {id(p): Prefix([0] * p[0].shape[2], [p]) for p in row_prefixes}
    token = cascade._SHARED.set(cascade.Shared.of([prefixes[id(p)] for p in row_prefixes]))
    try:
        return cascade.attention(module, query, keys, values, mask, scaling=0.3)[0]
    finally:
        cascade._SHARED.reset(token)


@pytest.mark.parametrize("fused", [True, False])  # the CPU's fused kernel for the prefix, or chunked products
def test_cascade_equals_attention_over_the_concatenated_keys(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(cascade, "_FUSED_CPU", None)
        monkeypatch.setattr(cascade, "MAX_SCORES", 2 * 7 * 5)  # chunks of 5 queries: several chunks
    for m, pads, own in ((1, [0, 3, 5], 9), (4, [0, 2, 0], 6), (3, [0, 0], 5)):
        query, prefix_k, prefix_v, keys, values, mask = _case(m, pads, own)
        expected = _reference(query, prefix_k, prefix_v, keys, values, mask)
        rows = [(prefix_k, prefix_v)] * len(pads)
        got = _attend(query, keys, values, mask, rows)
        # no padding: the model passes no mask and the own part is causal by position
        unmasked = _attend(query, keys, values, None, rows) if not any(pads) else got
        assert got.shape == expected.shape == (len(pads), m, 4, 8)
        assert (got - expected).abs().max().item() < 1e-12, (m, pads)
        assert (unmasked - expected).abs().max().item() < 1e-12, (m, pads)


def test_padding_query_without_own_keys_gets_the_prefix_alone():
    # a left-padding query position of a prefill block sees none of its row's keys: no NaN, the prefix's average
    query, prefix_k, prefix_v, keys, values, mask = _case(2, [1], 2)
    mask[0, 0, 0, :] = False
    got = _attend(query, keys, values, mask, [(prefix_k, prefix_v)])
    scores = query[0, :, 0, None, :] @ prefix_k[0].repeat_interleave(2, 0).transpose(-1, -2) * 0.3  # (heads, 1, P)
    expected = (torch.softmax(scores, -1) @ prefix_v[0].repeat_interleave(2, 0))[:, 0]  # (heads, dim)
    assert torch.isfinite(got).all()
    assert (got[0, 0] - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("m", [1, 3])  # decode and prefill
def test_rows_of_two_prefixes_in_one_batch_each_attend_their_own(m):
    # rows 0, 2, 3 follow prefix A (7 tokens), rows 1 and 4 prefix B (11 tokens): not contiguous
    pads = [0, 2, 1, 0, 3]
    query, a_k, a_v, keys, values, mask = _case(m, pads, 8)
    g = torch.Generator().manual_seed(5)
    b_k, b_v = (torch.randn(1, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    rows = [(a_k, a_v), (b_k, b_v), (a_k, a_v), (a_k, a_v), (b_k, b_v)]
    got = _attend(query, keys, values, mask, rows)
    for b, (pk, pv) in enumerate(rows):
        expected = _reference(query[b : b + 1], pk, pv, keys[b : b + 1], values[b : b + 1], mask[b : b + 1])
        assert (got[b : b + 1] - expected).abs().max().item() < 1e-12, b
    # a call on some of the rows (rows left the batch): `select` says which, in the call's order
    module = types.SimpleNamespace(layer_idx=0)
    prefixes = {id(p): Prefix([0] * p[0].shape[2], [p]) for p in rows}
    shared = cascade.Shared.of([prefixes[id(p)] for p in rows])
    shared.select([4, 0])
    token = cascade._SHARED.set(shared)
    try:
        part = cascade.attention(module, query[[4, 0]], keys[[4, 0]], values[[4, 0]], mask[[4, 0]], scaling=0.3)[0]
    finally:
        cascade._SHARED.reset(token)
    assert (part - got[[4, 0]]).abs().max().item() < 1e-12


def test_without_a_prefix_it_is_sdpa_and_active_restores_the_model():
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=2, is_causal=True)
    query, _, _, keys, values, mask = _case(1, [0, 2], 5)
    got = cascade.attention(module, query, keys, values, mask, scaling=0.3)[0]
    assert torch.equal(got, sdpa_attention_forward(module, query, keys, values, mask, scaling=0.3)[0])
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa"))
    with cascade.active(model, [Prefix([1, 2], [])]):
        assert model.config._attn_implementation == cascade.NAME
    assert model.config._attn_implementation == "sdpa" and cascade._SHARED.get() is None
