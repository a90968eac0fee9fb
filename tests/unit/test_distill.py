"""distill's maths and bookkeeping by hand: the KL to the teacher in the GRPO loss, the exact
in-place exchange of the teacher's weights, and the strategy's teacher across domains and
checkpoints."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch

from tau2cl.cl.context import CLContext, Progress
from tau2cl.cl.strategies.distill import Distill
from tau2cl.config import GRPOConfig
from tau2cl.errors import UserError
from tau2cl.rl.grpo import grpo_loss, k3_kl
from tau2cl.rl.teacher import weights_in_place


def test_distill_kl_by_hand_masked_and_its_gradient_pulls_towards_the_teacher():
    # teacher - policy on the two trained tokens: -1.5 - (-1.0) = -0.5 and -1.0 - (-2.0) = +1.0;
    # the third token is masked and holds garbage (NaN teacher, -inf policy).
    # k3 = e^g - g - 1: e^-0.5 + 0.5 - 1 = 0.1065307; e^1 - 2 = 0.7182818; mean 0.4124062
    # A = 0 and old = policy -> policy term 0, so loss = 0.1 * 0.4124062 = 0.04124062
    logprobs = torch.tensor([[-1.0, -2.0, -math.inf]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, math.nan]])
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([0.0])
    loss, stats = grpo_loss(logprobs, logprobs.detach(), adv, mask, teacher_logprobs=teacher, distill_coef=0.1)
    assert stats["distill_kl"] == pytest.approx(0.4124062, abs=1e-6)
    assert stats["kl"] == 0.0  # no reference given: the reference's KL is apart
    assert loss.item() == pytest.approx(0.04124062, abs=1e-7)
    loss.backward()
    # d k3 / d lp = 1 - e^g, times 0.1 / 2 tokens: 0.05 * (1 - 0.6065307) = +0.0196735 (the policy
    # likes its token more than the teacher: pushed down); 0.05 * (1 - 2.7182818) = -0.0859141
    # (likes it less: pushed up); the masked token gets exactly 0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0196735, -0.0859141, 0.0]]), atol=1e-6, rtol=0)


def test_reference_and_teacher_kls_add_each_with_its_own_weight():
    lp = torch.tensor([[-1.0, -2.0]])
    ref, teacher = torch.tensor([[-0.5, -2.5]]), torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # reference k3 mean 0.127626 (e^0.5 - 1.5 = 0.148721, e^-0.5 - 0.5 = 0.106531); teacher's 0.4124062
    # loss = 0.04 * 0.127626 + 0.1 * 0.4124062 = 0.00510504 + 0.04124062 = 0.04634566
    loss, stats = grpo_loss(
        lp, lp, torch.tensor([0.0]), mask, ref_logprobs=ref, kl_coef=0.04, teacher_logprobs=teacher, distill_coef=0.1
    )
    assert loss.item() == pytest.approx(0.04634566, abs=1e-7)
    assert (stats["kl"], stats["distill_kl"]) == (pytest.approx(0.127626, abs=1e-6), pytest.approx(0.4124062, abs=1e-6))
    assert torch.equal(k3_kl(lp, lp, mask), torch.zeros(1, 2))  # a teacher equal to the policy: exactly 0
    no_teacher = grpo_loss(lp, lp, torch.tensor([0.0]), mask)[1]
    assert "distill_kl" not in no_teacher


def test_weights_in_place_exchanges_exactly_and_gives_everything_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)).train()
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = {"0.weight": torch.randn(2, 3), "0.bias": torch.randn(2)}  # every trained tensor
    kept = {n: w.clone() for n, w in teacher.items()}
    x = torch.randn(4, 3)
    with weights_in_place(model, teacher):
        assert not model.training  # no dropout in the teacher
        out = model(x)
    torch.testing.assert_close(out, x @ kept["0.weight"].T + kept["0.bias"], rtol=0, atol=1e-6)
    assert model.training
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters())
    assert all(torch.equal(w, kept[n]) for n, w in teacher.items())
    with pytest.raises(ValueError, match="0.weight"):
        with weights_in_place(model, {"0.weight": torch.zeros(2, 3, dtype=torch.float64)}):
            pass
    assert all(torch.equal(p, own[n]) for n, p in model.named_parameters())  # a refusal changes nothing


def _context(weights: dict, domain_idx: int) -> CLContext:
    return CLContext(
        config=None, dist=SimpleNamespace(rank=0, world_size=1), order=["airline", "retail"], domains={},
        params=list(weights.values()), progress=Progress(domain_idx=domain_idx), rollout=None, episode_gradients=None,
        snapshot_weights=lambda: {n: w.clone() for n, w in weights.items()}, load_weights=None,
        accuracy_matrix=lambda: [],
    )


def test_the_teacher_is_the_policy_at_each_later_domains_start_and_survives_a_checkpoint():
    weights = {"w": torch.tensor([1.0, 2.0])}
    distill = Distill(GRPOConfig(cl_algorithm="distill", distill_coef=0.1))
    distill.before_domain(_context(weights, 0), 0, "airline")
    assert distill.teacher_weights(_context(weights, 0)) is None  # the first domain has no teacher
    weights["w"] += 3.0  # what airline's training did
    distill.before_domain(_context(weights, 1), 1, "retail")
    weights["w"] += 1.0  # retail's steps move the policy, not the teacher
    assert torch.equal(distill.teacher_weights(_context(weights, 1))["w"], torch.tensor([4.0, 5.0]))

    buffer = io.BytesIO()
    torch.save(distill.state_dict(), buffer)
    resumed = Distill(GRPOConfig(cl_algorithm="distill", distill_coef=0.1))
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert torch.equal(resumed.teacher_weights(_context(weights, 1))["w"], torch.tensor([4.0, 5.0]))
    off = Distill(GRPOConfig(cl_algorithm="distill", distill_coef=0.0))
    off.load_state_dict(distill.state_dict())
    assert off.teacher_weights(_context(weights, 1)) is None  # coefficient 0: no teacher forward at all
    resumed.after_domain(_context(weights, 1), 1, "retail")
    assert resumed.teacher_weights(_context(weights, 1)) is None and resumed.state_dict() == {"teacher": None}


def test_distill_coef_must_not_be_negative():
    with pytest.raises(UserError, match="--distill_coef must be 0 or more"):
        GRPOConfig(distill_coef=-0.1)
