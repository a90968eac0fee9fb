"""The line formats (reporting/formats.py) and MetricsTracker (reporting/tracker.py): example lines, the bar, files, wandb."""

from __future__ import annotations

import io
import json
import re
import sys
import types

import pytest

from tau2cl.errors import UserError
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting.formats import (
    format_banner,
    format_eval_detail,
    format_eval_line,
    format_final_summary,
    format_measures,
    format_postfix,
    format_train_detail,
    format_train_line,
    format_transfer_block,
    with_separator,
)
from tau2cl.reporting.tracker import MetricsTracker

RULE = "=" * 80
STATS = {
    "loss": 2.1234,
    "reward_mean": 0.456,
    "reward_std": 0.12,
    "kl": 0.0123,
    "clip_frac": 0.012,
    "grad_norm": 0.532,
    "lr": 1e-6,
    "time_rollout": 3.21,
    "time_reward": 0.4,
    "time_ref": 0.25,
    "time_update": 1.1,
    "num_tokens": 1234,
}
TRAIN_KEYS = {
    "type",
    "task_idx",
    "domain",
    "step",
    "global_step",
    "time",
    "loss",
    "reward_mean",
    "reward_std",
    "kl",
    "clip_frac",
    "grad_norm",
    "lr",
    "time_rollout",
    "time_reward",
    "time_ref",
    "time_update",
    "num_tokens",
}
# The example figures of the transfer display (airline 0.456 after its stage, 0.423 after retail).
AIRLINE_T0 = EvalSummary("airline", 0.456, 0.123, 0.456, 0.678, 40)
AIRLINE_T1 = EvalSummary("airline", 0.423, 0.134, 0.423, 0.654, 40)
RETAIL_T1 = EvalSummary("retail", 0.389, 0.145, 0.389, 0.623, 40)
EXAMPLE_MEASURES = {"backward_transfer": -0.033, "average_performance": 0.406, "forgetting": 0.033}
EXAMPLE_TRANSFER_BLOCK = """\
================================================================================
Backward Transfer Evaluation (after Task 1)
================================================================================
airline    | Reward: 0.423±0.134 | Pass: 42.3% | Tool Acc: 65.4%
retail     | Reward: 0.389±0.145 | Pass: 38.9% | Tool Acc: 62.3%

=== Transfer Metrics after Task 1 ===
  backward_transfer: -0.0330
  average_performance: 0.4060
  forgetting: 0.0330"""


def make_tracker(tmp_path, **kwargs) -> tuple[MetricsTracker, io.StringIO]:
    stream = io.StringIO()
    tracker = MetricsTracker(str(tmp_path / "run"), {"lr": 1e-6}, stream=stream, **kwargs)
    return tracker, stream


def read_jsonl(tmp_path) -> list[dict]:
    return [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]


# ---------------------------------------------------------------- line formats


def test_banner_format():
    assert format_banner(0, "airline", 80).split("\n") == [
        RULE,
        "Task 0: AIRLINE",
        RULE,
        "",
        "Training on 80 tasks from airline domain",
    ]


def test_postfix_format():
    assert format_postfix(STATS) == "loss: 2.1234, reward: 0.456, kl: 0.0123"


def test_eval_line_matches_seed():
    line = format_eval_line(0, 100, AIRLINE_T0, "airline")
    assert line == "[EVAL] Task 0 Step 100 | Reward: 0.456±0.123 | Pass: 45.6% | Tool Acc: 67.8%"


def test_eval_line_names_another_domain_and_missing_tool_accuracy():
    retail = EvalSummary("retail", 0.5, 0.25, 0.5, None, 4)
    line = format_eval_line(1, 20, retail, "telecom")
    assert (
        line == "[EVAL] Task 1 Step 20 | Reward: 0.500±0.250 | Pass: 50.0% | Tool Acc: n/a (retail)"
    )


def test_eval_detail_shows_pass_hat_k_and_custom_reward():
    s = EvalSummary("airline", 0.5, 0.5, 0.5, 0.6, 6, {1: 0.5, 2: 1 / 6, 3: 0.0}, 0.25)
    assert format_eval_detail(s) == (
        "        episodes 6 | pass^1 0.500 | pass^2 0.167 | pass^3 0.000 | custom reward 0.250"
    )


