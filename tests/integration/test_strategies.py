"""Strategies inside real (tiny) training runs: hook order, and EWC holding weights in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tau2cl.trainer as trainer_module
from tau2cl.agent.policy import load_model
from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.config import GRPOConfig
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, **overrides) -> GRPOConfig:
    return tiny_config(**{"log_dir": str(tmp_path), "seed": 3, **overrides})


class Recorder(CLStrategy):
    """Records every hook, and that each one got the run's CLContext (never the trainer)."""

    name = "recorder"

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[str] = []
        self.contexts: set[int] = set()

    def _saw(self, ctx, call: str) -> None:
        assert isinstance(ctx, CLContext)
        self.contexts.add(id(ctx))
        self.calls.append(call)

    def setup(self, ctx):
        self._saw(ctx, "setup")

    def before_domain(self, ctx, task_idx, domain):
        assert ctx.current_domain == domain
        self._saw(ctx, f"before_domain:{domain}")

    def augment_batch(self, ctx, requests):
        self._saw(ctx, "augment_batch")
        return requests

    def after_rollout(self, ctx, trajectories):
        self._saw(ctx, "after_rollout")

    def loss_terms(self, ctx):
        self._saw(ctx, "loss_terms")
        return {}

    def after_update(self, ctx, step):
        self._saw(ctx, "after_update")

    def step_metrics(self, ctx, trajectories):
        self._saw(ctx, "step_metrics")
        return {"recorded_step": ctx.progress.step + 1}

    def after_domain(self, ctx, task_idx, domain):
        self._saw(ctx, f"after_domain:{domain}")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _run(tmp_path: Path, **overrides) -> tuple[dict, dict]:
    """Train airline then retail; the weights after each domain."""
    config = _config(
        tmp_path, learning_rate=3e-3, num_steps_per_task=4, max_new_tokens=12, **overrides,
    )
    GRPOTrainer(config).train()
    return _weights(tmp_path / "checkpoint_task_0"), _weights(tmp_path / "checkpoint_task_1")


def _distance(before: dict, after: dict, weights: dict | None = None) -> float:
    """L2 distance, or the Fisher-weighted one Σ F (θ − θ*)² when weights are given."""
    if weights is None:
        return sum(float((after[k] - before[k]).pow(2).sum()) for k in before) ** 0.5
    return sum(float((weights[k] * (after[k] - before[k]).pow(2)).sum()) for k in weights)


def test_hooks_run_in_order_and_ewc_holds_the_weights_that_matter(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    # the baseline run: sequential behaviour (every hook a no-op) with each call recorded
    recorder = Recorder(None)
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "build_strategy", lambda config: recorder)
        seq_before, seq_after = _run(tmp_path / "seq", cl_algorithm="sequential")
    step = ["augment_batch", "after_rollout", "loss_terms", "after_update", "step_metrics"]
    domain = lambda name: [f"before_domain:{name}", *step * 4, f"after_domain:{name}"]  # noqa: E731
    assert recorder.calls == ["setup", *domain("airline"), *domain("retail")]
    assert len(recorder.contexts) == 1  # one context for the whole run
    trains = [json.loads(line) for line in (tmp_path / "seq" / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in trains if r["type"] == "train"]
    assert [r["recorded_step"] for r in trains] == [r["step"] for r in trains] == [1, 2, 3, 4] * 2

    ewc_before, ewc_after = _run(tmp_path / "ewc", cl_algorithm="ewc", ewc_lambda=1e4, ewc_fisher_samples=4)
    state = torch.load(tmp_path / "ewc" / "checkpoint_task_1" / "trainer_state.pt", weights_only=False)
    names = [n for n, p in load_model("tiny", "float32", "cpu").named_parameters() if p.requires_grad]
    fisher = dict(zip(names, state["strategy"]["fishers"][0], strict=True))  # airline's Fisher, in parameter order
    assert _distance(seq_before, seq_after) > 0
    assert _distance(ewc_before, ewc_after) < _distance(seq_before, seq_after)
    weighted_ewc = _distance(ewc_before, ewc_after, fisher)
    weighted_seq = _distance(seq_before, seq_after, fisher)
    assert weighted_ewc < 0.5 * weighted_seq, (weighted_ewc, weighted_seq)
    assert '"ewc_penalty"' in (tmp_path / "ewc" / "metrics.jsonl").read_text()


def test_wise_fusion_sets_exactly_the_interpolation_of_the_domains_start_and_end(tmp_path, monkeypatch):
    """Same seed, same episodes: the sequential run's domain end is the end fusion merged from."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    one_domain = dict(task_order=["airline"], learning_rate=3e-3, max_new_tokens=12, eval_max_tasks=1)
    GRPOTrainer(_config(tmp_path / "seq", cl_algorithm="sequential", **one_domain)).train()
    GRPOTrainer(_config(tmp_path / "wise", cl_algorithm="fusion", fusion_mode="wise", fusion_alpha=0.25, **one_domain)).train()
    start = dict(load_model("tiny", "float32", "cpu").named_parameters())
    end, merged = _weights(tmp_path / "seq" / "checkpoint_task_0"), _weights(tmp_path / "wise" / "checkpoint_task_0")
    assert _distance({k: start[k].detach() for k in end}, end) > 0  # the domain moved the weights
    for name, value in merged.items():
        expected = start[name].detach() + 0.25 * (end[name] - start[name].detach())
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_ewc_pp_updates_its_fisher_at_every_step_and_penalises_only_on_the_second_domain(tmp_path, monkeypatch):
    """From the training episodes themselves: updates during each domain, no extra rollouts."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = _config(
        tmp_path, cl_algorithm="ewc_pp", ewc_pp_interval=1, ewc_pp_alpha=0.5, ewc_lambda=100.0, learning_rate=3e-3,
    )
    GRPOTrainer(config).train()
    trains = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in trains if r["type"] == "train"]
    assert [(r["domain"], r["ewc_pp_updates"]) for r in trains] == [("airline", 1), ("airline", 2), ("retail", 3), ("retail", 4)]
    # the first estimate is taken as it is; every later one moves the running Fisher, within a domain too
    assert trains[0]["ewc_pp_fisher_change"] is None
    assert all(r["ewc_pp_fisher_change"] > 0 for r in trains[1:])
    assert "ewc_penalty" not in trains[0] and "ewc_penalty" not in trains[1]
    # retail's first step starts at the anchor; its update moves the weights, so the second pays
    assert trains[2]["ewc_penalty"] == 0.0 and trains[3]["ewc_penalty"] > 0


def test_ewc_penalty_also_holds_the_warm_start_of_later_domains(tmp_path, monkeypatch):
    """The strategy's loss terms are in every supervised step's loss too, from the second domain on."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = _config(
        tmp_path, cl_algorithm="ewc", ewc_lambda=100.0, ewc_fisher_samples=2, sft_steps_per_task=2,
        sft_learning_rate=3e-3, num_steps_per_task=1,
    )
    GRPOTrainer(config).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["type"] == "sft"]
    assert [(r["domain"], r["step"]) for r in sft] == [("airline", 1), ("airline", 2), ("retail", 1), ("retail", 2)]
    assert "ewc_penalty" not in sft[0] and "ewc_penalty" not in sft[1]  # no Fisher before airline's end
    # retail's first supervised step starts at the anchor; its update moves the weights, so the second pays
    assert sft[2]["ewc_penalty"] == 0.0 and sft[3]["ewc_penalty"] > 0
