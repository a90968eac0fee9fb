"""--eval_split train --heldout_eval on the tiny run: both matrices with their floors, the held-out
records, Results files and lines; a stop inside the last held-out evaluation resumes with the earlier
held-out rows taken from the checkpoint, and ends like the uninterrupted run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tau2cl.evaluation.floor import do_nothing_floor
from tau2cl.runs.checkpoint import load_state
from tau2cl.runs.interrupt import StoppedWithCheckpoint
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

HERE = Path(__file__).parent
RUN = dict(eval_split="train", heldout_eval=True, learning_rate=1e-3, seed=3)  # over tiny_run.TINY_RUN
HELDOUT_KEYS = ("heldout_accuracy_matrix", "heldout_pass_rate_matrix", "heldout_do_nothing_floor",
                "heldout_final_measures", "heldout_final_measures_pass_rate")


def _records(log_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


def _results_task_ids(path: Path) -> list[str]:
    return [task["id"] for task in json.loads(path.read_text())["tasks"]]


@pytest.mark.slow  # ~30 s: three tiny runs of two domains
def test_a_train_split_run_fills_a_heldout_matrix_and_a_resume_keeps_its_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    trainer = GRPOTrainer(tiny_config(**RUN, log_dir=str(tmp_path / "full")))
    full = trainer.train()
    for key in ("accuracy_matrix", "heldout_accuracy_matrix", "heldout_pass_rate_matrix"):
        assert len(full[key]) == 3 and all(v is not None for row in full[key] for v in row), key
    assert set(full["heldout_final_measures"]) == {"average_performance", "backward_transfer", "forgetting",
                                                    "forward_transfer"}
    # each floor is the do-nothing reward on its own split's evaluated tasks (they differ here)
    cfg = trainer.config
    expected = do_nothing_floor(trainer.policy, trainer.domains, "test", cfg.eval_max_tasks, cfg.user_max_turns)
    assert full["heldout_do_nothing_floor"] == expected != full["do_nothing_floor"]

    log_dir = tmp_path / "full"
    heldout = [r for r in _records(log_dir, "eval") if r["split"] == "test"]
    assert [(r["stage"], r["eval_domain"]) for r in heldout] == [
        (stage, name) for stage in range(3) for name in ("airline", "retail")
    ]
    assert all(r["split"] == "train" for r in _records(log_dir, "eval") if r not in heldout)
    for r in heldout:  # the matrix is made of these records
        assert full["heldout_accuracy_matrix"][r["stage"]][["airline", "retail"].index(r["eval_domain"])] == r["reward_mean"]
    assert [r["split"] for r in _records(log_dir, "transfer")] == ["train", "test", "train", "test"]
    for name, domain in trainer.domains.items():  # the held-out episodes are the test split's, in their own files
        assert _results_task_ids(log_dir / "eval_results" / f"after_task1_heldout_{name}.json") == [domain.test_tasks[0].id]
        assert _results_task_ids(log_dir / "eval_results" / f"after_task1_{name}.json") == [domain.train_tasks[0].id]
    log = (log_dir / "train.log").read_text()
    assert "[FLOOR] do-nothing reward on the test split (held-out): airline" in log
    assert log.count("[held-out test split]") == 2 and log.count("Held-out (test split):") == 3
    assert "=== Final Held-out Transfer Metrics (test split) ===" in log
    assert "Held-out mean reward (rows: model after each stage; columns: test split" in (log_dir / "report.txt").read_text()

    cut = tmp_path / "cut"
    trainer = GRPOTrainer(tiny_config(**RUN, log_dir=str(cut)))
    real = trainer.tracker.eval_progress

    def signal_during_the_last_heldout_evaluation(label, domain, done, total):
        real(label, domain, done, total)
        if (label, domain, done) == ("after_task1_heldout", "retail", 0):
            trainer.signals.signum = signal.SIGTERM  # as the handler does
    monkeypatch.setattr(trainer.tracker, "eval_progress", signal_during_the_last_heldout_evaluation)
    with pytest.raises(StoppedWithCheckpoint) as stop:
        trainer.train()
    saved = load_state(Path(stop.value.checkpoint))
    assert saved["heldout_reward_matrix"] == [*full["heldout_accuracy_matrix"][:2], [None, None]]

    resumed = GRPOTrainer(tiny_config(**RUN, log_dir=str(cut), resume_from=str(cut)))
    # rows 0 and 1 come from the checkpoint: the resumed run evaluates stage 2 alone
    assert resumed.evaluation.matrix.heldout.reward == saved["heldout_reward_matrix"]
    summary = resumed.train()
    for key in ("accuracy_matrix", "pass_rate_matrix", "final_measures", *HELDOUT_KEYS):
        assert summary[key] == full[key], key
    stages = [(r["stage"], r["split"], r["eval_domain"]) for r in _records(cut, "eval")]
    assert sorted(stages) == sorted(set(stages)) and len(stages) == 12  # each evaluation once


def test_test_task_ids_choose_the_heldout_tasks_a_run_evaluates(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    config = tiny_config(**RUN, log_dir=str(tmp_path), test_task_ids=["airline:19", "airline:6", "retail:90"])
    trainer = GRPOTrainer(config)
    try:
        assert [t.id for t in trainer.domains["airline"].test_tasks] == ["19", "6"]
        assert [t.id for t in trainer.domains["retail"].test_tasks] == ["90"]
        assert "cancel_pending_order" in trainer.domains["retail"].tool_names  # task 90's golden tool
        assert len(trainer.domains["airline"].train_tasks) == 2  # the train split is still capped
    finally:
        trainer.lock.release()
