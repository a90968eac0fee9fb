"""EWC maths: the penalty, Fisher normalisation and the online recursion, by hand."""

from __future__ import annotations

import pytest
import torch

from tau2cl.cl.strategies.base import build_strategy
from tau2cl.cl.strategies.ewc import ewc_penalty, normalize_fisher, online_update
from tau2cl.config import GRPOConfig


def test_penalty_is_zero_at_the_anchor_and_grows_with_distance():
    anchor = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    fisher = [torch.tensor([2.0, 1.0]), torch.tensor([[4.0]])]
    at_anchor = [a.clone().requires_grad_() for a in anchor]
    assert float(ewc_penalty(at_anchor, anchor, fisher, lam=10.0)) == 0.0
    # move the first weight by 0.5 and the last by 1: (10/2) * (2*0.25 + 4*1) = 5 * 4.5 = 22.5
    moved = [torch.tensor([1.5, -2.0], requires_grad=True), torch.tensor([[1.5]], requires_grad=True)]
    penalty = ewc_penalty(moved, anchor, fisher, lam=10.0)
    assert float(penalty) == pytest.approx(22.5)
    farther = [torch.tensor([2.0, -2.0]), torch.tensor([[1.5]])]
    assert float(ewc_penalty(farther, anchor, fisher, lam=10.0)) > float(penalty)
    penalty.backward()
    # d/dθ (λ/2) F (θ-θ*)² = λ F (θ-θ*): 10*2*0.5 = 10 and 10*4*1 = 40
    assert moved[0].grad.tolist() == pytest.approx([10.0, 0.0])
    assert moved[1].grad.item() == pytest.approx(40.0)


def test_fisher_normalisation():
    fisher = [torch.tensor([1.0, 3.0]), torch.tensor([4.0])]
    # mean of (1, 3, 4) = 8/3
    assert normalize_fisher(fisher, "mean")[0].tolist() == pytest.approx([3 / 8, 9 / 8])
    assert normalize_fisher(fisher, "max")[1].tolist() == pytest.approx([1.0])
    assert normalize_fisher(fisher, "none") is fisher
    zero = [torch.zeros(2)]
    assert normalize_fisher(zero, "mean")[0].tolist() == [0.0, 0.0]


def test_online_fisher_follows_the_gamma_recursion_exactly():
    config = GRPOConfig(model_name_or_path="tiny", cl_algorithm="online_ewc", ewc_gamma=0.5)
    strategy = build_strategy(config)
    f1, f2, f3 = [torch.tensor([2.0])], [torch.tensor([1.0])], [torch.tensor([4.0])]
    strategy.consolidate(f1, [torch.tensor([0.0])])
    strategy.consolidate(f2, [torch.tensor([1.0])])
    strategy.consolidate(f3, [torch.tensor([2.0])])
    # F = 0.5 * (0.5 * 2 + 1) + 4 = 5
    assert len(strategy.fishers) == 1 and strategy.fishers[0][0].item() == pytest.approx(5.0)
    assert strategy.anchors == [[torch.tensor([2.0])]]  # the latest domain's end only
    assert online_update(None, f1, 0.5)[0] is not f1[0]


def test_ewc_keeps_one_pair_per_domain_and_state_round_trips():
    config = GRPOConfig(model_name_or_path="tiny", cl_algorithm="ewc")
    strategy = build_strategy(config)
    strategy.consolidate([torch.tensor([1.0])], [torch.tensor([0.0])])
    strategy.consolidate([torch.tensor([2.0])], [torch.tensor([3.0])])
    assert len(strategy.fishers) == 2
    restored = build_strategy(config)
    restored.load_state_dict(strategy.state_dict())
    assert [f[0].item() for f in restored.fishers] == [1.0, 2.0]
    assert [a[0].item() for a in restored.anchors] == [0.0, 3.0]


def test_state_read_back_onto_the_cpu_follows_the_parameters_device():
    """A checkpoint is read onto the CPU; the penalty's tensors move to the parameters' device once."""
    from tau2cl.cl.strategies.ewc import on_device_of

    here = [torch.ones(2)]
    assert on_device_of(here, [torch.zeros(2)]) is here  # same device: no copy
    elsewhere = [torch.zeros(2, device="meta")]  # stands in for a GPU
    moved = on_device_of(here, elsewhere)
    assert [t.device.type for t in moved] == ["meta"] and here[0].device.type == "cpu"