def test_train_line_and_detail():
    assert format_train_line(0, 10, 100, STATS) == (
        "[TRAIN] Task 0 Step 10/100 | loss: 2.1234 | reward: 0.456±0.120 | kl: 0.0123"
    )
    assert format_train_detail(STATS) == (
        "        time rollout 3.21s reward 0.40s ref 0.25s update 1.10s | clip 0.012 | grad_norm 0.532"
        " | lr 1.0e-06 | tokens 1234"
    )
    # a missing figure reads n/a instead of crashing a long run
    assert format_train_line(0, 1, None, {"loss": 1.0}) == (
        "[TRAIN] Task 0 Step 1 | loss: 1.0000 | reward: n/a±n/a | kl: n/a"
    )


def test_transfer_block_matches_seed_line_by_line():
    block = format_transfer_block(
        1, {"airline": AIRLINE_T1, "retail": RETAIL_T1}, ["airline", "retail"], EXAMPLE_MEASURES
    )
    assert block.split("\n") == EXAMPLE_TRANSFER_BLOCK.split("\n")


def test_transfer_block_order_unseen_and_forward_transfer():
    telecom = EvalSummary("telecom", 0.1, 0.2, 0.0, None, 5)
    measures = {
        "forward_transfer": 0.0,
        **EXAMPLE_MEASURES,
    }  # given out of order, printed in seed order
    summaries = {"airline": AIRLINE_T1, "retail": RETAIL_T1, "telecom": telecom}
    lines = format_transfer_block(1, summaries, ["airline", "retail"], measures).split("\n")
    assert lines[5] == "telecom    | Reward: 0.100±0.200 | Pass: 0.0% | Tool Acc: n/a (unseen)"
    assert lines[-4:] == [
        "  backward_transfer: -0.0330",
        "  average_performance: 0.4060",
        "  forgetting: 0.0330",
        "  forward_transfer: 0.0000",
    ]


def test_transfer_rows_align_to_a_long_domain_name():
    long = EvalSummary("a_long_domain_name", 0.5, 0.1, 0.5, 0.5, 2)
    lines = format_transfer_block(0, {"airline": AIRLINE_T1, long.domain: long}, [], {}).split("\n")
    assert lines[3].startswith("airline            | Reward")
    assert lines[4].startswith("a_long_domain_name | Reward")


def test_measures_none_reads_na():
    assert format_measures({"forgetting": None}) == ["  forgetting: n/a"]


def test_final_summary_table():
    matrix = [[0.1, 0.2, 0.3], [0.456, 0.25, None], [0.423, 0.389, None]]
    text = format_final_summary(["airline", "retail", "telecom"], matrix, EXAMPLE_MEASURES)
    assert text.split("\n")[4:9] == [
        "               airline  retail  telecom",
        "before           0.100   0.200    0.300",
        "after airline    0.456   0.250        -",
        "after retail     0.423   0.389        -",
        "",
    ]
    assert text.endswith("  forgetting: 0.0330")


def test_blocks_and_the_first_eval_line_after_other_output_get_a_blank_line_above():
    assert with_separator("Task 0: AIRLINE", "block", None) == "Task 0: AIRLINE"  # nothing above it yet
    assert with_separator("Task 0: AIRLINE", "block", "block") == "\nTask 0: AIRLINE"
    assert with_separator("[EVAL] Task 0", "eval", "train") == "\n[EVAL] Task 0"
    assert with_separator("[EVAL] Task 0", "eval", "bar") == "\n[EVAL] Task 0"
    assert with_separator("[EVAL] Task 0", "eval", "eval") == "[EVAL] Task 0"  # a run of [EVAL] lines
    for kind in ("train", "message", "progress"):
        assert with_separator("a line", kind, "block") == "a line"


# ---------------------------------------------------------------- tracker console


