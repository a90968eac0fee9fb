"""The accuracy matrix says which split it shows and carries the do-nothing floor as its last row."""

from __future__ import annotations

import json

from tau2cl.reporting.formats import FLOOR_LABEL, format_final_summary, format_matrix
from tau2cl.reporting.report import format_run_report
from tau2cl.reporting.run_data import load_run


def test_the_floor_is_a_last_row_under_the_matrix():
    lines = format_matrix(["airline", "retail"], [[0.1, 0.2], [0.5, None]], floor={"airline": 0.3, "retail": 0.05})
    assert lines[-1] == f"{FLOOR_LABEL:<13}    0.300   0.050"
    assert lines[-2].startswith("after airline") and lines[-2].endswith("-")
    assert len(format_matrix(["airline"], [[0.1], [0.5]])) == 3  # header + 2 rows: no floor row


def test_the_final_summary_names_the_split():
    text = format_final_summary(["airline"], [[0.1], [0.5]], {}, split="train", floor={"airline": 0.4})
    assert "columns: train split of each domain" in text and f"{FLOOR_LABEL}" in text and "0.400" in text


def test_the_report_reads_split_and_floor_from_the_summary(tmp_path):
    summary = {
        "task_order": ["airline"], "stages_completed": 1, "accuracy_matrix": [[0.0], [0.5]],
        "pass_rate_matrix": [[0.0], [0.5]], "eval_split": "train", "do_nothing_floor": {"airline": 0.25},
        "config": {"cl_algorithm": "sequential"},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = load_run(tmp_path)
    assert run.eval_split == "train" and run.floor == {"airline": 0.25}
    text = format_run_report(run)
    assert "columns: train split of each domain" in text and f"{FLOOR_LABEL}" in text and "0.250" in text
