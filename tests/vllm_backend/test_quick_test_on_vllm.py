"""The quick test (configs/quick_test.yaml) with vLLM sampling, against the project's own engine.

Three runs, two at a time: the whole quick test on vLLM, and its warm start alone (no GRPO step)
on vLLM and on the own engine. With the warm start alone both engines evaluate greedily after
identical weights, so equal accuracy matrices show that every supervised step reached the engine.
The whole run must learn each domain's task as the own engine's quick test does, keep vLLM's
sampling log-probs equal to the trainer's after every optimizer step, and save evaluation
rollouts that tau2's own evaluator re-scores to the same rewards.
"""

from __future__ import annotations

import pytest

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.data_model.simulation import Results
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from train_runs import QUICK_TEST, records, run_all, summary, train_command

from tau2cl.env.domains import load_domain

pytestmark = pytest.mark.vllm

LOGPROB_TOLERANCE = 1e-4  # fp32, the design's bound
LEARNED = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # as the own engine's quick test


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> log_dir of: the quick test on vLLM; its warm start alone on vLLM and on the own engine."""
    base = tmp_path_factory.mktemp("quick")
    quick = ["--config", str(QUICK_TEST), "--no-use_progress_bar"]
    warm_only = [*quick, "--num_steps_per_task", "0"]
    flags = {
        "vllm": [*quick, "--rollout_backend", "vllm"],  # the longest first
        "warm_vllm": [*warm_only, "--rollout_backend", "vllm"],
        "warm_hf": [*warm_only, "--rollout_backend", "hf"],
    }
    results = run_all({name: train_command(base / name, *f) for name, f in flags.items()})
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return {name: base / name for name in flags}


def test_the_warm_start_alone_gives_the_own_engines_accuracy_matrix(runs):
    hf, vllm = summary(runs["warm_hf"]), summary(runs["warm_vllm"])
    assert vllm["config"]["rollout_backend"] == "vllm" and hf["config"]["rollout_backend"] == "hf"
    assert hf["global_step"] == vllm["global_step"] == 0  # no GRPO step: the warm start alone
    assert vllm["accuracy_matrix"] == hf["accuracy_matrix"]
    assert vllm["pass_rate_matrix"] == hf["pass_rate_matrix"]
    assert hf["accuracy_matrix"] == LEARNED  # the warm start taught something an unsynced engine would miss


def test_the_quick_test_on_vllm_learns_each_domain_and_forgets_it(runs):
    result = summary(runs["vllm"])
    assert result["accuracy_matrix"] == LEARNED
    assert result["final_measures"]["forgetting"] == 1.0
    train = records(runs["vllm"], "train")
    assert len(train) == 6  # 3 domains x 2 GRPO steps
    assert any(r["loss"] != 0.0 and 0 < r["tau2_reward_mean"] < 1 for r in train)  # a real update


def test_vllm_log_probs_equal_the_trainers_after_every_optimizer_step(runs):
    """Each GRPO step's sampled tokens came after 60 warm-start steps per domain so far and every
    earlier GRPO step: their vLLM log-probs equal the trainer's recomputed ones."""
    train = records(runs["vllm"], "train")
    for r in train:
        assert 0 <= r["logprob_gap_mean"] <= r["logprob_gap_max"] <= LOGPROB_TOLERANCE, r
        assert r["weight_syncs"] >= 1 and r["time_weight_sync"] > 0
    # pushes since the previous record: the engine's first (at start), each of a domain's 60
    # warm-start steps (counted in its first GRPO step's record) and each GRPO step's
    assert [r["weight_syncs"] for r in train] == [62.0, 1.0, 61.0, 1.0, 61.0, 1.0]


def test_the_saved_evaluation_rollouts_rescore_identically_with_tau2(runs):
    log_dir = runs["vllm"]
    matrix = summary(log_dir)["accuracy_matrix"]
    order = ["airline", "retail", "telecom"]
    files = sorted((log_dir / "eval_results").glob("*.json"))
    assert len(files) == 12  # 4 stages x 3 domains
    for path in files:
        stage, name = path.stem.rsplit("_", 1)
        row = 0 if stage == "before_training" else int(stage.removeprefix("after_task")) + 1
        results = Results.load(path)  # tau2's own reader
        tasks = {task.id: task for task in results.tasks}
        solo = load_domain(name, max_tasks=1).solo_mode  # as the run played it (no LLM user)
        rewards = []
        for simulation in results.simulations:
            rescored = evaluate_simulation(
                simulation=simulation, task=tasks[simulation.task_id], evaluation_type=EvaluationType.ALL,
                solo_mode=solo, domain=name,
            )  # fmt: skip
            assert rescored.model_dump() == simulation.reward_info.model_dump(), path.name
            rewards.append(rescored.reward)
        assert sum(rewards) / len(rewards) == matrix[row][order.index(name)], path.name
