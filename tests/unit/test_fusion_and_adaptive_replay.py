"""fusion's merges and adaptive_replay's shares, on hand-computed numbers and a fake context."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from tau2cl.cl.context import CLContext, Progress
from tau2cl.cl.strategies.adaptive_replay import (
    AdaptiveReplay,
    forgetting_per_domain,
    replay_shares,
)
from tau2cl.cl.strategies.fusion import Fusion, add_into, interpolate, scaled
from tau2cl.config import GRPOConfig


class Weights:
    """The policy's weights as a fake context sees them: one tensor, set by each test."""

    def __init__(self, value: list[float]):
        self.value = {"w": torch.tensor(value)}

    def snapshot(self):
        return {k: v.clone() for k, v in self.value.items()}

    def load(self, weights):
        self.value = {k: v.clone() for k, v in weights.items()}


def _context(weights: Weights, order=("airline", "retail", "telecom"), matrix=None, domain_idx=0) -> CLContext:
    return CLContext(
        config=None, dist=SimpleNamespace(rank=0, world_size=1), order=list(order), domains={}, params=[],
        progress=Progress(domain_idx=domain_idx), rollout=None, episode_gradients=None,
        snapshot_weights=weights.snapshot, load_weights=weights.load, accuracy_matrix=lambda: matrix,
    )


def test_interpolation_and_running_mean_by_hand():
    start, end = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, -2.0])}
    # 0.25 * end + 0.75 * start = [1.0, 1.0]
    assert torch.equal(interpolate(start, end, 0.25)["w"], torch.tensor([1.0, 1.0]))
    assert torch.equal(interpolate(start, end, 1.0)["w"], end["w"])
    total = add_into(add_into(None, start), end)  # [4, 0]
    assert torch.equal(scaled(total, 0.5)["w"], torch.tensor([2.0, 0.0]))


def test_wise_fusion_sets_the_predicted_interpolation_after_each_domain():
    weights = Weights([1.0, 1.0])
    ctx = _context(weights)
    fusion = Fusion(GRPOConfig(cl_algorithm="fusion", fusion_mode="wise", fusion_alpha=0.25))
    fusion.before_domain(ctx, 0, "airline")
    weights.value = {"w": torch.tensor([5.0, -3.0])}  # what training on airline reached
    fusion.after_domain(ctx, 0, "airline")
    # 1 + 0.25 * (5 - 1) = 2; 1 + 0.25 * (-3 - 1) = 0
    assert torch.equal(weights.value["w"], torch.tensor([2.0, 0.0]))
    fusion.before_domain(ctx, 1, "retail")
    weights.value = {"w": torch.tensor([2.0, 4.0])}
    fusion.after_domain(ctx, 1, "retail")
    assert torch.equal(weights.value["w"], torch.tensor([2.0, 1.0]))  # 0 + 0.25 * 4 = 1


def test_endpoint_fusion_sets_the_mean_of_the_domain_ends():
    weights = Weights([0.0])
    ctx = _context(weights)
    fusion = Fusion(GRPOConfig(cl_algorithm="fusion", fusion_mode="endpoints"))
    ends = [[3.0], [6.0], [-3.0]]
    merged = []
    for i, end in enumerate(ends):
        fusion.before_domain(ctx, i, ctx.order[i])
        weights.value = {"w": torch.tensor(end)}
        fusion.after_domain(ctx, i, ctx.order[i])
        merged.append(float(weights.value["w"]))
    # means of [3], [3, 6], [3, 6, -3]: 3, 4.5, 2
    assert merged == [3.0, 4.5, 2.0]
    restored = Fusion(GRPOConfig(cl_algorithm="fusion"))
    restored.load_state_dict(fusion.state_dict())
    assert restored.endpoints == 3 and torch.equal(restored.endpoint_sum["w"], torch.tensor([6.0]))


MATRIX = [  # rows: before, after airline, after retail, after telecom
    [0.0, 0.0, 0.0],
    [0.8, 0.1, 0.0],
    [0.5, 0.6, 0.2],
    [0.2, 0.5, 0.7],
]


def test_forgetting_per_domain_by_hand():
    assert forgetting_per_domain(MATRIX, 1) == [0.0]  # airline just learned
    assert forgetting_per_domain(MATRIX, 2) == pytest.approx([0.3, 0.0])  # 0.8 − 0.5; retail just learned
    assert forgetting_per_domain(MATRIX, 3) == pytest.approx([0.6, 0.1, 0.0])  # 0.8 − 0.2; 0.6 − 0.5


def test_shares_follow_the_forgetting_with_a_floor():
    # stage 2: weights 0.3 + 0.05, 0 + 0.05 → 0.875, 0.125
    assert replay_shares(MATRIX, 2, 0.05) == pytest.approx([0.875, 0.125])
    # stage 3: 0.65, 0.15, 0.05 over 0.85
    assert replay_shares(MATRIX, 3, 0.05) == pytest.approx([0.65 / 0.85, 0.15 / 0.85, 0.05 / 0.85])
    assert replay_shares([[0.0, 0.0], [0.5, 0.0], [0.5, 0.5]], 2, 0.0) == [0.5, 0.5]  # nothing forgotten


def test_adaptive_replay_draws_domains_by_the_matrixs_shares():
    strategy = AdaptiveReplay(GRPOConfig(cl_algorithm="adaptive_replay", adaptive_replay_floor=0.05))
    ctx = _context(Weights([0.0]), matrix=MATRIX, domain_idx=2)  # training telecom: rows 0..2 filled
    earlier = ctx.earlier_domains
    assert strategy._domain_weights(ctx, earlier) == pytest.approx([0.875, 0.125])
    rng = random.Random(0)
    picks = [strategy._pick_domain(ctx, earlier, rng) for _ in range(4000)]
    assert picks.count("airline") / len(picks) == pytest.approx(0.875, abs=0.02)
    shares = strategy.step_metrics(ctx, [])
    assert shares["replay_share/airline"] == pytest.approx(0.875)
    assert shares["replay_share/retail"] == pytest.approx(0.125)