def test_bar_mode_keeps_eval_line_intact(tmp_path):
    tracker, stream = make_tracker(tmp_path, use_progress_bar=True)
    tracker.start_domain(0, "airline", 80, num_steps=5)
    for step in (1, 2, 3):
        tracker.log_train(0, "airline", step, step, STATS)
    tracker.log_eval(0, 3, 3, AIRLINE_T0, "airline")  # mid-domain: printed above a live bar
    for step in (4, 5):
        tracker.log_train(0, "airline", step, step, STATS)
    tracker.log_eval(0, 5, 5, AIRLINE_T0, "airline")  # after the finished bar
    tracker.end_domain()
    tracker.close()
    out = stream.getvalue()
    assert out.startswith(format_banner(0, "airline", 80) + "\n")
    eval_line = "[EVAL] Task 0 Step 3 | Reward: 0.456±0.123 | Pass: 45.6% | Tool Acc: 67.8%"
    # the bar redraws with \r; the eval line must be a segment of its own, not spliced into the bar
    assert eval_line in re.split(r"[\r\n]", out)
    assert "[TRAIN]" not in out  # the bar replaces the compact lines
    # the look: "100/100 [10:23<00:00, loss: ..., kl: ...]", then a blank line, then [EVAL]
    bar_end = r"5/5 \[\d\d:\d\d<00:00, loss: 2\.1234, reward: 0\.456, kl: 0\.0123\]"
    finished = bar_end + r"\n\n\[EVAL\] Task 0 Step 5 \|"
    assert re.search(finished, out)
    assert "Task 0 (airline): 100%|" in out


def test_compact_mode_prints_every_log_interval_and_the_last_step(tmp_path):
    tracker, stream = make_tracker(tmp_path, use_progress_bar=False, log_interval=3)
    tracker.start_domain(0, "airline", 80, num_steps=7)
    for step in range(1, 8):
        tracker.log_train(0, "airline", step, step, STATS)
    tracker.close()
    train_lines = [line for line in stream.getvalue().split("\n") if line.startswith("[TRAIN]")]
    assert [line.split(" | ")[0] for line in train_lines] == [
        "[TRAIN] Task 0 Step 3/7",
        "[TRAIN] Task 0 Step 6/7",
        "[TRAIN] Task 0 Step 7/7",
    ]
    assert "time rollout" not in stream.getvalue()
    assert "\r" not in stream.getvalue()  # no bar at all


def test_verbose_adds_detail_lines(tmp_path):
    tracker, stream = make_tracker(tmp_path, use_progress_bar=False, log_interval=1, verbose=True)
    tracker.start_domain(0, "airline", 80, num_steps=2)
    tracker.log_train(0, "airline", 1, 1, STATS)
    tracker.log_eval(
        0, 1, 1, EvalSummary("airline", 0.5, 0.5, 0.5, None, 6, {1: 0.5, 2: 0.25}), "airline"
    )
    tracker.close()
    lines = stream.getvalue().split("\n")
    i = lines.index("[TRAIN] Task 0 Step 1/2 | loss: 2.1234 | reward: 0.456±0.120 | kl: 0.0123")
    assert lines[i + 1] == format_train_detail(STATS)
    assert lines[i + 2] == ""  # blank line before the first [EVAL] after training output
    assert lines[i + 4] == "        episodes 6 | pass^1 0.500 | pass^2 0.250"


def test_log_message_and_transfer_print_through_the_bar(tmp_path):
    tracker, stream = make_tracker(tmp_path)
    tracker.start_domain(1, "retail", 60, num_steps=10)
    tracker.log_train(1, "retail", 1, 11, STATS)
    tracker.log_message("checkpoint saved")
    tracker.log_transfer(
        1, 11, {"airline": AIRLINE_T1, "retail": RETAIL_T1}, ["airline", "retail"], EXAMPLE_MEASURES
    )
    tracker.close()
    out = stream.getvalue()
    assert "checkpoint saved" in re.split(r"[\r\n]", out)
    assert EXAMPLE_TRANSFER_BLOCK in out


# ---------------------------------------------------------------- files


