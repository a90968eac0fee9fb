"""End to end: `python -m tau2cl.train` on the tiny model over airline → retail → telecom."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tau2cl.cl.measures import transfer_metrics
from tau2cl.env import tau2_compat  # noqa: F401
from tiny_run import tiny_flags

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
# over tiny_run.TINY_RUN: each domain's full prompt, two turns, every task evaluated
E2E = dict(compact_domains=False, max_new_tokens=16, max_turns=2, eval_max_tasks=None)


def _train(tmp: Path, **overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    flags = tiny_flags(**{**E2E, **overrides, "log_dir": str(tmp)})
    return subprocess.run(
        [sys.executable, "-m", "tau2cl.train", *flags], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    result = _train(
        log_dir, task_order=["airline", "retail", "telecom"], learning_rate=1e-3, kl_coef=0.04, use_progress_bar=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return log_dir, result.stdout


def _records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_train_eval_and_transfer_records(full_run):
    log_dir, _ = full_run
    records = _records(log_dir)
    train = [r for r in records if r["type"] == "train"]
    assert [(r["task_idx"], r["step"]) for r in train] == [(i, s) for i in range(3) for s in (1, 2)]
    assert [r["global_step"] for r in train] == list(range(1, 7))
    for key in ("loss", "reward_mean", "reward_std", "kl", "clip_frac", "grad_norm", "lr", "advantage_abs_mean",
                "time_rollout", "time_reward", "time_ref", "time_update"):
        assert all(key in r for r in train), key
    # a step's advantages are all 0 exactly when every group is flat
    assert all((r["advantage_abs_mean"] == 0) == (r["frac_reward_zero_std"] == 1) for r in train)
    assert all(r[key] >= 0 for r in train for key in ("time_rollout", "time_reward", "time_ref", "time_update"))
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 4 * 3  # rows 0..3 of the matrix, every domain
    assert len([r for r in records if r["type"] == "transfer"]) == 3


def test_summary_matrix_and_measures_follow_from_each_other(full_run):
    log_dir, _ = full_run
    summary = json.loads((log_dir / "summary.json").read_text())
    matrix = summary["accuracy_matrix"]
    assert summary["task_order"] == ["airline", "retail", "telecom"]
    assert len(matrix) == 4 and all(len(row) == 3 for row in matrix)
    assert all(v is not None for row in matrix for v in row)
    assert summary["final_measures"] == pytest.approx(transfer_metrics(matrix, 3))
    evals = {(r["stage"], r["eval_domain"]): r["reward_mean"] for r in _records(log_dir) if r["type"] == "eval"}
    for stage in range(4):
        for j, name in enumerate(summary["task_order"]):
            assert matrix[stage][j] == pytest.approx(evals[(stage, name)])


def test_parameters_move_under_a_varying_custom_reward(full_run):
    from safetensors.torch import load_file

    from tau2cl.agent.policy import load_model

    log_dir, _ = full_run
    train = [r for r in _records(log_dir) if r["type"] == "train"]
    assert any(r["grad_norm"] > 0 for r in train)
    start = load_model("tiny", "float32", "cpu").state_dict()
    after = [load_file(str(log_dir / f"checkpoint_task_{i}" / "model.safetensors")) for i in range(3)]
    moved = [sum(float((a[k] - b[k]).abs().max()) for k in b) for a, b in zip([start, *after[:-1]], after, strict=True)]
    assert all(m > 0 for m in moved), moved  # every domain's steps changed the weights


def test_checkpoints_load_with_from_pretrained(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log_dir, _ = full_run
    for i in range(3):
        path = log_dir / f"checkpoint_task_{i}"
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)


def test_results_files_are_rescored_identically_by_tau2(full_run):
    from tau2.data_model.simulation import Results
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

    log_dir, _ = full_run
    files = sorted((log_dir / "eval_results").glob("*.json"))
    assert len(files) == 4 * 3
    assert (log_dir / "accuracy_matrix.png").stat().st_size > 0 and (log_dir / "learning_curves.png").exists()
    for path in files[:6]:
        results = Results.load(path)
        tasks = {t.id: t for t in results.tasks}
        domain = path.stem.rsplit("_", 1)[-1]
        for sim in results.simulations:
            again = evaluate_simulation(sim, tasks[sim.task_id], EvaluationType.ALL, domain == "telecom", domain)
            assert again.reward == pytest.approx(sim.reward_info.reward)


EXAMPLE_LINES = [
    r"^={80}$",
    r"^Task 0: AIRLINE$",
    r"^Training on 2 tasks from airline domain$",
    r"^\[EVAL\] Task 0 Step 2 \| Reward: \d\.\d{3}±\d\.\d{3} \| Pass: \d+\.\d% \| Tool Acc: (\d+\.\d%|n/a)$",
    r"^Backward Transfer Evaluation \(after Task 1\)$",
    r"^airline    \| Reward: \d\.\d{3}±\d\.\d{3} \| Pass: \d+\.\d% \| Tool Acc: (\d+\.\d%|n/a)$",
    r"^=== Transfer Metrics after Task 1 ===$",
    r"^  backward_transfer: -?\d\.\d{4}$",
    r"^  average_performance: -?\d\.\d{4}$",
    r"^  forgetting: -?\d\.\d{4}$",
]


def test_console_output_with_the_bar_matches_the_documented_format(full_run):
    _, stdout = full_run
    lines = stdout.replace("\r", "\n").splitlines()
    for pattern in EXAMPLE_LINES:
        assert any(re.match(pattern, line) for line in lines), pattern
    bar = r"Task 0 \(airline\): 100%\|.*\| 2/2 \[.*, loss: -?\d+\.\d{4}, reward: \d\.\d{3}, kl: -?\d\.\d{4}\]"
    assert re.search(bar, stdout)


def test_console_output_without_the_bar_prints_compact_lines(tmp_path):
    result = _train(tmp_path, compact_domains=True, max_tasks_per_domain=1, log_interval=2, reward_fn="tau2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "\r" not in out and "it/s" not in out
    assert re.search(r"^\[TRAIN\] Task 0 Step 2/2 \| loss: -?\d+\.\d{4} \| reward: \d\.\d{3}±\d\.\d{3} \| kl: ", out, re.M)
    assert not re.search(r"^\[TRAIN\] Task 0 Step 1/2", out, re.M)  # only every log_interval steps
    assert "Training on 1 tasks from retail domain" in out
    assert "=== Transfer Metrics after Task 1 ===" in out
