"""`tau2cl report`: matrix rebuilt from metrics.jsonl, measures, PNGs, interrupted runs, comparison.

The synthetic runs are written by the real MetricsTracker (so the report reads what the trainer
writes) with hand-picked numbers; summary.json is written by hand in the trainer's layout.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tau2cl.cl.measures import transfer_metrics
from tau2cl.errors import UserError
from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting import report
from tau2cl.reporting.tracker import MetricsTracker

DOMAINS = ["airline", "retail", "telecom"]
STEPS = 4  # steps per domain; a periodic in-domain eval at step 2
# R[i][j]: mean reward on domain j after stage i (row 0: before training).
R = [
    [0.1, 0.2, 0.3],
    [0.6, 0.25, 0.35],
    [0.4, 0.7, 0.3],
    [0.35, 0.5, 0.8],
]
# After stage 3: ACC = (0.35+0.5+0.8)/3 = 0.55; BWT = ((0.35-0.6)+(0.5-0.7))/2 = -0.225;
# forgetting = ((0.6-0.35)+(0.7-0.5))/2 = 0.225; FWT = ((0.25-0.2)+(0.3-0.3))/2 = 0.025.
EXPECTED = {
    "average_performance": 0.55,
    "backward_transfer": -0.225,
    "forgetting": 0.225,
    "forward_transfer": 0.025,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary(domain: str, reward: float) -> EvalSummary:
    return EvalSummary(domain, reward, 0.1, reward / 2, 0.5, 4)


def write_run(
    log_dir: Path,
    matrix=R,
    *,
    stages: int = 3,
    partial_stage: int | None = None,
    summary: bool = True,
    cl_algorithm: str = "sequential",
) -> Path:
    """A run's metrics.jsonl as the trainer writes it, up to `stages` completed stages.

    partial_stage: also the first domain's eval of that stage (a run killed during it), and training
    steps of that stage's domain. Periodic in-domain evals read 0.9 so a mix-up with the matrix shows.
    """
    with MetricsTracker(str(log_dir), {}, use_progress_bar=False, stream=io.StringIO()) as tracker:
        tracker.log_initial_eval(0, {d: _summary(d, matrix[0][j]) for j, d in enumerate(DOMAINS)})
        global_step = 0
        for task_idx in range(max(stages, partial_stage or 0)):
            name = DOMAINS[task_idx]
            for step in range(1, STEPS + 1):
                global_step += 1
                stats = {"loss": 0.1, "reward_mean": 0.1 * step, "reward_std": 0.0, "kl": 0.0}
                tracker.log_train(task_idx, name, step, global_step, stats)
                if step == 2:
                    tracker.log_eval(task_idx, step, global_step, _summary(name, 0.9), name)
            stage = task_idx + 1
            evaluated = DOMAINS if stage <= stages else DOMAINS[:1]
            for j, d in enumerate(evaluated):
                s = _summary(d, matrix[stage][j])
                tracker.log_eval(task_idx, STEPS, global_step, s, name, echo=False, stage=stage)
    if summary:
        rows = [row if i <= stages else [None] * 3 for i, row in enumerate(matrix)]
        data = {
            "task_order": DOMAINS,
            "stages_completed": stages,
            "accuracy_matrix": rows,
            "pass_rate_matrix": [[None if v is None else v / 2 for v in row] for row in rows],
            "matrix_rows": ["before_training"] + [f"after_{d}" for d in DOMAINS],
            "final_measures": transfer_metrics(matrix, stages),
            "global_step": global_step,
            "config": {"cl_algorithm": cl_algorithm, "task_order": DOMAINS},
        }
        (log_dir / "summary.json").write_text(json.dumps(data), encoding="utf-8")
    return log_dir


def table_cells(text: str) -> dict[str, list[str]]:
    """The mean-reward table's cells by row label ("before", "after airline", ...)."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("Mean reward"))) + 2
    cells = {}
    for line in lines[start : start + len(DOMAINS) + 1]:
        *label, a, b, c = line.split()
        cells[" ".join(label)] = [a, b, c]
    return cells


def assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 100 and height > 100


# ----------------------------------------------------------------------------- a finished run


