"""The shared-prefix update: the rows' common prefix runs once, and nothing else changes.

Four rows of unequal length share an 80-token prefix; trained tokens sit in the suffixes, right
after the prefix (predicted from the prefix's last hidden state) and inside the prefix itself.
In fp64 the log-probs and the accumulated GRPO gradients equal the per-row computation to 1e-10,
in one micro-batch and in two; in fp32 to 1e-4 (log-probs) and 1e-4 relative (gradients). The
per-sequence gradients of the EWC Fisher, each sequence backpropagated alone after one shared
prefix forward, equal those of separate forwards to the same tolerances.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tau2cl.rl.shared_prefix import shared_prefix_length
from tau2cl.rl.update import (
    LossSettings,
    accumulate_gradients,
    backward_each,
    collate,
    micro_batches_by_length,
    reference_logprobs,
    sequence_logprobs,
)

PREFIX = 80


def _batch(pad_id: int):
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 300, (PREFIX,), generator=g).tolist()
    lengths = [40, 12, 25, 33]  # suffix lengths
    rows = [prefix + torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]
    masks = [[0] * PREFIX + [1] * n for n in lengths]
    masks[1][PREFIX - 5 : PREFIX - 2] = [1, 1, 1]  # trained tokens inside the shared prefix too
    logprobs = [[-0.5 * m for m in mask] for mask in masks]
    return collate(rows, masks, logprobs, [1.0, -0.5, 0.25, -0.75], pad_id)


def test_shared_prefix_length_leaves_each_row_a_token():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 9, 9], [5, 6, 7, 8, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert shared_prefix_length(ids, mask) == 3  # column 3 differs (8 vs 9)
    assert shared_prefix_length(ids[[0, 2]], mask[[0, 2]]) == 3  # equal to column 3, but row 0 needs a token
    assert shared_prefix_length(ids[:1], mask[:1]) == 0  # one row shares with nobody


def _grads(model, batch, micro, shared: bool) -> list[torch.Tensor]:
    settings = LossSettings(1.0, 0.2, 0.28, kl_coef=0.04, shared_prefix=shared)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, batch, micro, settings, float(batch.num_tokens))
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("dtype, lp_tol, grad_tol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-4)])
def test_shared_prefix_gives_the_per_row_logprobs_and_gradients(tiny_model, tiny_tokenizer, dtype, lp_tol, grad_tol):
    model = copy.deepcopy(tiny_model).to(dtype).train()
    batch = _batch(tiny_tokenizer.pad_token_id)
    assert shared_prefix_length(batch.input_ids, batch.attention_mask) == PREFIX
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    with torch.no_grad():
        plain = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        shared = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, shared_prefix=True)
    hook.remove()
    width = batch.input_ids.shape[1]
    assert seen == [(4, width), (1, PREFIX), (4, width - PREFIX)]  # the prefix ran once, then the suffixes
    assert (plain[batch.loss_mask] != 0).all()
    assert (shared - plain).abs().max().item() < lp_tol
    batch.ref_logprobs = reference_logprobs(model, batch, [[0, 1, 2, 3]], 1.0, None, shared_prefix=True) - 0.1
    for micro in ([[0, 1, 2, 3]], [[1, 2], [0, 3]]):
        per_row = _grads(model, batch, micro, shared=False)
        once = _grads(model, batch, micro, shared=True)
        assert len(per_row) == len(once) > 0
        scale = max(g.abs().max().item() for g in per_row)
        assert scale > 0
        gap = max((a - b).abs().max().item() for a, b in zip(per_row, once, strict=True))
        assert gap < grad_tol * max(1.0, scale), f"{micro}: max |Δgrad| = {gap:.2e}"


def test_micro_batches_keep_a_group_together_before_length():
    # keys (b,5) (a,9) (b,3) (a,7) sort to rows 3, 1, 2, 0: domain a's rows, then b's, each by length
    assert micro_batches_by_length([5, 9, 3, 7], 2, groups=["b", "a", "b", "a"]) == [[3, 1], [2, 0]]
    assert micro_batches_by_length([5, 9, 3, 7], 2) == [[2, 0], [3, 1]]  # by length alone


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_per_sequence_gradients_with_the_prefix_run_once_equal_those_of_separate_forwards(
    tiny_model, tiny_tokenizer, dtype, tol
):
    # the EWC Fisher's per-episode gradients: the prefix's graph serves every sequence's backward
    model = copy.deepcopy(tiny_model).to(dtype).train()
    batch = _batch(tiny_tokenizer.pad_token_id)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    sequences = [(batch.input_ids[i, :n].tolist(), batch.loss_mask[i, :n].int().tolist()) for i, n in enumerate(lengths)]

    def per_sequence(shared: bool) -> list[list[torch.Tensor]]:
        grads = []
        model.zero_grad(set_to_none=True)
        for i in backward_each(model, sequences, None, shared_prefix=shared):
            assert i == len(grads)  # in order, one yield per sequence
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            model.zero_grad(set_to_none=True)
        assert i == len(sequences) - 1
        return grads

    alone, once = per_sequence(False), per_sequence(True)
    for row, (a, b) in enumerate(zip(alone, once, strict=True)):
        scale = max(g.abs().max().item() for g in a)
        assert scale > 0
        assert max((x - y).abs().max().item() for x, y in zip(a, b, strict=True)) <= tol * scale, row
    # each sequence's own gradient, not the sum so far: rows differ
    assert max((x - y).abs().max().item() for x, y in zip(once[0], once[1], strict=True)) > 1e-3 * scale