def test_jsonl_records_have_the_contract_keys(tmp_path):
    tracker, _ = make_tracker(tmp_path, use_progress_bar=False)
    tracker.start_domain(1, "retail", 60, num_steps=10)
    tracker.log_train(1, "retail", 1, 11, {**STATS, "extra/figure": 7})
    summary = EvalSummary("airline", 0.423, 0.134, 0.423, None, 40, {1: 0.423})
    tracker.log_eval(1, 10, 20, summary, "retail", split="train")
    measures = {**EXAMPLE_MEASURES, "forward_transfer": None}
    tracker.log_transfer(
        1, 20, {"airline": AIRLINE_T1, "retail": RETAIL_T1}, ["airline", "retail"], measures, split="train"
    )
    tracker.close()
    train, evaluation, transfer = read_jsonl(tmp_path)

    assert TRAIN_KEYS <= set(train) and train["extra/figure"] == 7
    assert (
        train["type"],
        train["task_idx"],
        train["domain"],
        train["step"],
        train["global_step"],
    ) == (
        "train",
        1,
        "retail",
        1,
        11,
    )
    assert isinstance(train["time"], float) and train["loss"] == 2.1234

    assert evaluation == {
        "type": "eval",
        "task_idx": 1,
        "domain": "retail",
        "eval_domain": "airline",
        "step": 10,
        "global_step": 20,
        "stage": None,
        "split": "train",
        "time": evaluation["time"],
        "reward_mean": 0.423,
        "reward_std": 0.134,
        "pass_rate": 0.423,
        "tool_accuracy": None,
        "num_episodes": 40,
        "pass_hat_k": {"1": 0.423},
        "custom_reward_mean": None,
    }

    assert (transfer["type"], transfer["task_idx"], transfer["domain"], transfer["step"]) == (
        "transfer",
        1,
        "retail",
        10,
    )
    assert transfer["global_step"] == 20 and transfer["split"] == "train"
    assert transfer["backward_transfer"] == -0.033 and transfer["forward_transfer"] is None
    assert transfer["scores"] == {"airline": 0.423, "retail": 0.389}


def test_jsonl_appends_on_resume_and_takes_numpy_and_torch_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    for global_step in (1, 2):  # two trackers on one log_dir: a run and its resume
        tracker, _ = make_tracker(tmp_path, use_progress_bar=False)
        stats = {"loss": torch.tensor(0.5), "kl": np.float32(0.25), "num_tokens": np.int64(3)}
        tracker.log_train(0, "airline", global_step, global_step, stats)
        tracker.close()
    records = read_jsonl(tmp_path)
    assert [r["global_step"] for r in records] == [1, 2]
    assert (records[0]["loss"], records[0]["kl"], records[0]["num_tokens"]) == (0.5, 0.25, 3)


def test_write_summary_is_atomic_json(tmp_path):
    tracker, _ = make_tracker(tmp_path)
    tracker.write_summary({"task_order": ["airline"], "matrix": [[0.1], [0.5]]})
    tracker.write_summary({"task_order": ["airline", "retail"]})  # replaces the old one
    tracker.close()
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == {"task_order": ["airline", "retail"]}
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "summary.json", "train.log"]


def test_the_log_file_gets_every_console_line_and_train_lines_under_the_bar(tmp_path):
    tracker, stream = make_tracker(tmp_path, use_progress_bar=True, log_interval=2)
    tracker.start_domain(0, "airline", 80, num_steps=2)
    tracker.log_train(0, "airline", 1, 1, STATS)
    tracker.log_train(0, "airline", 2, 2, STATS)
    tracker.log_message("warning: something to keep")
    tracker.close()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Task 0: AIRLINE" in log and "warning: something to keep" in log
    assert "[TRAIN] Task 0 Step 2/2 | loss: " in log and "Step 1/2" not in log
    assert "[TRAIN]" not in stream.getvalue()  # the console shows the bar instead


def test_non_main_tracker_writes_and_prints_nothing(tmp_path):
    tracker, stream = make_tracker(tmp_path, is_main=False, wandb_project="never-started")
    tracker.start_domain(0, "airline", 80, num_steps=2)
    tracker.log_train(0, "airline", 1, 1, STATS)
    tracker.log_eval(0, 1, 1, AIRLINE_T0, "airline")
    tracker.log_transfer(0, 1, {"airline": AIRLINE_T0}, ["airline"], EXAMPLE_MEASURES)
    tracker.log_final_summary(["airline"], [[0.1], [0.5]], EXAMPLE_MEASURES)
    tracker.log_message("hello")
    tracker.write_summary({"a": 1})
    tracker.end_domain()
    tracker.close()
    assert stream.getvalue() == ""
    assert not (tmp_path / "run").exists()
    assert tracker.wandb_run_id is None


