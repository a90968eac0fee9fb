"""Report of finished or interrupted runs: accuracy-matrix table, CL measures, plots, run comparison.

The run is read back by run_data.py (its metrics.jsonl and summary.json); the pictures are drawn
in plots.py; the text uses the console's matrix and measure formats (formats.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tau2cl.reporting.formats import format_matrix, format_measures
from tau2cl.reporting.plots import plot_accuracy_matrix, plot_learning_curves
from tau2cl.reporting.run_data import MEASURE_LABELS, MEASURE_NAMES, RunData, load_run
from tau2cl.runs.files import CURVES_PNG, MATRIX_PNG, REPORT_TXT

COMPARISON_MD = "comparison.md"

@dataclass(frozen=True)
class ReportFiles:
    """Paths of the files one run's report wrote."""

    accuracy_matrix: Path  # heatmap PNG
    learning_curves: Path  # reward over global_step PNG
    text: Path  # the printed report, as report.txt


# ---------------------------------------------------------------- text


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_run_report(run: RunData) -> str:
    """The per-run text: matrices (rows: stages, columns: domains) and the last stage's measures."""
    k = run.last_stage
    total = len(run.domains)
    stage_text = "none" if k is None else f"{k}/{total} (after {run.domains[k - 1]})"
    lines = [
        f"Run: {run.name}  [{run.log_dir}]",
        f"Stages completed: {stage_text}; global step {_fmt(run.global_step, 'd')}",
        "",
        f"Mean reward (rows: model after each stage; columns: {run.eval_split} split of each domain)",
        *format_matrix(run.domains, run.reward_matrix, run.floor),
    ]
    if any(v is not None for row in run.pass_matrix for v in row):
        lines += ["", "Pass rate", *format_matrix(run.domains, run.pass_matrix)]
    where = "no stage completed" if k is None else f"after stage {k}"
    lines += ["", f"Transfer measures on mean reward ({where})", *format_measures(run.measures())]
    return "\n".join(lines)


FLOOR_ROW = "do-nothing floor"


def floor_cells(runs: Sequence[RunData], domains: list[str]) -> list[str] | None:
    """Each domain's do-nothing floor, as the runs recorded it: the value when every run that has
    one agrees, "varies" when they evaluated different tasks; None when no run has a floor."""
    floors = [run.floor for run in runs if run.floor]
    if not floors:
        return None
    cells = []
    for d in domains:
        values = {f[d] for f in floors if d in f}
        cells.append("-" if not values else f"{values.pop():.3f}" if len(values) == 1 else "varies")
    return cells


def comparison_rows(runs: Sequence[RunData]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: run, stages, ACC, BWT, FWT, forgetting, final-stage reward per domain; a
    last row gives the do-nothing floor per domain (when the runs recorded one)."""
    domains: list[str] = []
    for run in runs:
        domains += [d for d in run.domains if d not in domains]
    header = ["run", "stages", *MEASURE_LABELS, *domains]
    rows = []
    for run in runs:
        k, measures = run.last_stage, run.measures()
        final = dict(zip(run.domains, run.reward_matrix[k], strict=True)) if k is not None else {}
        rows.append(
            [
                run.name,
                f"{k or 0}/{len(run.domains)}",
                *("n/a" if measures[n] is None else f"{measures[n]:.4f}" for n in MEASURE_NAMES),
                *(_fmt(final.get(d), ".3f") for d in domains),
            ]
        )
    floor = floor_cells(runs, domains)
    if floor is not None:
        rows.append([FLOOR_ROW, "", *("" for _ in MEASURE_NAMES), *floor])
    return header, rows


def format_comparison(runs: Sequence[RunData]) -> str:
    """Markdown table, one row per run; cells padded so it also reads well in a terminal."""
    header, rows = comparison_rows(runs)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    # Markdown alignment row: run names left, numbers right.
    rule = (
        "|"
        + "|".join(("-" * (w + 2)) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# ---------------------------------------------------------------- plots


def _write_run_files(run: RunData, out_dir: Path) -> ReportFiles:
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = out_dir / REPORT_TXT
    text_path.write_text(format_run_report(run) + "\n", encoding="utf-8")
    return ReportFiles(
        accuracy_matrix=plot_accuracy_matrix(run, out_dir / MATRIX_PNG),
        learning_curves=plot_learning_curves(run, out_dir / CURVES_PNG),
        text=text_path,
    )


def write_report(
    log_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> ReportFiles:
    """Write report.txt, accuracy_matrix.png and learning_curves.png of a run into out_dir (default:
    the log dir). What the trainer calls on rank 0 at the end of training; prints nothing."""
    run = load_run(log_dir)
    return _write_run_files(run, Path(out_dir) if out_dir is not None else Path(log_dir))


def _run_out_dirs(runs: Sequence[RunData], out: Path | None) -> list[Path]:
    """Where each run's files go: its log dir; with --out and one run, OUT; with several, OUT/<dir>."""
    if out is None:
        return [run.log_dir for run in runs]
    if len(runs) == 1:
        return [out]
    dirs: list[Path] = []
    for run in runs:
        base = run.log_dir.resolve().name or "run"
        candidate, n = out / base, 2
        while candidate in dirs:
            candidate, n = out / f"{base}-{n}", n + 1
        dirs.append(candidate)
    return dirs


def run_report(log_dirs: Sequence[str], out: str | None = None, stream=None) -> int:
    """The `tau2cl report` command: each run's text and files, then the comparison of several."""
    stream = stream if stream is not None else sys.stdout
    # All runs are read first, so a bad dir fails before any file is written.
    runs = [load_run(d) for d in log_dirs]
    out_path = Path(out) if out is not None else None
    for i, (run, out_dir) in enumerate(zip(runs, _run_out_dirs(runs, out_path), strict=True)):
        files = _write_run_files(run, out_dir)
        if i:
            print("", file=stream)
        print(format_run_report(run), file=stream)
        print(f"Wrote {files.accuracy_matrix}, {files.learning_curves}, {files.text}", file=stream)
    if len(runs) > 1:
        table = format_comparison(runs)
        md_dir = out_path if out_path is not None else Path.cwd()
        md_dir.mkdir(parents=True, exist_ok=True)
        md_path = md_dir / COMPARISON_MD
        md_path.write_text(f"# Run comparison\n\n{table}\n", encoding="utf-8")
        print(
            f"\nComparison (final stage; reward columns = mean reward on each run's eval split)\n{table}", file=stream
        )
        print(f"Wrote {md_path}", file=stream)
    return 0
