"""Learning you can see: a supervised warm start solves a write task, then GRPO gets a signal.

The tiny model (random init) is trained through the real GRPOTrainer on airline task 27, whose
golden actions send a certificate (a write: the do-nothing floor of this task is 0). To keep the
test to about a minute, it runs the compact setting on that one task (`--compact_domains
--task_ids airline:27`: a one-line policy and only the tools the loaded tasks' golden actions call,
about 400 tokens of context instead of about 4,800); tau2's evaluator does not read the system
prompt, so rewards are tau2's as always. The test checks:
SFT loss falls and token accuracy rises; greedy evaluation right after SFT passes the task by
tau2's evaluator while the untrained model's did not; the saved Results file re-scores to the
recorded reward; the GRPO step that follows (temperature 1) has a group with unequal tau2 rewards,
hence non-zero advantages and loss, and changes the weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

pytestmark = pytest.mark.slow  # ~1-2 min on 2 busy cores

TASK_ID = "27"  # get_user_details, then send_certificate (a write)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("sft_learning")
    config = tiny_config(
        task_order=["airline"], sft_steps_per_task=60, sft_learning_rate=3e-3, num_steps_per_task=1,
        learning_rate=1e-4, warmup_steps=0, num_samples_per_prompt=8, temperature=1.0, max_new_tokens=64,
        max_turns=4, max_context_tokens=8192, eval_split="train", eval_max_tasks=None, reward_fn="tau2",
        task_ids=[f"airline:{TASK_ID}"], max_tasks_per_domain=1, log_dir=str(log_dir), log_interval=20, seed=1,
    )
    trainer = GRPOTrainer(config)
    seen: dict = {}
    run_sft = trainer.sft.run

    def sft_then_evaluate(*args, **kwargs):
        run_sft(*args, **kwargs)
        seen["after_sft"] = trainer.evaluation.evaluate_domain("airline", "after_sft")

    update = trainer.grpo.update

    def recording_update(trajectories, advantages, *args, **kwargs):
        seen["rewards"] = [t.reward for t in trajectories]
        seen["advantages"] = advantages
        before = [p.detach().clone() for p in trainer.models.training.params]
        stats = update(trajectories, advantages, *args, **kwargs)
        seen["change"] = max(float((p.detach() - b).abs().max()) for p, b in zip(trainer.models.training.params, before, strict=True))
        seen["loss"] = stats["loss"]
        return stats

    trainer.sft.run, trainer.grpo.update = sft_then_evaluate, recording_update
    summary = trainer.train()
    return log_dir, summary, seen


def test_sft_solves_a_write_task_the_untrained_model_does_not(run):
    log_dir, summary, seen = run
    assert summary["do_nothing_floor"] == {"airline": 0.0}
    assert summary["accuracy_matrix"][0] == [0.0]  # the untrained model, greedy
    assert seen["after_sft"].pass_rate >= 0.5 and seen["after_sft"].reward_mean == 1.0
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["type"] == "sft"]
    assert [r["step"] for r in sft] == list(range(1, 61))
    assert sft[-1]["loss"] < 0.2 * sft[0]["loss"] and sft[-1]["token_accuracy"] > sft[0]["token_accuracy"] + 0.5


def test_the_results_file_rescores_to_the_recorded_reward(run):
    from tau2.data_model.simulation import Results
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

    log_dir, _, _ = run
    results = Results.load(log_dir / "eval_results" / "after_sft_airline.json")
    (sim,) = results.simulations
    again = evaluate_simulation(sim, results.tasks[0], EvaluationType.ALL, False, "airline")
    assert again.reward == sim.reward_info.reward == 1.0


def test_a_grpo_step_after_sft_has_signal_and_moves_the_weights(run):
    _, _, seen = run
    rewards = seen["rewards"]
    assert len(rewards) == 8 and min(rewards) < max(rewards)  # unequal tau2 rewards in the group
    assert any(abs(a) > 0.1 for a in seen["advantages"])
    assert abs(seen["loss"]) > 0 and seen["change"] > 0
    assert torch.isfinite(torch.tensor(seen["loss"]))