def test_finished_run_table_equals_summary_matrix_and_measures(tmp_path):
    run = report.load_run(write_run(tmp_path))
    assert run.reward_matrix == R
    assert run.last_stage == 3
    cells = table_cells(report.format_run_report(run))
    labels = ["before", "after airline", "after retail", "after telecom"]
    assert cells == {label: [f"{v:.3f}" for v in row] for label, row in zip(labels, R, strict=True)}
    measures = run.measures()
    assert measures == transfer_metrics(R, 3)
    assert measures == pytest.approx(EXPECTED)
    text = report.format_run_report(run)
    assert "  backward_transfer: -0.2250" in text and "  forward_transfer: 0.0250" in text
    assert "Stages completed: 3/3 (after telecom)" in text


def test_matrix_is_rebuilt_from_metrics_alone_and_ignores_periodic_evals(tmp_path):
    write_run(tmp_path, summary=False)
    run = report.load_run(tmp_path)
    assert run.domains == DOMAINS
    assert run.reward_matrix == R  # the periodic evals (0.9) are not in it
    assert run.pass_matrix == [[v / 2 for v in row] for row in R]
    assert sum(r["stage"] is None for r in run.evals) == 3  # but they are in the curves
    assert run.boundaries() == [(4, "airline"), (8, "retail"), (12, "telecom")]


def test_write_report_writes_readable_pngs_into_the_log_dir(tmp_path):
    write_run(tmp_path)
    files = report.write_report(tmp_path)
    assert files.accuracy_matrix == tmp_path / "accuracy_matrix.png"
    assert files.learning_curves == tmp_path / "learning_curves.png"
    for path in (files.accuracy_matrix, files.learning_curves):
        assert_png(path)
    import matplotlib.image

    assert matplotlib.image.imread(files.accuracy_matrix).size > 0
    assert "after telecom" in files.text.read_text()


def test_write_report_into_another_folder(tmp_path):
    write_run(tmp_path / "run")
    files = report.write_report(tmp_path / "run", tmp_path / "out")
    assert files.accuracy_matrix.parent == tmp_path / "out"
    assert_png(files.learning_curves)
    assert not (tmp_path / "run" / "accuracy_matrix.png").exists()


# ----------------------------------------------------------------------------- interrupted runs


def test_interrupted_run_during_stage_2_reports_what_it_reached(tmp_path):
    write_run(tmp_path, stages=1, partial_stage=2, summary=False)
    run = report.load_run(tmp_path)
    assert run.reward_matrix == [R[0], R[1], [R[2][0], None, None], [None] * 3]
    assert run.last_stage == 1  # row 2 is not complete
    text = report.format_run_report(run)
    cells = table_cells(text)
    assert cells["after retail"] == [f"{R[2][0]:.3f}", "-", "-"]
    assert cells["after telecom"] == ["-", "-", "-"]
    assert "Stages completed: 1/3 (after airline)" in text
    # After one stage ACC is R[1][0] and the rest are 0 by convention.
    assert run.measures() == {**transfer_metrics(R, 1), "average_performance": 0.6}
    files = report.write_report(tmp_path)
    assert_png(files.accuracy_matrix)
    assert_png(files.learning_curves)
    # retail's training ended (its stage evaluation had begun at global step 8).
    assert run.boundaries() == [(4, "airline"), (8, "retail")]


def test_run_interrupted_before_stage_1_has_n_a_measures(tmp_path):
    write_run(tmp_path, stages=0, summary=False)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"type": "train", "task_idx": 0, "dom')  # a line cut off by the crash
    run = report.load_run(tmp_path)
    assert run.last_stage is None
    assert run.measures() == dict.fromkeys(report.MEASURE_NAMES)
    text = report.format_run_report(run)
    assert "Stages completed: none" in text
    assert "  average_performance: n/a" in text and "  forgetting: n/a" in text
    assert table_cells(text)["after airline"] == ["-", "-", "-"]
    files = report.write_report(tmp_path)
    assert_png(files.accuracy_matrix)
    assert_png(files.learning_curves)


