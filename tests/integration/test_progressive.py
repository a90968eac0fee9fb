"""progressive in a real (tiny) LoRA run: each domain is evaluated with its own adapter, so the
first domain's greedy evaluation is bit-identical before and after the second domain trains, while
the second adapter moves; the new adapter starts from the previous one; resume is exact.

One run trains airline then retail with `--progressive_init previous` and a step checkpoint in
each domain; every evaluation records the adapter the rollout model held and its episodes' token
ids and log-probs. Trainers built from its domain-boundary and mid-retail checkpoints must hold
every adapter bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tau2cl.recipe.accuracy_matrix as accuracy_matrix_module
from tau2cl.rl.lora import ADAPTER_WEIGHTS
from tau2cl.rl.update import sequence_logprobs
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

pytestmark = pytest.mark.slow

RUN = dict(
    eval_temperature=0.0, learning_rate=3e-2, lora_r=4, lora_alpha=32.0, cl_algorithm="progressive",
    progressive_init="previous", save_interval=1, seed=5,
)  # over tiny_run.TINY_RUN


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _peft_names(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter under the names PEFT's adapter file uses."""
    return {f"base_model.model.{n.replace('.default.', '.')}": p for n, p in adapter.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def _train(log_dir: Path, **extra) -> tuple[GRPOTrainer, list[dict], dict]:
    """Train in this process; every evaluation's adapter and episodes, and retail's start."""
    evals: list[dict] = []
    starts: dict = {}
    original = accuracy_matrix_module.evaluate_domain

    def recording(engine, domain, *args, **kwargs):
        run = engine.run

        def run_and_record(requests, generator=None):
            out = run(requests, generator)
            evals.append({
                "domain": domain.name, "adapter": _adapter(engine.policy.model),
                "ids": [t.token_ids for t in out], "logprobs": [t.sampling_logprobs for t in out],
                "mask": [t.loss_mask for t in out],
            })  # fmt: skip
            return out

        engine.run = run_and_record
        try:
            return original(engine, domain, *args, **kwargs)
        finally:
            del engine.run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accuracy_matrix_module, "evaluate_domain", recording)
        patch.setattr(GRPOTrainer, "_write_report", lambda self: None)  # plots: not what this file checks
        trainer = GRPOTrainer(tiny_config(**RUN, log_dir=str(log_dir), **extra))
        before_domain = trainer.strategy.before_domain

        def recording_start(ctx, task_idx, domain):
            before_domain(ctx, task_idx, domain)
            starts[domain] = {"adapter": _adapter(trainer.policy.model), "moments": len(trainer.grpo.optimizer.state)}

        trainer.strategy.before_domain = recording_start
        trainer.train()
    return trainer, evals, starts


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_torch_thread):
    log_dir = tmp_path_factory.mktemp("progressive")
    trainer, evals, starts = _train(log_dir)
    return trainer, evals, starts, log_dir


def test_each_domain_is_evaluated_with_its_own_adapter_and_the_first_is_not_forgotten(run):
    trainer, evals, _, log_dir = run
    # stage 0, stage 1 (after airline), stage 2 (after retail): airline then retail each time
    assert [e["domain"] for e in evals] == ["airline", "retail"] * 3
    initial, after_airline, after_retail = evals[0]["adapter"], evals[2]["adapter"], evals[5]["adapter"]
    airline = trainer.strategy.adapters["airline"]
    assert _equal(after_airline, airline) and not _equal(after_airline, initial)  # airline trained its adapter
    assert _equal(after_retail, trainer.strategy.adapters["retail"]) and not _equal(after_retail, airline)
    # after retail trained, airline is evaluated with airline's adapter: the same greedy episodes, token
    # for token, with bit-identical log-probs, and the same reward in the matrix
    assert _equal(evals[4]["adapter"], airline)
    assert evals[4]["ids"] == evals[2]["ids"] and evals[4]["logprobs"] == evals[2]["logprobs"]
    assert trainer.evaluation.matrix.reward[2][0] == trainer.evaluation.matrix.reward[1][0]
    # the swap is for the evaluation only: the live adapter (saved after it) is retail's
    saved = load_file(str(log_dir / "checkpoint_task_1" / ADAPTER_WEIGHTS))
    live = _adapter(trainer.policy.model)
    assert _equal(live, after_retail) and _equal(_peft_names(live), saved)
    # ... and retail's adapter would answer airline differently: its log-probs of those tokens differ
    ids = torch.tensor(evals[2]["ids"][:1])
    mask = torch.tensor(evals[2]["mask"][:1], dtype=torch.bool)
    with torch.no_grad():
        under_retail = sequence_logprobs(trainer.policy.model, ids, torch.ones_like(ids), mask)[mask]
    under_airline = torch.tensor(evals[2]["logprobs"][:1])[mask]
    assert mask.sum() > 0 and (under_retail - under_airline).abs().max() > 1e-3


def test_the_new_adapter_starts_from_the_previous_one_with_fresh_moments(run):
    trainer, evals, starts, _ = run
    assert _equal(starts["retail"]["adapter"], trainer.strategy.adapters["airline"])
    assert starts["retail"]["moments"] == 0  # AdamW's moments of airline's adapter were dropped
    # before retail trained, it is evaluated with the adapter it will start from (previous: airline's)
    assert _equal(evals[3]["adapter"], trainer.strategy.adapters["airline"])
    # the trainable set is the live adapter alone: what the optimizer holds
    held = {id(p) for group in trainer.grpo.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in trainer.policy.model.parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainer.strategy.adapters["airline"])


def _resumed(straight: Path, checkpoint: str, log_dir: Path) -> GRPOTrainer:
    """A trainer built from one of the straight run's checkpoints (not trained further)."""
    trainer = GRPOTrainer(tiny_config(**RUN, log_dir=str(log_dir), resume_from=str(straight / checkpoint)))
    trainer.tracker.close()
    trainer.lock.release()
    return trainer


@pytest.mark.parametrize("checkpoint, position", [("checkpoint_task_0", (1, 0)), ("checkpoint_step_3", (1, 1))])
def test_resume_restores_every_adapter_bit_for_bit(run, tmp_path, checkpoint, position):
    """At the domain boundary and mid-retail: the frozen adapters, the initialisation, the live one."""
    trainer, _, _, straight = run
    built = _resumed(straight, checkpoint, tmp_path)
    assert (built.progress.domain_idx, built.progress.step) == position
    assert list(built.strategy.adapters) == ["airline"]
    assert _equal(built.strategy.adapters["airline"], trainer.strategy.adapters["airline"])
    assert _equal(built.strategy.initial, trainer.strategy.initial)
    saved = load_file(str(straight / checkpoint / ADAPTER_WEIGHTS))
    assert _equal(_peft_names(_adapter(built.policy.model)), saved)
    if checkpoint == "checkpoint_task_0":  # the boundary: the live adapter is airline's final one
        assert _equal(_adapter(built.policy.model), trainer.strategy.adapters["airline"])
    else:  # one retail step in: retail's adapter, no longer airline's
        assert not _equal(_adapter(built.policy.model), trainer.strategy.adapters["airline"])
