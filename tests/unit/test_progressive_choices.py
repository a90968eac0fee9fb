"""progressive's choices on a fake context: where each new adapter starts, which adapter evaluates
which domain, what a checkpoint keeps; and the rollout-only weight swap it is evaluated through."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tau2cl.cl.context import CLContext, Progress
from tau2cl.cl.strategies.progressive import Progressive
from tau2cl.config import GRPOConfig
from tau2cl.rl.training_model import TrainingModel

ORDER = ["airline", "retail", "telecom"]


class Live:
    """The live adapter as the fake context sees it (one tensor), and the optimizer restarts."""

    def __init__(self, value: list[float]):
        self.value = {"lora_B": torch.tensor(value)}
        self.restarts = 0

    def snapshot(self):
        return {k: v.clone() for k, v in self.value.items()}

    def load(self, weights):
        self.value = {k: v.clone() for k, v in weights.items()}

    def restart(self):
        self.restarts += 1


def _context(live: Live, progress: Progress) -> CLContext:
    return CLContext(
        config=None, dist=SimpleNamespace(rank=0, world_size=1), order=list(ORDER), domains={}, params=[],
        progress=progress, rollout=None, episode_gradients=None, snapshot_weights=live.snapshot,
        load_weights=live.load, accuracy_matrix=lambda: [], restart_optimizer=live.restart,
    )


def _run_two_domains(init: str) -> tuple[Progressive, Live, CLContext, list]:
    """airline trains [0] → [1]; retail trains from where `init` starts it to [5]; returns the
    live value at each domain's start."""
    strategy = Progressive(GRPOConfig(cl_algorithm="progressive", lora_r=4, progressive_init=init))
    live, progress = Live([0.0]), Progress()
    ctx = _context(live, progress)
    strategy.setup(ctx)
    starts = []
    for i, end in enumerate([1.0, 5.0]):
        progress.set(domain_idx=i)
        strategy.before_domain(ctx, i, ORDER[i])
        starts.append(float(live.value["lora_B"]))
        live.value = {"lora_B": torch.tensor([end])}  # what the domain's training reached
        strategy.after_domain(ctx, i, ORDER[i])
    return strategy, live, ctx, starts


@pytest.mark.parametrize("init, retail_start, telecom_eval", [("fresh", 0.0, 0.0), ("previous", 1.0, None)])
def test_each_adapter_starts_where_the_option_says_and_each_domain_is_evaluated_with_its_own(
    init, retail_start, telecom_eval
):
    strategy, live, ctx, starts = _run_two_domains(init)
    assert starts == [0.0, retail_start]  # fresh: the initialisation; previous: airline's final adapter
    assert live.restarts == 1  # AdamW's moments restart with retail's adapter, not with the first
    assert float(strategy.evaluation_weights(ctx, "airline")["lora_B"]) == 1.0  # airline's own, frozen
    assert strategy.evaluation_weights(ctx, "retail") is None  # the current domain: the live adapter
    telecom = strategy.evaluation_weights(ctx, "telecom")  # not trained yet: where its adapter would start
    assert (telecom if telecom is None else float(telecom["lora_B"])) == telecom_eval
    assert strategy.evaluation_weights(ctx, "mock") is None  # outside the order: the live adapter
    live.value["lora_B"] += 1.0  # later training of the live adapter leaves the frozen copy alone
    assert float(strategy.evaluation_weights(ctx, "airline")["lora_B"]) == 1.0


def test_the_state_holds_every_adapter_and_the_initialisation():
    strategy, _, _, _ = _run_two_domains("fresh")
    restored = Progressive(GRPOConfig(cl_algorithm="progressive", lora_r=4))
    restored.load_state_dict(strategy.state_dict())
    live = Live([7.0])  # a resumed run's live adapter, from the checkpoint's adapter files
    restored.setup(_context(live, Progress(domain_idx=1)))  # setup keeps the saved initialisation
    assert float(restored.initial["lora_B"]) == 0.0
    assert {d: float(w["lora_B"]) for d, w in restored.adapters.items()} == {"airline": 1.0, "retail": 5.0}


def test_the_rollout_swap_holds_the_weights_inside_and_restores_them_bit_for_bit():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: not part of what is swapped
    training = TrainingModel(model, SimpleNamespace(is_distributed=False), "ddp")
    before = model.weight.detach().clone()
    other = {"weight": torch.full((2, 3), 0.5)}
    with training.rollout_weights(other):
        assert torch.equal(model.weight, other["weight"])
    assert torch.equal(model.weight, before) and model.weight is training.params[0]
    with pytest.raises(RuntimeError, match="stop"), training.rollout_weights(other):
        raise RuntimeError("stop")  # a stop during the evaluation still restores
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="exactly the trainable parameters"), training.rollout_weights({"bias": before}):
        pass
    with training.rollout_weights(None):
        assert torch.equal(model.weight, before)
