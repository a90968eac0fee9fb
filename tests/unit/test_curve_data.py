"""The learning curves' data (reporting/curve_data.py): each domain's warm-start steps, then its GRPO
steps, on one step axis; every series at the x the plot draws it.

The runs are written by the real MetricsTracker, so the data is read from what a trainer writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting import report
from tau2cl.reporting.curve_data import DomainSpan, curve_data
from tau2cl.reporting.run_data import load_run
from tau2cl.reporting.tracker import MetricsTracker

DOMAINS = ["airline", "retail"]
SFT, GRPO = 3, 2  # steps per domain
# Made-up figures: warm-start loss and token accuracy per step, the GRPO steps' mean reward.
SFT_LOSS = {0: [4.0, 2.0, 1.0], 1: [3.0, 1.5, 0.5]}
SFT_ACCURACY = {0: [0.2, 0.4, 0.6], 1: [0.5, 0.7, 0.9]}
TRAIN_REWARD = {0: [0.25, 0.5], 1: [0.75, 1.0]}
# Stage evaluations (rows of the matrix) and one mid-domain evaluation of retail after its GRPO step 1.
STAGES = [{"airline": 0.0, "retail": 0.1}, {"airline": 0.8, "retail": 0.2}, {"airline": 0.5, "retail": 0.9}]
MID_RETAIL = 0.6


def _eval(domain: str, reward: float) -> EvalSummary:
    return EvalSummary(domain, reward, 0.0, reward, None, 2)


def write_run(log_dir: Path, *, sft: int = SFT, stop_in_retail_sft: int | None = None, config: bool = True) -> Path:
    """Two domains of `sft` warm-start steps then GRPO steps, as the trainer logs them; or stopped
    during retail's warm start after `stop_in_retail_sft` steps."""
    with MetricsTracker(str(log_dir), {}, use_progress_bar=False, stream=io.StringIO()) as tracker:
        tracker.log_initial_eval(0, {d: _eval(d, STAGES[0][d]) for d in DOMAINS})
        global_step = 0
        for i, name in enumerate(DOMAINS):
            for step in range(1, sft + 1):
                if i == 1 and stop_in_retail_sft is not None and step > stop_in_retail_sft:
                    break
                stats = {"loss": SFT_LOSS[i][step - 1], "token_accuracy": SFT_ACCURACY[i][step - 1]}
                tracker.log_sft(i, name, step, sft, global_step, stats)  # global_step stays: GRPO's count
            if i == 1 and stop_in_retail_sft is not None:
                break
            for step in range(1, GRPO + 1):
                global_step += 1
                stats = {"loss": 0.1, "reward_mean": TRAIN_REWARD[i][step - 1], "reward_std": 0.0, "kl": 0.0}
                tracker.log_train(i, name, step, global_step, stats)
                if i == 1 and step == 1:
                    tracker.log_eval(i, step, global_step, _eval("retail", MID_RETAIL), name)
            for d in DOMAINS:
                tracker.log_eval(i, GRPO, global_step, _eval(d, STAGES[i + 1][d]), name, echo=False, stage=i + 1)
    if config:
        settings = {"task_order": DOMAINS, "sft_steps_per_task": sft, "num_steps_per_task": GRPO}
        (log_dir / "summary.json").write_text(json.dumps({"task_order": DOMAINS, "config": settings}))
    return log_dir


def test_each_domain_spans_its_warm_start_then_its_grpo_steps(tmp_path):
    data = curve_data(load_run(write_run(tmp_path)))
    assert data.spans == [
        DomainSpan(0, "airline", start=0, sft_steps=3, grpo_steps=2, finished=True),
        DomainSpan(1, "retail", start=5, sft_steps=3, grpo_steps=2, finished=True),
    ]
    assert [(s.switch, s.end) for s in data.spans] == [(3, 5), (8, 10)]


def test_every_series_sits_at_its_steps_on_the_axis(tmp_path):
    data = curve_data(load_run(write_run(tmp_path)))
    assert data.has_warm_start
    assert data.sft_loss == {"airline": ([1, 2, 3], [4.0, 2.0, 1.0]), "retail": ([6, 7, 8], [3.0, 1.5, 0.5])}
    assert data.sft_token_accuracy == {"airline": ([1, 2, 3], [0.2, 0.4, 0.6]), "retail": ([6, 7, 8], [0.5, 0.7, 0.9])}
    assert data.train_reward == {"airline": ([4, 5], [0.25, 0.5]), "retail": ([9, 10], [0.75, 1.0])}
    # Before training at 0; each stage evaluation where its domain's training ends; retail's
    # mid-domain evaluation after its first GRPO step (8 + 1).
    assert data.eval_reward == {
        "airline": ([0, 5, 10], [0.0, 0.8, 0.5]),
        "retail": ([0, 5, 9, 10], [0.1, 0.2, 0.6, 0.9]),
    }
    assert data.stage_reward["retail"] == ([0, 5, 10], [0.1, 0.2, 0.9])


def test_without_the_configured_counts_the_recorded_steps_give_the_spans(tmp_path):
    with_config = curve_data(load_run(write_run(tmp_path / "a")))
    without = curve_data(load_run(write_run(tmp_path / "b", config=False)))
    assert without.spans == with_config.spans and without.eval_reward == with_config.eval_reward


def test_a_run_stopped_in_a_warm_start_shows_the_steps_it_took(tmp_path):
    data = curve_data(load_run(write_run(tmp_path / "a", stop_in_retail_sft=2)))
    assert data.spans[1] == DomainSpan(1, "retail", start=5, sft_steps=3, grpo_steps=2, finished=False)
    assert data.sft_loss["retail"] == ([6, 7], [3.0, 1.5]) and "retail" not in data.train_reward
    unknown = curve_data(load_run(write_run(tmp_path / "b", stop_in_retail_sft=2, config=False)))
    assert unknown.spans[1] == DomainSpan(1, "retail", start=5, sft_steps=2, grpo_steps=0, finished=False)


def test_a_resumed_warm_start_counts_each_step_once_with_its_last_record(tmp_path):
    log_dir = write_run(tmp_path)
    with MetricsTracker(str(log_dir), {}, use_progress_bar=False, stream=io.StringIO()) as tracker:
        tracker.log_sft(1, "retail", 2, SFT, 2, {"loss": 1.25, "token_accuracy": 0.75})  # step 2 again
    data = curve_data(load_run(log_dir))
    assert data.sft_loss["retail"] == ([6, 7, 8], [3.0, 1.25, 0.5])


def test_without_a_warm_start_the_axis_is_the_global_step(tmp_path):
    run = load_run(write_run(tmp_path, sft=0))
    data = curve_data(run)
    assert not data.has_warm_start and data.sft_loss == {}
    assert [(s.start, s.switch, s.end) for s in data.spans] == [(0, 0, 2), (2, 2, 4)]
    assert data.train_reward["retail"][0] == [r["global_step"] for r in run.trains if r["domain"] == "retail"] == [3, 4]
    assert data.eval_reward["retail"][0] == [0, 2, 3, 4]


def test_the_learning_curves_png_is_written_for_a_run_with_a_warm_start(tmp_path):
    files = report.write_report(write_run(tmp_path))
    assert files.learning_curves.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
