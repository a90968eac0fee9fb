"""Report of finished or interrupted runs: accuracy-matrix table, CL measures, plots, run comparison.

The run is read back by run_data.py (its metrics.jsonl and summary.json); the pictures are drawn
in plots.py; the text uses the console's matrix and measure formats (formats.py). A run with a
held-out evaluation (--heldout_eval) shows its held-out matrix, floor and measures after the main
ones. In the comparison a run whose strategy mixes all domains in every stage (joint training) is
the upper bound: its row says so and every other run gets its ACC minus the bound's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tau2cl.reporting.formats import format_matrix, format_measures, stage_row_label
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


MIXED_NOTE = "  (every stage trains on all domains mixed: only average_performance is defined)"


def format_run_report(run: RunData) -> str:
    """The per-run text: matrices (rows: stages, columns: domains) and the last stage's measures;
    then the held-out ones, when the run has them."""
    k = run.last_stage
    total = len(run.domains)
    stage_text = "none" if k is None else f"{k}/{total} ({stage_row_label(k, run.domains, run.mixes_domains)})"
    lines = [
        f"Run: {run.name}  [{run.log_dir}]",
        f"Stages completed: {stage_text}; global step {_fmt(run.global_step, 'd')}",
        "",
        *_matrix_section(run, "", run.eval_split, run.reward_matrix, run.pass_matrix, run.floor, k, run.measures()),
    ]
    if run.heldout_reward_matrix is not None:
        lines += [
            "",
            *_matrix_section(run, "Held-out ", run.heldout_split, run.heldout_reward_matrix,
                             run.heldout_pass_matrix, run.heldout_floor, run.heldout_last_stage, run.heldout_measures()),
        ]
    return "\n".join(lines)


def _matrix_section(
    run: RunData, prefix: str, split: str, rewards: list, passes: list | None, floor: dict | None,
    k: int | None, measures: dict,
) -> list[str]:
    """One split's mean-reward matrix with its floor, its pass-rate matrix, its measures."""
    mean = f"{prefix}mean reward" if prefix else "Mean reward"
    lines = [
        f"{mean} (rows: model after each stage; columns: {split} split of each domain)",
        *format_matrix(run.domains, rewards, floor, run.mixes_domains),
    ]
    if passes is not None and any(v is not None for row in passes for v in row):
        lines += ["", f"{prefix}pass rate" if prefix else "Pass rate",
                  *format_matrix(run.domains, passes, None, run.mixes_domains)]
    where = "no stage completed" if k is None else f"after stage {k}"
    lines += ["", f"Transfer measures on {prefix.lower()}mean reward ({where})", *format_measures(measures)]
    return lines + ([MIXED_NOTE] if run.mixes_domains else [])


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


UPPER_BOUND = "upper bound"
HELDOUT_ACC = "held-out ACC"


def _acc(run: RunData) -> float | None:
    return run.measures()["average_performance"]


def _heldout_acc(run: RunData) -> float | None:
    return run.heldout_measures()["average_performance"]


def _na(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def run_label(run: RunData) -> str:
    """The run's name in the comparison; a run that mixes all domains in every stage is the upper bound."""
    return f"{run.name} [{run.cl_algorithm}: {UPPER_BOUND}]" if run.mixes_domains else run.name


@dataclass(frozen=True)
class BoundColumn:
    """A column "<figure> − <bound>": each run's figure minus the mean of the upper-bound runs' figures."""

    header: str
    figure: Callable[[RunData], float | None]
    bound: float | None

    def cell(self, run: RunData) -> str:
        if run.mixes_domains:
            return ""  # the bound itself
        value = self.figure(run)
        return "n/a" if value is None or self.bound is None else f"{value - self.bound:+.4f}"


def bound_columns(runs: Sequence[RunData], heldout: bool) -> list[BoundColumn]:
    """"ACC − joint" (and, when a bound run has a held-out matrix and `heldout`, "held-out ACC −
    joint") when some run mixes all domains; with several such runs their mean, said in the header."""
    bounds = [run for run in runs if run.mixes_domains]
    if not bounds:
        return []
    name = "/".join(dict.fromkeys(str(run.cl_algorithm) for run in bounds))
    figures = [("ACC", _acc)] + ([(HELDOUT_ACC, _heldout_acc)] if heldout and any(r.has_heldout for r in bounds) else [])
    columns = []
    for label, figure in figures:
        known = [v for v in map(figure, bounds) if v is not None]
        mean = f" (mean of {len(known)})" if len(known) > 1 else ""
        columns.append(BoundColumn(f"{label} − {name}{mean}", figure, sum(known) / len(known) if known else None))
    return columns


def comparison_rows(runs: Sequence[RunData]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: run, stages, ACC, BWT, FWT, forgetting, held-out ACC (when a run has one),
    ACC − joint (when a run mixes all domains; see bound_columns), final-stage reward per domain; a
    last row gives the do-nothing floor per domain (when the runs recorded one)."""
    domains: list[str] = []
    for run in runs:
        domains += [d for d in run.domains if d not in domains]
    heldout = any(run.has_heldout for run in runs)
    bounds = bound_columns(runs, heldout)
    extra = ([HELDOUT_ACC] if heldout else []) + [column.header for column in bounds]
    header = ["run", "stages", *MEASURE_LABELS, *extra, *domains]
    rows = []
    for run in runs:
        k, measures = run.last_stage, run.measures()
        final = dict(zip(run.domains, run.reward_matrix[k], strict=True)) if k is not None else {}
        rows.append(
            [
                run_label(run),
                f"{k or 0}/{len(run.domains)}",
                *(_na(measures[n], ".4f") for n in MEASURE_NAMES),
                *([_na(_heldout_acc(run), ".4f")] if heldout else []),
                *(column.cell(run) for column in bounds),
                *(_fmt(final.get(d), ".3f") for d in domains),
            ]
        )
    floor = floor_cells(runs, domains)
    if floor is not None:
        rows.append([FLOOR_ROW, "", *("" for _ in [*MEASURE_NAMES, *extra]), *floor])
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
