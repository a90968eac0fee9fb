"""A run stopped during its supervised warm start resumes mid-SFT to bit-identical weights."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tau2cl.runs.interrupt import StoppedWithCheckpoint
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

pytestmark = pytest.mark.slow  # ~30 s: three short pure-SFT runs of the tiny model

SFT_STEPS, STOP_AFTER = 4, 2


def make_trainer(log_dir, resume: bool = False) -> GRPOTrainer:
    config = tiny_config(
        task_order=["airline"], sft_steps_per_task=SFT_STEPS, sft_learning_rate=1e-3, num_steps_per_task=0,
        max_new_tokens=4, eval_split="train", reward_fn="tau2", seed=3, log_dir=str(log_dir),
        resume_from=str(log_dir) if resume else None,
    )
    return GRPOTrainer(config)


def weights(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}


def test_an_interrupted_warm_start_resumes_to_the_same_weights(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.train()
    expected = weights(straight)

    cut_dir = tmp_path / "cut"
    cut = make_trainer(cut_dir)
    log_sft = cut.tracker.log_sft

    def stop_after(task_idx, domain, step, total, global_step, stats):
        log_sft(task_idx, domain, step, total, global_step, stats)
        if step == STOP_AFTER:
            cut.signals.signum = signal.SIGTERM  # as if SIGTERM arrived during this step

    cut.tracker.log_sft = stop_after
    with pytest.raises(StoppedWithCheckpoint) as stopped:
        cut.train()
    assert f"supervised step {STOP_AFTER}/{SFT_STEPS}" in str(stopped.value)
    assert (cut_dir / f"checkpoint_task_0_sft_{STOP_AFTER}").is_dir()

    resumed = make_trainer(cut_dir, resume=True)
    assert resumed.progress.sft_step == STOP_AFTER and resumed.sft._saved_optimizer is not None
    resumed.train()
    got = weights(resumed)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    records = [json.loads(line) for line in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "sft"] == list(range(1, SFT_STEPS + 1))