def test_incomplete_summary_defers_to_metrics(tmp_path):
    """summary.json of a killed run is one stage behind metrics.jsonl: the later stage counts."""
    write_run(tmp_path, stages=2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["stages_completed"] = 1
    summary["accuracy_matrix"][2] = [None] * 3
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    run = report.load_run(tmp_path)
    assert run.reward_matrix[:3] == R[:3] and run.last_stage == 2
    assert run.cl_algorithm == "sequential"


def test_resumed_run_repeats_are_counted_once(tmp_path):
    write_run(tmp_path, summary=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    # A resume re-runs steps after the last checkpoint: the repeated records are appended again.
    repeat = [json.loads(line) for line in lines if json.loads(line).get("global_step") == 12]
    for record in repeat:
        if record["type"] == "eval" and record["eval_domain"] == "telecom":
            record["reward_mean"] = 0.85
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in repeat)
    run = report.load_run(tmp_path)
    assert [r["global_step"] for r in run.trains] == list(range(1, 13))
    assert run.reward_matrix[3] == [0.35, 0.5, 0.85]  # the later record wins


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_missing_or_empty_log_dir_is_a_user_error(tmp_path, make):
    with pytest.raises(UserError) as error:
        report.load_run(make(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and message.endswith(".") and "\n" not in message


# ----------------------------------------------------------------------------- several runs

R_REPLAY = [
    [0.1, 0.2, 0.3],
    [0.6, 0.2, 0.3],
    [0.55, 0.65, 0.3],
    [0.5, 0.6, 0.7],
]


def parse_markdown(table: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    return [rows[0], *rows[2:]]  # without the alignment row


def test_comparison_table_has_one_correct_row_per_run(tmp_path):
    write_run(tmp_path / "a", cl_algorithm="sequential")
    write_run(tmp_path / "b", R_REPLAY, cl_algorithm="replay")
    runs = [report.load_run(tmp_path / "a"), report.load_run(tmp_path / "b")]
    header, *rows = parse_markdown(report.format_comparison(runs))
    assert header == ["run", "stages", "ACC", "BWT", "FWT", "forgetting", *DOMAINS]
    assert [row[0] for row in rows] == ["sequential (a)", "replay (b)"]
    for row, matrix in zip(rows, [R, R_REPLAY], strict=True):
        m = transfer_metrics(matrix, 3)
        names = ["average_performance", "backward_transfer", "forward_transfer", "forgetting"]
        assert row[1] == "3/3"
        assert row[2:6] == [f"{m[n]:.4f}" for n in names]
        assert row[6:] == [f"{v:.3f}" for v in matrix[3]]


def test_comparison_ends_with_the_do_nothing_floor_of_each_domain(tmp_path):
    for name, floor in (("a", {"airline": 0.5, "retail": 0.0, "telecom": 0.0}), ("b", {"airline": 0.5, "retail": 0.25})):
        path = write_run(tmp_path / name)
        summary = json.loads((path / "summary.json").read_text())
        (path / "summary.json").write_text(json.dumps({**summary, "do_nothing_floor": floor}))
    runs = [report.load_run(tmp_path / "a"), report.load_run(tmp_path / "b")]
    *_, floor = parse_markdown(report.format_comparison(runs))
    # runs agree on airline; retail's floors differ (other tasks evaluated); only run a has telecom's
    assert floor == ["do-nothing floor", "", "", "", "", "", "0.500", "varies", "0.000"]
    write_run(tmp_path / "c")  # a run without a floor adds no row
    assert len(parse_markdown(report.format_comparison([report.load_run(tmp_path / "c")]))) == 2


def test_comparison_of_an_interrupted_run_shows_n_a_and_dashes(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", stages=0, summary=False)
    runs = [report.load_run(tmp_path / "a"), report.load_run(tmp_path / "b")]
    _, _, row_b = parse_markdown(report.format_comparison(runs))
    assert row_b == ["b", "0/3", "n/a", "n/a", "n/a", "n/a", "-", "-", "-"]


def test_run_report_with_two_runs_writes_comparison_md_into_out(tmp_path):
    write_run(tmp_path / "a", cl_algorithm="sequential")
    write_run(tmp_path / "b", R_REPLAY, cl_algorithm="replay")
    out = io.StringIO()
    code = report.run_report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), out)
    assert code == 0
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "| sequential (a)" in markdown and "| replay (b)" in markdown
    assert "-0.2250" in markdown  # BWT of run a
    for name in ("a", "b"):  # per-run files go to OUT/<dir name>
        assert_png(tmp_path / "out" / name / "accuracy_matrix.png")
    assert "replay (b)" in out.getvalue() and "Comparison" in out.getvalue()


# ----------------------------------------------------------------------------- the command


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tau2cl", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def test_cli_reports_a_run(tmp_path):
    write_run(tmp_path / "run")
    result = run_cli(str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert table_cells(result.stdout)["after retail"] == [f"{v:.3f}" for v in R[2]]
    assert_png(tmp_path / "run" / "learning_curves.png")


def test_cli_missing_dir_is_one_line_exit_2(tmp_path):
    result = run_cli(str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("tau2cl: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "nope" in result.stderr
