"""Supervised warm-start maths: the loss, token accuracy, the demonstration draw, checkpoint order."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from tau2cl.rl.sft import draw_demos, sft_loss
from tau2cl.rl.update import TrainedLogprobs, sequence_logprobs
from tau2cl.runs.checkpoint import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    STATE_FILE,
    build_manifest,
    find_checkpoint,
)


def test_sft_loss_is_the_token_sum_nll_over_the_normalizer():
    logprobs = torch.tensor([[0.0, math.log(0.5), math.log(0.25)], [0.0, math.log(0.5), 0.0]])
    hits = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.bool)
    loss, stats = sft_loss(logprobs, hits, mask, num_tokens_normalizer=2.0)
    # nll = ln2 + ln4 + ln2 = 4 ln2; loss = 4 ln2 / 2 = 2 ln2; hits on masked tokens: 1 + 1 = 2 of 3
    assert math.isclose(float(loss), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(stats["nll_sum"], 4 * math.log(2), rel_tol=1e-6)
    assert stats["hits"] == 2.0 and stats["num_tokens"] == 3.0


def test_draw_demos_is_one_draw_sharded_over_ranks():
    pool = list(range(7))
    shards = [draw_demos(3, 1, 1, pool, per_rank=2, world=3, rank=r) for r in range(3)]
    flat = [i for s in shards for i in s]
    assert all(len(s) == 2 for s in shards) and len(set(flat)) == 6  # 6 distinct of 7: inside one pass
    assert shards[1] == draw_demos(3, 1, 1, pool, per_rank=2, world=3, rank=1)  # deterministic
    assert any(draw_demos(3, 1, step, pool, 2, 3, 0) != shards[0] for step in (2, 3, 4))  # steps differ
    assert draw_demos(3, 2, 1, pool, 6, 1, 0) != flat  # another domain: another stream
    # a pool smaller than the batch is drawn whole, again and again: 5 picks of 2 = 2 + 2 + 1
    picks = draw_demos(0, 0, 1, [4, 9], per_rank=5, world=1, rank=0)
    assert len(picks) == 5 and sorted(picks[:2]) == sorted(picks[2:4]) == [4, 9]


@pytest.mark.parametrize("pool_size, batch", [(2, 1), (3, 2), (7, 3), (5, 5)])
def test_the_draw_goes_through_the_demonstrations_in_passes(pool_size, batch):
    """Every pass holds each demonstration once, so over any number of steps the counts differ by at
    most one (seed 1's retail warm start of 8 single draws from 2 demonstrations is 4 and 4)."""
    pool = list(range(10, 10 + pool_size))
    stream = [i for step in range(1, 13) for i in draw_demos(1, 1, step, pool, per_rank=batch, world=1, rank=0)]
    for start in range(0, len(stream) - pool_size + 1, pool_size):
        assert sorted(stream[start : start + pool_size]) == pool  # one pass
    for steps in range(1, 13):
        counts = Counter(stream[: steps * batch])
        assert max(counts[i] for i in pool) - min(counts[i] for i in pool) <= 1, (steps, counts)
    passes = {tuple(draw_demos(1, 1, step, pool, per_rank=pool_size, world=1, rank=0)) for step in range(1, 41)}
    assert len(passes) > 1  # the passes are shuffled, not one fixed order


def test_ranks_share_each_steps_draw_and_split_it():
    pool = list(range(5))
    for step in (1, 2, 3):
        whole = draw_demos(4, 0, step, pool, per_rank=3, world=1, rank=0)
        assert [i for r in range(3) for i in draw_demos(4, 0, step, pool, per_rank=1, world=3, rank=r)] == whole


class _Toy(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: logits = table[token]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.config = type("C", (), {})()

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("O", (), {"logits": self.table[input_ids]})()


def test_hits_mark_the_tokens_the_model_ranks_first():
    table = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    ids = torch.tensor([[0, 1, 0, 2]])  # predictions from 0 -> 1 (argmax 1: hit), 1 -> 0 (hit), 0 -> 2 (miss)
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    logprobs, hits = TrainedLogprobs(_Toy(table))(ids, torch.ones_like(ids), mask, with_hits=True)
    assert hits.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    expected = torch.log_softmax(table[0], -1)[2]
    assert math.isclose(float(logprobs[0, 3]), float(expected), rel_tol=1e-6)


def test_a_mid_sft_checkpoint_is_later_than_the_previous_domain_end(tmp_path):
    for name, progress in {
        "checkpoint_task_0": {"global_step": 4, "stages_done": 2, "sft_step": 0},
        "checkpoint_task_1_sft_3": {"global_step": 4, "stages_done": 2, "sft_step": 3},
        "checkpoint_task_1_sft_2": {"global_step": 4, "stages_done": 2, "sft_step": 2},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_bytes(b"")
        (tmp_path / name / PROGRESS_FILE).write_text(json.dumps(progress))
        (tmp_path / name / MANIFEST_FILE).write_text(json.dumps(build_manifest(tmp_path / name)))
    assert find_checkpoint(tmp_path).name == "checkpoint_task_1_sft_3"


def test_without_hits_the_trained_forward_returns_the_same_logprobs_and_no_hits():
    table = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    ids = torch.tensor([[0, 1, 0, 2]])
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    logprobs, hits = TrainedLogprobs(_Toy(table))(ids, torch.ones_like(ids), mask)
    assert hits is None
    assert torch.equal(logprobs, sequence_logprobs(_Toy(table), ids, torch.ones_like(ids), mask))
