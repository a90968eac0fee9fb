"""The held-out accuracy matrix (--heldout_eval) and the joint run read as the upper bound: measures,
line formats, the tracker's records, checkpoint entries, the report and the comparison table.

Hand-computed matrices, arithmetic in the comments. Runs are written by the real MetricsTracker, so
the report reads what the trainer writes; summary.json is written by hand in the trainer's layout.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tau2cl.cl.measures import reported_measures, transfer_metrics
from tau2cl.cl.strategies.registry import STRATEGIES
from tau2cl.config import parse_config
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.recipe.accuracy_matrix import AccuracyMatrix, summary_row_labels
from tau2cl.recipe.checkpointer import heldout_matrix_state, load_heldout_matrix
from tau2cl.reporting import report
from tau2cl.reporting.formats import (
    HeldoutResults,
    HeldoutStage,
    format_eval_line,
    format_final_summary,
    format_matrix,
    format_transfer_block,
)
from tau2cl.reporting.tracker import MetricsTracker

RULE = "=" * 80
DOMAINS = ["airline", "retail", "telecom"]
# The train-split matrix of a sequential run: after stage 3 ACC = (0.35+0.5+0.8)/3 = 0.55,
# BWT = ((0.35-0.6)+(0.5-0.7))/2 = -0.225, FWT = ((0.25-0.2)+(0.3-0.3))/2 = 0.025, forgetting = 0.225.
R = [[0.1, 0.2, 0.3], [0.6, 0.25, 0.35], [0.4, 0.7, 0.3], [0.35, 0.5, 0.8]]
# Its held-out (test split) matrix: after stage 3 ACC = (0.2+0.3+0.5)/3 = 0.3333...;
# BWT = ((0.2-0.3)+(0.3-0.4))/2 = -0.1; forgetting = ((max(0.3, 0.25)-0.2)+(0.4-0.3))/2 = 0.1;
# FWT = ((0.15-0.1)+(0.2-0.2))/2 = 0.025.
H = [[0.05, 0.1, 0.2], [0.3, 0.15, 0.2], [0.25, 0.4, 0.2], [0.2, 0.3, 0.5]]
H_MEASURES = {"average_performance": 1.0 / 3, "backward_transfer": -0.1, "forgetting": 0.1, "forward_transfer": 0.025}
# A joint run: ACC after stage 3 = (0.8+0.7+0.9)/3 = 0.8; held-out ACC = (0.5+0.4+0.6)/3 = 0.5.
J = [[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.7, 0.6, 0.5], [0.8, 0.7, 0.9]]
HJ = [[0.05, 0.1, 0.2], [0.3, 0.3, 0.3], [0.4, 0.4, 0.4], [0.5, 0.4, 0.6]]
FLOOR = {"airline": 0.5, "retail": 0.0, "telecom": 0.0}
HELDOUT_FLOOR = {"airline": 0.25, "retail": 0.125, "telecom": 0.0}
JOINT = next(name for name, entry in STRATEGIES.items() if entry.mixes_domains)


def _summary(domain: str, reward: float) -> EvalSummary:
    return EvalSummary(domain, reward, 0.1, reward / 2, 0.5, 4)


def _row(matrix, stage: int) -> dict[str, EvalSummary]:
    return {d: _summary(d, matrix[stage][j]) for j, d in enumerate(DOMAINS)}


def write_run(log_dir: Path, matrix, heldout=None, *, cl_algorithm="sequential", stages=3, summary=True) -> Path:
    """A run of `stages` completed stages on the train split, with `heldout` on the test split, as
    the trainer's tracker records it; summary.json in the trainer's layout (when `summary`)."""
    with MetricsTracker(str(log_dir), {}, use_progress_bar=False, stream=io.StringIO()) as tracker:
        held = None if heldout is None else HeldoutStage("test", _row(heldout, 0), {})
        tracker.log_initial_eval(0, _row(matrix, 0), "train", held)
        for stage in range(1, stages + 1):
            name = DOMAINS[stage - 1]
            tracker.log_train(stage - 1, name, 1, stage, {"loss": 0.1, "reward_mean": 0.5})
            for s in _row(matrix, stage).values():
                tracker.log_eval(stage - 1, 1, stage, s, name, echo=False, stage=stage, split="train")
            for s in ({} if heldout is None else _row(heldout, stage)).values():
                tracker.log_eval(stage - 1, 1, stage, s, name, echo=False, stage=stage, split="test", heldout=True)
    if summary:
        rows = [row if i <= stages else [None] * 3 for i, row in enumerate(matrix)]
        held_rows = None if heldout is None else [row if i <= stages else [None] * 3 for i, row in enumerate(heldout)]
        data = {
            "task_order": DOMAINS, "stages_completed": stages, "accuracy_matrix": rows,
            "pass_rate_matrix": [[None if v is None else v / 2 for v in row] for row in rows],
            "eval_split": "train", "do_nothing_floor": FLOOR,
            "heldout_accuracy_matrix": held_rows,
            "heldout_pass_rate_matrix": None if held_rows is None else [
                [None if v is None else v / 2 for v in row] for row in held_rows
            ],
            "heldout_do_nothing_floor": None if heldout is None else HELDOUT_FLOOR,
            "global_step": stages, "config": {"cl_algorithm": cl_algorithm, "task_order": DOMAINS},
        }
        (log_dir / "summary.json").write_text(json.dumps(data), encoding="utf-8")
    return log_dir


def parse_markdown(table: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    return [rows[0], *rows[2:]]  # without the alignment row


# ----------------------------------------------------------------------------- the flag


def test_heldout_eval_is_off_by_default_and_runs_beside_the_train_split():
    assert parse_config([]).heldout_eval is False
    config = parse_config(["--eval_split", "train", "--heldout_eval"])
    assert (config.eval_split, config.heldout_eval) == ("train", True)


# ----------------------------------------------------------------------------- measures


def test_a_run_that_mixes_domains_reports_acc_alone():
    joint = reported_measures(J, 3, mixes_domains=True)
    assert joint["average_performance"] == pytest.approx(0.8)  # (0.8+0.7+0.9)/3
    assert (joint["backward_transfer"], joint["forgetting"], joint["forward_transfer"]) == (None, None, None)
    # after stage 2: (0.7+0.6)/2 = 0.65, still only ACC
    assert reported_measures(J, 2, mixes_domains=True) == {
        "average_performance": pytest.approx(0.65), "backward_transfer": None, "forgetting": None,
        "forward_transfer": None,
    }
    assert reported_measures(H, 3) == pytest.approx(H_MEASURES)  # in order: all four
    assert reported_measures(R, 3) == transfer_metrics(R, 3)


def test_the_accuracy_matrix_fills_and_measures_its_heldout_twin():
    matrix = AccuracyMatrix.empty(3, heldout=True)
    assert matrix.heldout is not None and matrix.heldout.heldout is None
    assert matrix.heldout.last_filled_row() == -1
    for stage in range(3):
        matrix.fill(stage, DOMAINS, _row(R, stage))
        matrix.heldout.fill(stage, DOMAINS, _row(H, stage))
    assert matrix.heldout.last_filled_row() == 2 and matrix.heldout.reward[3] == [None] * 3
    matrix.heldout.fill(3, DOMAINS, _row(H, 3))
    measures, pass_measures = matrix.heldout.measures(3)
    assert measures == pytest.approx(H_MEASURES)
    assert pass_measures["average_performance"] == pytest.approx(1.0 / 6)  # pass rate = reward / 2 here
    assert matrix.measures(3, mixes_domains=True)[0]["backward_transfer"] is None
    assert AccuracyMatrix.empty(3).heldout is None


def test_summary_row_labels_name_the_parts_of_a_joint_run():
    assert summary_row_labels(DOMAINS[:2], False) == ["before_training", "after_airline", "after_retail"]
    assert summary_row_labels(DOMAINS[:2], True) == [
        "before_training", "after_part_1_of_2_all_domains", "after_part_2_of_2_all_domains"
    ]


# ----------------------------------------------------------------------------- checkpoints


def test_the_checkpoint_keeps_the_heldout_rows_and_an_old_one_still_loads():
    saved = AccuracyMatrix.empty(2, heldout=True)
    saved.heldout.reward[0], saved.heldout.pass_rate[0] = [0.25, 0.5], [0.0, 0.5]
    state = heldout_matrix_state(saved)
    assert state == {"heldout_reward_matrix": [[0.25, 0.5], [None, None], [None, None]],
                     "heldout_pass_matrix": [[0.0, 0.5], [None, None], [None, None]]}
    resumed = AccuracyMatrix.empty(2, heldout=True)
    load_heldout_matrix(resumed, state)
    assert resumed.heldout.reward[0] == [0.25, 0.5] and resumed.heldout.pass_rate[0] == [0.0, 0.5]
    old = AccuracyMatrix.empty(2, heldout=True)
    load_heldout_matrix(old, {"reward_matrix": [[0.1, 0.2]]})  # saved before held-out matrices existed
    assert old.heldout.reward == [[None, None]] * 3
    assert heldout_matrix_state(AccuracyMatrix.empty(2)) == {}


# ----------------------------------------------------------------------------- line formats


def test_the_heldout_eval_line_is_marked():
    line = format_eval_line(0, 100, _summary("airline", 0.3), "airline", "test")
    assert line == "[EVAL] Task 0 Step 100 | Reward: 0.300±0.100 | Pass: 15.0% | Tool Acc: 50.0% [held-out test split]"
    other = format_eval_line(1, 100, _summary("airline", 0.3), "retail", "test")
    assert other.endswith("Tool Acc: 50.0% (airline) [held-out test split]")


def test_the_transfer_block_shows_the_heldout_rows_and_measures_after_the_others():
    summaries = {"airline": _summary("airline", 0.6), "retail": _summary("retail", 0.25)}
    heldout = HeldoutStage("test", {"airline": _summary("airline", 0.3), "retail": _summary("retail", 0.15)},
                           {"average_performance": 0.3, "backward_transfer": 0.0})
    block = format_transfer_block(0, summaries, ["airline"], {"average_performance": 0.6}, heldout)
    assert block.splitlines() == [
        RULE,
        "Backward Transfer Evaluation (after Task 0)",
        RULE,
        "airline    | Reward: 0.600±0.100 | Pass: 30.0% | Tool Acc: 50.0%",
        "retail     | Reward: 0.250±0.100 | Pass: 12.5% | Tool Acc: 50.0% (unseen)",
        "",
        "Held-out (test split):",
        "airline    | Reward: 0.300±0.100 | Pass: 15.0% | Tool Acc: 50.0%",
        "retail     | Reward: 0.150±0.100 | Pass: 7.5% | Tool Acc: 50.0% (unseen)",
        "",
        "=== Transfer Metrics after Task 0 ===",
        "  average_performance: 0.6000",
        "=== Held-out Transfer Metrics (test split) after Task 0 ===",
        "  backward_transfer: 0.0000",
        "  average_performance: 0.3000",
    ]


def test_a_joint_runs_block_and_matrix_name_parts_not_domains():
    summaries = {"airline": _summary("airline", 0.5), "retail": _summary("retail", 0.5)}
    measures = reported_measures([[0.1, 0.2], [0.5, 0.5]], 1, mixes_domains=True)
    block = format_transfer_block(0, summaries, ["airline", "retail"], measures, mixes_domains=True).splitlines()
    assert block[1] == "Evaluation after part 1/2 (all domains)"
    assert "(unseen)" not in "\n".join(block)
    assert block[-5:] == [
        "=== Transfer Metrics after part 1/2 (all domains) ===",
        "  backward_transfer: n/a",
        "  average_performance: 0.5000",
        "  forgetting: n/a",
        "  forward_transfer: n/a",
    ]
    lines = format_matrix(["airline", "retail"], [[0.1, 0.2], [0.5, 0.5], [0.7, None]], mixes_domains=True)
    assert [line.split("  ")[0].strip() for line in lines[1:]] == [
        "before", "after part 1/2 (all domains)", "after part 2/2 (all domains)"
    ]
    assert lines[3].endswith("0.700       -")


def test_the_final_summary_puts_the_heldout_matrix_and_its_measures_under_the_main_ones():
    heldout = HeldoutResults("test", [[0.05], [0.3]], {"average_performance": 0.3}, {"airline": 0.25})
    text = format_final_summary(["airline"], [[0.1], [0.6]], {"average_performance": 0.6}, "train",
                                {"airline": 0.5}, heldout=heldout)
    assert text.splitlines()[3:] == [
        "Accuracy matrix (rows: model after each stage; columns: train split of each domain)",
        "               airline",
        "before           0.100",
        "after airline    0.600",
        "do-nothing       0.500",
        "",
        "Held-out accuracy matrix (rows: model after each stage; columns: test split of each domain)",
        "               airline",
        "before           0.050",
        "after airline    0.300",
        "do-nothing       0.250",
        "",
        "=== Final Transfer Metrics ===",
        "  average_performance: 0.6000",
        "=== Final Held-out Transfer Metrics (test split) ===",
        "  average_performance: 0.3000",
    ]


# ----------------------------------------------------------------------------- the tracker


def test_the_tracker_records_each_split_and_shows_the_heldout_matrix_at_the_end(tmp_path):
    stream = io.StringIO()
    tracker = MetricsTracker(str(tmp_path), {}, use_progress_bar=False, stream=stream)
    heldout_results = HeldoutResults("test", [[0.05, 0.1], [0.3, 0.15], [None, None]], {}, None)
    tracker.describe_matrix(mixes_domains=True, heldout_results=lambda: heldout_results)
    row0 = {"airline": _summary("airline", 0.1), "retail": _summary("retail", 0.2)}
    held0 = {"airline": _summary("airline", 0.05), "retail": _summary("retail", 0.1)}
    tracker.log_initial_eval(0, row0, "train", HeldoutStage("test", held0, {}))
    tracker.log_transfer(0, 2, row0, ["airline", "retail"], {"average_performance": 0.1}, "train",
                         HeldoutStage("test", held0, {"average_performance": 0.05}))
    tracker.log_final_summary(["airline", "retail"], [[0.1, 0.2], [0.5, 0.5], [None, None]], {}, "train")
    tracker.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["eval_domain"], r["stage"], r["split"], r["reward_mean"]) for r in records if r["type"] == "eval"]
    assert evals == [("airline", 0, "train", 0.1), ("retail", 0, "train", 0.2),
                     ("airline", 0, "test", 0.05), ("retail", 0, "test", 0.1)]
    transfers = [(r["split"], r["average_performance"], r["scores"]) for r in records if r["type"] == "transfer"]
    assert transfers == [("train", 0.1, {"airline": 0.1, "retail": 0.2}),
                         ("test", 0.05, {"airline": 0.05, "retail": 0.1})]
    out = stream.getvalue()
    assert "Held-out (test split):\nairline    | Reward: 0.050±0.100" in out
    assert "Evaluation after part 1/2 (all domains)" in out
    final = out[out.index("Final Summary"):]
    assert "after part 1/2 (all domains)    0.300   0.150" in final
    assert "Held-out accuracy matrix (rows: model after each stage; columns: test split" in final


# ----------------------------------------------------------------------------- the report


def test_the_report_reads_both_matrices_and_shows_the_heldout_one_with_its_floor(tmp_path):
    run = report.load_run(write_run(tmp_path / "a", R, H))
    assert run.eval_split == "train" and run.reward_matrix == R and run.heldout_reward_matrix == H
    assert run.heldout_floor == HELDOUT_FLOOR and run.heldout_split == "test"
    assert run.measures() == pytest.approx(transfer_metrics(R, 3))
    assert run.heldout_measures() == pytest.approx(H_MEASURES)
    text = report.format_run_report(run)
    held = text[text.index("Held-out mean reward"):]
    assert held.splitlines()[0] == "Held-out mean reward (rows: model after each stage; columns: test split of each domain)"
    assert "after telecom    0.200   0.300    0.500" in held
    assert "do-nothing       0.250   0.125    0.000" in held
    assert "Held-out pass rate" in held and "Transfer measures on held-out mean reward (after stage 3)" in held
    assert "  backward_transfer: -0.1000" in held and "  average_performance: 0.3333" in held
    assert text.index("Transfer measures on mean reward") < text.index("Held-out mean reward")
    assert [e["split"] for e in run.evals] == ["train"] * 12  # the learning curves see one split
    assert_png(report.write_report(tmp_path / "a").accuracy_matrix)


def test_an_interrupted_runs_heldout_matrix_is_rebuilt_from_its_records(tmp_path):
    run = report.load_run(write_run(tmp_path / "a", R, H, stages=2, summary=False))
    assert run.eval_split == "train"  # no summary: a train-split record says so
    assert run.reward_matrix[:3] == R[:3] and run.reward_matrix[3] == [None] * 3
    assert run.heldout_reward_matrix[:3] == H[:3] and run.heldout_reward_matrix[3] == [None] * 3
    # after stage 2: ACC = (0.25+0.4)/2 = 0.325, BWT = 0.25-0.3 = -0.05
    assert run.heldout_measures()["average_performance"] == pytest.approx(0.325)
    assert run.heldout_measures()["backward_transfer"] == pytest.approx(-0.05)
    plain = report.load_run(write_run(tmp_path / "b", R))
    assert plain.heldout_reward_matrix is None and "Held-out" not in report.format_run_report(plain)


def test_a_joint_runs_report_names_parts_and_gives_acc_alone(tmp_path):
    run = report.load_run(write_run(tmp_path / "j", J, cl_algorithm=JOINT))
    assert run.mixes_domains
    text = report.format_run_report(run)
    assert "Stages completed: 3/3 (after part 3/3 (all domains))" in text
    assert "after part 2/3 (all domains)    0.700   0.600    0.500" in text
    assert "  average_performance: 0.8000" in text and "  backward_transfer: n/a" in text
    assert "  forgetting: n/a" in text and "  forward_transfer: n/a" in text
    assert report.MIXED_NOTE in text
    summary = json.loads((tmp_path / "j" / "summary.json").read_text())
    summary["config"]["cl_algorithm"] = "sequential"  # the same matrix read in order: all four measures
    (tmp_path / "j" / "summary.json").write_text(json.dumps(summary))
    assert report.load_run(tmp_path / "j").measures()["backward_transfer"] == pytest.approx(
        ((0.8 - 0.5) + (0.7 - 0.6)) / 2
    )


def test_the_comparison_reads_every_run_against_the_joint_upper_bound(tmp_path):
    runs = [
        report.load_run(write_run(tmp_path / "a", R, H)),
        report.load_run(write_run(tmp_path / "j", J, HJ, cl_algorithm=JOINT)),
    ]
    header, row_a, row_j, floor = parse_markdown(report.format_comparison(runs))
    assert header == ["run", "stages", "ACC", "BWT", "FWT", "forgetting", "held-out ACC",
                      f"ACC − {JOINT}", f"held-out ACC − {JOINT}", *DOMAINS]
    # a: ACC 0.55 - 0.8 = -0.25; held-out 0.3333 - 0.5 = -0.1667
    assert row_a == ["sequential (a)", "3/3", "0.5500", "-0.2250", "0.0250", "0.2250", "0.3333",
                     "-0.2500", "-0.1667", "0.350", "0.500", "0.800"]
    assert row_j == [f"{JOINT} (j) [{JOINT}: upper bound]", "3/3", "0.8000", "n/a", "n/a", "n/a", "0.5000",
                     "", "", "0.800", "0.700", "0.900"]
    assert floor == ["do-nothing floor", "", "", "", "", "", "", "", "", "0.500", "0.000", "0.000"]


def test_several_joint_runs_give_their_mean_and_say_so(tmp_path):
    j2 = [*J[:3], [0.6, 0.6, 0.6]]  # ACC 0.6, no held-out matrix
    runs = [
        report.load_run(write_run(tmp_path / "a", R, H)),
        report.load_run(write_run(tmp_path / "j", J, HJ, cl_algorithm=JOINT)),
        report.load_run(write_run(tmp_path / "j2", j2, cl_algorithm=JOINT)),
    ]
    header, row_a, _, row_j2, _ = parse_markdown(report.format_comparison(runs))
    # ACC bound = (0.8 + 0.6)/2 = 0.7: a gets 0.55 - 0.7 = -0.15; held-out bound = j's 0.5 alone
    assert header[6:9] == ["held-out ACC", f"ACC − {JOINT} (mean of 2)", f"held-out ACC − {JOINT}"]
    assert row_a[6:9] == ["0.3333", "-0.1500", "-0.1667"]
    assert row_j2[6] == "n/a"  # no held-out matrix


def test_without_a_joint_run_or_heldout_matrix_the_table_keeps_its_columns(tmp_path):
    runs = [report.load_run(write_run(tmp_path / "a", R)), report.load_run(write_run(tmp_path / "b", J))]
    header, row_a, row_b, _ = parse_markdown(report.format_comparison(runs))
    assert header == ["run", "stages", "ACC", "BWT", "FWT", "forgetting", *DOMAINS]
    assert row_b[0] == "sequential (b)" and row_b[3] == "0.2000"  # BWT = ((0.8-0.5)+(0.7-0.6))/2


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
