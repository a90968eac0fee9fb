"""Micro-batching trims padding without changing any log-prob or gradient."""

from __future__ import annotations

import torch

from tau2cl.rl.update import (
    LossSettings,
    TrainedLogprobs,
    accumulate_gradients,
    as_trained_forward,
    collate,
    micro_batches_by_length,
    recompute_old_logprobs,
    reference_logprobs,
    sequence_logprobs,
    split_micro_batches,
)


def _batch(pad_id: int):
    g = torch.Generator().manual_seed(0)
    lengths = [40, 12, 25]
    ids = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]
    masks = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    logprobs = [[0.0] * n for n in lengths]
    return collate(ids, masks, logprobs, [1.0, -0.5, 0.25], pad_id)


def test_rows_trim_to_their_own_longest_row(tiny_tokenizer):
    batch = _batch(tiny_tokenizer.pad_token_id)
    assert batch.input_ids.shape == (3, 40)
    sub = batch.rows([1, 2])
    assert sub.input_ids.shape == (2, 25)
    assert torch.equal(sub.input_ids, batch.input_ids[1:, :25])
    assert torch.equal(sub.advantages, batch.advantages[1:])


def test_reference_logprobs_in_micro_batches_equal_one_full_pass(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        full = sequence_logprobs(tiny_model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    chunked = reference_logprobs(tiny_model, batch, [[2], [0], [1]], 1.0, None)
    assert chunked.shape == full.shape
    assert torch.allclose(chunked, full, atol=1e-5)
    assert (chunked[~batch.loss_mask] == 0).all()


def test_accumulated_micro_batch_gradients_equal_the_full_batch_gradient(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer.pad_token_id)
    settings = LossSettings(temperature=1.0, clip_low=0.2, clip_high=0.2, kl_coef=0.0)
    params = [p for p in tiny_model.parameters()]

    def grads(micro):
        tiny_model.zero_grad(set_to_none=True)
        accumulate_gradients(tiny_model, batch, micro, settings, float(batch.num_tokens))
        return [p.grad.clone() for p in params if p.grad is not None]

    one = grads(split_micro_batches(3, 1))
    three = grads(split_micro_batches(3, 3))
    by_length = grads(micro_batches_by_length([40, 12, 25], 2))
    tiny_model.zero_grad(set_to_none=True)
    assert len(one) == len(three)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, three, strict=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, by_length, strict=True))


def test_micro_batches_by_length_group_similar_rows_and_cover_each_row_once():
    lengths = [50, 7, 33, 8, 49, 30]
    groups = micro_batches_by_length(lengths, 3)
    assert groups == [[1, 3], [5, 2], [4, 0]]
    assert sorted(r for g in groups for r in g) == list(range(6))
    padded = sum(len(g) * max(lengths[r] for r in g) for g in groups)
    in_order = sum(len(g) * max(lengths[r] for r in g) for g in split_micro_batches(6, 3))
    assert (padded, in_order) == (2 * 8 + 2 * 33 + 2 * 50, 2 * 50 + 2 * 33 + 2 * 49)


def test_the_trained_forward_module_is_sequence_logprobs_and_wraps_once(tiny_model, tiny_tokenizer):
    """What DDP/FSDP wrap: its forward is the update's log-prob forward, and it is never wrapped twice."""
    batch = _batch(tiny_tokenizer.pad_token_id)
    forward = as_trained_forward(tiny_model)
    assert isinstance(forward, TrainedLogprobs) and forward.lm is tiny_model
    assert as_trained_forward(forward) is forward
    with torch.no_grad():
        direct = sequence_logprobs(tiny_model, batch.input_ids, batch.attention_mask, batch.loss_mask, 0.7)
        wrapped, hits = forward(batch.input_ids, batch.attention_mask, batch.loss_mask, 0.7)
    assert torch.equal(direct, wrapped) and hits is None



def test_truncated_importance_sampling_recomputes_the_old_logprobs(tiny_model, tiny_tokenizer):
    """With tis_cap the ratio compares the update's forward with itself (1 on the first pass) and
    the rollout's log-probs enter only the truncated weight min(exp(old - sampled), cap)."""
    batch = _batch(tiny_tokenizer.pad_token_id)  # sampled log-probs are all 0 (a wrong sampler)
    recompute_old_logprobs(tiny_model, batch, [[0, 1, 2]], 1.0, None)
    assert torch.equal(batch.sampling_logprobs, torch.zeros_like(batch.old_logprobs))
    with torch.no_grad():
        own = sequence_logprobs(tiny_model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    torch.testing.assert_close(batch.old_logprobs, own)
    settings = LossSettings(1.0, 0.2, 0.2, 0.0, tis_cap=2.0)
    stats = accumulate_gradients(tiny_model, batch, [[0], [1, 2]], settings, float(batch.num_tokens))
    tiny_model.zero_grad(set_to_none=True)
    assert abs(stats["ratio_mean"] - 1.0) < 1e-5  # same forward, same weights
    # every token's log-prob is < 0 = the "sampled" one, so each weight is exp(lp) < 1 and none is cut
    expected = own.exp()[batch.loss_mask].mean().item()
    assert abs(stats["tis_weight_mean"] - expected) < 1e-5 and stats["tis_clip_frac"] == 0.0
