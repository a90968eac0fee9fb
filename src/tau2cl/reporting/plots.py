"""The report's pictures: the accuracy-matrix heatmap and the per-domain learning curves.

matplotlib's object API (Figure + Agg canvas), imported lazily, so neither the CLI's start-up nor a
trainer's pyplot state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tau2cl.reporting.formats import FLOOR_LABEL
from tau2cl.reporting.run_data import MEASURE_LABELS, MEASURE_NAMES, RunData


def _figure(width: float, height: float):
    """A figure on the Agg canvas without pyplot: no global backend switch, no GUI, no leaks."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _row_labels(domains: Sequence[str]) -> list[str]:
    return ["before"] + [f"after {d}" for d in domains]


def _measures_line(run: RunData) -> str:
    measures = run.measures()
    cells = (
        f"{label} {'n/a' if measures[n] is None else format(measures[n], '.3f')}"
        for label, n in zip(MEASURE_LABELS, MEASURE_NAMES, strict=True)
    )
    stage = "no stage completed" if run.last_stage is None else f"after stage {run.last_stage}"
    return f"{' | '.join(cells)}  ({stage})"


def plot_accuracy_matrix(run: RunData, path: Path) -> Path:
    """Heatmap of the reward matrix, each cell annotated; grey '-' where a stage was not reached."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = [list(row) for row in run.reward_matrix]
    labels = _row_labels(run.domains)[: len(rows)]
    if run.floor is not None:  # the do-nothing floor as a last row
        rows.append([run.floor.get(d) for d in run.domains])
        labels.append(FLOOR_LABEL)
    values = np.array(
        [[math.nan if v is None else float(v) for v in row] for row in rows],
        dtype=float,
    )  # (T+1, T), (T+2, T) with the floor
    finite = values[np.isfinite(values)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    num_rows, num_cols = values.shape
    fig = _figure(2.6 + 1.25 * num_cols, 1.6 + 0.55 * num_rows)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(num_rows):
        for j in range(num_cols):
            value = values[i, j]
            if math.isnan(value):
                ax.text(j, i, "-", ha="center", va="center", color="#555555")
                continue
            dark = (value - vmin) / (vmax - vmin or 1.0) < 0.6  # viridis is dark at the low end
            ax.text(
                j, i, f"{value:.3f}", ha="center", va="center", color="white" if dark else "black"
            )
    # Outline R[c+1][c]: each domain right after training on it (the diagonal below row 0).
    for c in range(min(num_cols, len(run.reward_matrix) - 1)):
        ax.add_patch(Rectangle((c - 0.5, c + 0.5), 1, 1, fill=False, lw=2, ec="red"))
    ax.set_xticks(range(num_cols), labels=run.domains)
    ax.set_yticks(range(num_rows), labels=labels)
    ax.set_xlabel(f"domain ({run.eval_split} split)")
    ax.set_ylabel("model")
    ax.set_title(
        f"{run.name}: mean {run.eval_split} reward (red: right after training on the domain)\n"
        f"{_measures_line(run)}",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="mean reward")
    fig.savefig(path)
    return path


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points, same length as values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _points(records: list[dict], key: str = "reward_mean") -> tuple[list[int], list[float]]:
    kept = [
        r
        for r in records
        if isinstance(r.get(key), (int, float)) and isinstance(r.get("global_step"), int)
    ]
    return [r["global_step"] for r in kept], [float(r[key]) for r in kept]


def _plot_rewards(ax, run: RunData, name: str, color: str) -> list[float]:
    """The domain's training reward (steps trained on it) and its eval rewards; returns the values."""
    steps, train = _points([r for r in run.trains if r.get("domain") == name])
    if steps:
        ax.plot(steps, train, color="0.6", lw=0.8, alpha=0.7, label="train reward (batch mean)")
        if len(steps) >= 40:
            smooth = _moving_average(train, max(2, len(steps) // 20))
            ax.plot(steps, smooth, color="0.3", lw=1.2, label="train reward (moving mean)")
    evals = [r for r in run.evals if r.get("eval_domain") == name]
    steps, rewards = _points(evals)
    if steps:
        ax.plot(
            steps, rewards, color=color, lw=1.5, marker="o", ms=3, label=f"eval reward ({run.eval_split} split)"
        )
        stage_steps, stage_rewards = _points([r for r in evals if r.get("stage") is not None])
        ax.plot(
            stage_steps,
            stage_rewards,
            ls="none",
            marker="s",
            ms=7,
            mfc="none",
            mec=color,
            label="stage evaluation",
        )
    return train + rewards


def _plot_boundaries(ax, run: RunData, name: str, color: str) -> None:
    """Dashed line where each domain's training ended; the panel's own domain's span shaded."""
    start = 0
    for step, domain in run.boundaries():
        if domain == name:
            ax.axvspan(start, step, color=color, alpha=0.08, lw=0)
        ax.axvline(step, color="black", ls="--", lw=0.8)
        label = f"{domain} done "
        ax.text(
            step,
            0.97,
            label,
            rotation=90,
            ha="right",
            va="top",
            fontsize=7,
            transform=ax.get_xaxis_transform(),
        )
        start = step


def _plot_domain_panel(ax, run: RunData, name: str, color: str) -> None:
    values = _plot_rewards(ax, run, name, color)
    _plot_boundaries(ax, run, name, color)
    if not values:
        ax.text(
            0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="0.5"
        )
    ax.set_ylim(min([0.0, *values]) - 0.05, max([1.0, *values]) + 0.05)  # rewards live in [0, 1]
    ax.set_ylabel(f"{name}\nreward")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_learning_curves(run: RunData, path: Path) -> Path:
    """One panel per eval domain: reward over global_step, dashed lines where each domain ended."""
    extra = [r.get("eval_domain") for r in run.evals if r.get("eval_domain")]
    names = list(dict.fromkeys([*run.domains, *extra])) or ["(no domain)"]
    fig = _figure(9.0, 0.8 + 2.3 * len(names))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        _plot_domain_panel(ax, run, name, f"C{i}")
    axes[-1].set_xlabel("global step")
    fig.suptitle(
        f"{run.name}: reward during training (shaded: the domain's own training)", fontsize=10
    )
    fig.savefig(path)
    return path


# ---------------------------------------------------------------- files and the command
