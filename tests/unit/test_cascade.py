"""Cascade attention: a prefix attended once for the batch, merged with each row's own keys, equals
attention over the concatenated keys (fp64, 1e-12), for decode and prefill, with padding and GQA."""

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


@pytest.mark.parametrize("fused", [True, False])  # the CPU's fused kernel for the prefix, or chunked products
def test_cascade_equals_attention_over_the_concatenated_keys(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(cascade, "_FUSED_CPU", None)
        monkeypatch.setattr(cascade, "MAX_SCORES", 2 * 7 * 5)  # chunks of 5 queries: several chunks
    module = types.SimpleNamespace(layer_idx=0)
    for m, pads, own in ((1, [0, 3, 5], 9), (4, [0, 2, 0], 6), (3, [0, 0], 5)):
        query, prefix_k, prefix_v, keys, values, mask = _case(m, pads, own)
        expected = _reference(query, prefix_k, prefix_v, keys, values, mask)
        token = cascade._PREFIX.set([(prefix_k, prefix_v)])
        try:
            got = cascade.attention(module, query, keys, values, mask, scaling=0.3)[0]
            # no padding: the model passes no mask and the own part is causal by position
            unmasked = cascade.attention(module, query, keys, values, None, scaling=0.3)[0] if not any(pads) else got
        finally:
            cascade._PREFIX.reset(token)
        assert got.shape == expected.shape == (len(pads), m, 4, 8)
        assert (got - expected).abs().max().item() < 1e-12, (m, pads)
        assert (unmasked - expected).abs().max().item() < 1e-12, (m, pads)


def test_padding_query_without_own_keys_gets_the_prefix_alone():
    # a left-padding query position of a prefill block sees none of its row's keys: no NaN, the prefix's average
    module = types.SimpleNamespace(layer_idx=0)
    query, prefix_k, prefix_v, keys, values, mask = _case(2, [1], 2)
    mask[0, 0, 0, :] = False
    token = cascade._PREFIX.set([(prefix_k, prefix_v)])
    try:
        got = cascade.attention(module, query, keys, values, mask, scaling=0.3)[0]
    finally:
        cascade._PREFIX.reset(token)
    scores = query[0, :, 0, None, :] @ prefix_k[0].repeat_interleave(2, 0).transpose(-1, -2) * 0.3  # (heads, 1, P)
    expected = (torch.softmax(scores, -1) @ prefix_v[0].repeat_interleave(2, 0))[:, 0]  # (heads, dim)
    assert torch.isfinite(got).all()
    assert (got[0, 0] - expected).abs().max().item() < 1e-12


def test_without_a_prefix_it_is_sdpa_and_active_restores_the_model():
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=2, is_causal=True)
    query, _, _, keys, values, mask = _case(1, [0, 2], 5)
    got = cascade.attention(module, query, keys, values, mask, scaling=0.3)[0]
    assert torch.equal(got, sdpa_attention_forward(module, query, keys, values, mask, scaling=0.3)[0])
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa"))
    with cascade.active(model, Prefix([1, 2], [])):
        assert model.config._attn_implementation == cascade.NAME
    assert model.config._attn_implementation == "sdpa" and cascade._PREFIX.get() is None