def test_from_config_reads_the_logging_fields(tmp_path):
    config = types.SimpleNamespace(
        log_dir=str(tmp_path / "run"),
        use_progress_bar=False,
        sft_steps_per_task=7,
        log_interval=5,
        verbose=True,
        wandb_project=None,
        wandb_run_name=None,
        to_dict=lambda: {"seed": 0},
    )
    tracker = MetricsTracker.from_config(config, is_main=True, stream=io.StringIO())
    assert (tracker.use_progress_bar, tracker.log_interval, tracker.verbose) == (False, 5, True)
    assert tracker.sft_steps == 7
    tracker.close()
    assert (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- wandb


class FakeRun:
    def __init__(self, **init_kwargs):
        self.init_kwargs = init_kwargs
        self.id = init_kwargs["id"] or "fake123"
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, data, step=None):
        self.logged.append((data, step))

    def finish(self):
        self.finished = True


def test_wandb_namespaces_and_monotone_steps(tmp_path, monkeypatch):
    runs: list[FakeRun] = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker, _ = make_tracker(
        tmp_path, wandb_project="proj", wandb_run_name="name", wandb_run_id="abc"
    )
    tracker.start_domain(0, "airline", 80, num_steps=1)
    tracker.log_train(0, "airline", 1, 1, STATS)
    tracker.log_eval(
        0, 1, 1, EvalSummary("airline", 0.5, 0.1, 0.5, None, 4, {1: 0.5, 2: 0.25}), "airline"
    )
    tracker.log_transfer(
        0, 1, {"airline": AIRLINE_T0}, ["airline"], {"forgetting": 0.0, "forward_transfer": None}
    )
    tracker.log_final_summary(["airline"], [[0.1], [0.456]], {"forgetting": 0.0})
    tracker.close()
    (run,) = runs
    assert run.init_kwargs == {
        "project": "proj",
        "name": "name",
        "id": "abc",
        "resume": "allow",
        "config": {"lr": 1e-6},
        "dir": str(tmp_path / "run"),
    }
    assert tracker.wandb_run_id == "abc"
    (train, s1), (evaluation, s2), (transfer, s3) = run.logged
    assert (s1, s2, s3) == (1, 1, 1)
    assert train["train/loss"] == 2.1234 and train["train/num_tokens"] == 1234
    assert (
        evaluation["eval/airline/reward_mean"] == 0.5
        and evaluation["eval/airline/pass_hat_2"] == 0.25
    )
    assert "eval/airline/tool_accuracy" not in evaluation  # None is left out
    assert transfer == {"transfer/forgetting": 0.0, "transfer/airline/reward_mean": 0.456}
    assert run.summary == {"final/forgetting": 0.0}
    assert run.finished


def test_wandb_missing_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(UserError, match="wandb is not installed"):
        make_tracker(tmp_path, wandb_project="proj")


def test_wandb_offline_writes_a_run_dir_and_resumes_by_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker, _ = make_tracker(tmp_path, wandb_project="tau2cl-test", wandb_run_name="offline")
    run_id = tracker.wandb_run_id
    tracker.log_train(0, "airline", 1, 1, STATS)
    tracker.close()
    assert run_id
    run_dirs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1
    assert tracker.wandb_run_id == run_id  # still readable after close, for the checkpoint

    resumed, _ = make_tracker(tmp_path, wandb_project="tau2cl-test", wandb_run_id=run_id)
    assert resumed.wandb_run_id == run_id
    resumed.close()


def test_the_initial_header_comes_before_the_evaluation_and_the_rows_after_it(tmp_path):
    stream = io.StringIO()
    tracker = MetricsTracker(str(tmp_path), {}, use_progress_bar=False, stream=stream)
    tracker.announce_initial_eval()
    assert stream.getvalue().splitlines() == [RULE, "Evaluation before training (Task -)", RULE]
    tracker.eval_progress("before_training", "airline", 1, 1)  # the evaluation's own lines come next
    tracker.log_initial_eval(0, {"airline": AIRLINE_T0})
    lines = [line for line in stream.getvalue().splitlines() if line]
    assert lines.count("Evaluation before training (Task -)") == 1  # not repeated above the rows
    assert lines[3].startswith("[EVAL] airline (before_training): 1/1 episodes")
    assert lines[-1].startswith("airline    | Reward: ")
    tracker.close()
