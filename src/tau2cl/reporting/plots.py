"""The report's pictures: the accuracy-matrix heatmap and the learning curves (the warm start's
loss and token accuracy, each domain's reward), drawn from curve_data's series.

matplotlib's object API (Figure + Agg canvas), imported lazily, so neither the CLI's start-up nor a
trainer's pyplot state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tau2cl.reporting.curve_data import CurveData, curve_data
from tau2cl.reporting.formats import FLOOR_LABEL, stage_row_label
from tau2cl.reporting.run_data import MEASURE_LABELS, MEASURE_NAMES, Matrix, RunData


def _figure(width: float, height: float):
    """A figure on the Agg canvas without pyplot: no global backend switch, no GUI, no leaks."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _row_labels(domains: Sequence[str], mixes_domains: bool = False) -> list[str]:
    return [stage_row_label(i, domains, mixes_domains) for i in range(len(domains) + 1)]


def _measures_line(measures: dict, last_stage: int | None) -> str:
    cells = (
        f"{label} {'n/a' if measures[n] is None else format(measures[n], '.3f')}"
        for label, n in zip(MEASURE_LABELS, MEASURE_NAMES, strict=True)
    )
    stage = "no stage completed" if last_stage is None else f"after stage {last_stage}"
    return f"{' | '.join(cells)}  ({stage})"


def plot_accuracy_matrix(run: RunData, path: Path) -> Path:
    """Heatmap of the reward matrix, each cell annotated; grey '-' where a stage was not reached.
    With a held-out matrix, its heatmap beside the first."""
    panels = [(run.reward_matrix, run.floor, run.eval_split, run.measures(), run.last_stage, "")]
    if run.heldout_reward_matrix is not None:
        panels.append((run.heldout_reward_matrix, run.heldout_floor, run.heldout_split, run.heldout_measures(),
                       run.heldout_last_stage, "held-out "))
    has_floor = run.floor is not None or run.heldout_floor is not None
    num_cols, num_rows = len(run.domains), len(run.reward_matrix) + has_floor
    fig = _figure((2.6 + 1.25 * num_cols) * len(panels), 1.6 + 0.55 * num_rows)
    for i, (matrix, floor, split, measures, last_stage, prefix) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _draw_matrix(fig, ax, run, matrix, floor)
        ax.set_xlabel(f"domain ({split} split)")
        red = "" if run.mixes_domains else " (red: right after training on the domain)"
        ax.set_title(f"{run.name}: mean {prefix}{split} reward{red}\n{_measures_line(measures, last_stage)}", fontsize=9)
    fig.savefig(path)
    return path


def _draw_matrix(fig, ax, run: RunData, matrix: Matrix, floor: dict | None) -> None:
    """One matrix's annotated heatmap on `ax`, its floor as a last row, with a colour bar."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = [list(row) for row in matrix]
    labels = _row_labels(run.domains, run.mixes_domains)[: len(rows)]
    if floor is not None:  # the do-nothing floor as a last row
        rows.append([floor.get(d) for d in run.domains])
        labels.append(FLOOR_LABEL)
    values = np.array(
        [[math.nan if v is None else float(v) for v in row] for row in rows],
        dtype=float,
    )  # (T+1, T), (T+2, T) with the floor
    finite = values[np.isfinite(values)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    num_rows, num_cols = values.shape
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
    # Outline R[c+1][c]: each domain right after training on it (the diagonal below row 0); a run
    # that trains on all domains in every stage has no such moment.
    for c in range(0 if run.mixes_domains else min(num_cols, len(matrix) - 1)):
        ax.add_patch(Rectangle((c - 0.5, c + 0.5), 1, 1, fill=False, lw=2, ec="red"))
    ax.set_xticks(range(num_cols), labels=run.domains)
    ax.set_yticks(range(num_rows), labels=labels)
    ax.set_ylabel("model")
    fig.colorbar(image, ax=ax, label="mean reward")


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points, same length as values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _legend(ax) -> None:
    """The panel's legend to the right of it, off the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_rewards(ax, data: CurveData, run: RunData, name: str, color: str) -> list[float]:
    """The domain's training reward (its GRPO steps) and its eval rewards; returns the values."""
    steps, train = data.train_reward.get(name, ([], []))
    if steps:
        few = len(steps) < 40  # a short run's few steps as dots, so they show beside the boundaries
        ax.plot(steps, train, color="0.6", lw=0.8, alpha=0.7, marker="." if few else None,
                label="train reward (batch mean)")
        if len(steps) >= 40:
            smooth = _moving_average(train, max(2, len(steps) // 20))
            ax.plot(steps, smooth, color="0.3", lw=1.2, label="train reward (moving mean)")
    steps, rewards = data.eval_reward.get(name, ([], []))
    if steps:
        ax.plot(
            steps, rewards, color=color, lw=1.5, marker="o", ms=3, label=f"eval reward ({run.eval_split} split)"
        )
        stage_steps, stage_rewards = data.stage_reward.get(name, ([], []))
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


def _mark_spans(ax, data: CurveData, shade: str | None = None, color: str = "0.5") -> None:
    """Dashed where a domain's training ended (its stage evaluation), dotted where its warm start
    handed over to GRPO; the span of domain `shade` shaded."""
    for span in data.spans:
        if span.domain == shade:
            ax.axvspan(span.start, span.end, color=color, alpha=0.08, lw=0)
        if span.sft_steps and span.grpo_steps:
            ax.axvline(span.switch, color="0.4", ls=":", lw=0.8)
        if span.finished:
            ax.axvline(span.end, color="black", ls="--", lw=0.8)


def _name_spans(ax, data: CurveData) -> None:
    """Each trained domain's name above the top panel, centred on its span: off the data."""
    if not data.spans:
        return
    top = ax.secondary_xaxis("top")
    top.set_xticks(
        [(span.start + span.end) / 2 for span in data.spans],
        labels=[f"{span.domain} (task {span.domain_idx})" for span in data.spans],
    )
    top.tick_params(length=0, labelsize=8)


def _plot_reward_panel(ax, data: CurveData, run: RunData, name: str, color: str) -> None:
    values = _plot_rewards(ax, data, run, name, color)
    _mark_spans(ax, data, shade=name, color=color)
    if not values:
        ax.text(
            0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="0.5"
        )
    ax.set_ylim(min([0.0, *values]) - 0.05, max([1.0, *values]) + 0.05)  # rewards live in [0, 1]
    ax.set_ylabel(f"{name}\nreward")
    ax.grid(alpha=0.3)
    _legend(ax)


def _plot_warm_start(loss_ax, accuracy_ax, data: CurveData, colors: dict[str, str]) -> None:
    """The supervised steps' loss (log scale when every value is positive) and token accuracy."""
    losses = [y for _, ys in data.sft_loss.values() for y in ys]
    for name, (steps, loss) in data.sft_loss.items():
        loss_ax.plot(steps, loss, color=colors.get(name, "0.3"), lw=1.2, label=name)
    for name, (steps, accuracy) in data.sft_token_accuracy.items():
        accuracy_ax.plot(steps, accuracy, color=colors.get(name, "0.3"), lw=1.2, label=name)
    if losses and min(losses) > 0:
        loss_ax.set_yscale("log")
    accuracy_ax.set_ylim(-0.05, 1.05)
    loss_ax.set_ylabel("warm start\nloss")
    accuracy_ax.set_ylabel("warm start\ntoken accuracy")
    for ax in (loss_ax, accuracy_ax):
        _mark_spans(ax, data)
        ax.grid(alpha=0.3)
    _legend(loss_ax)  # the domains' colours, the same in every panel


def plot_learning_curves(run: RunData, path: Path) -> Path:
    """The warm start's loss and token accuracy (when the run had one), then one reward panel per
    eval domain, over one step axis: each domain's supervised steps, then its GRPO steps."""
    data = curve_data(run)
    extra = [r.get("eval_domain") for r in run.evals if r.get("eval_domain")]
    names = list(dict.fromkeys([*run.domains, *extra])) or ["(no domain)"]
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    heights = [1.6, 1.6] * data.has_warm_start + [2.1] * len(names)
    fig = _figure(9.5, 1.0 + sum(heights))
    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    if data.has_warm_start:
        _plot_warm_start(axes[0], axes[1], data, colors)
    for ax, name in zip(axes[len(axes) - len(names) :], names, strict=True):
        _plot_reward_panel(ax, data, run, name, colors[name])
    _name_spans(axes[0], data)
    key = "dashed: a domain's training ends (its stage evaluation); shaded: the panel's domain's training"
    if data.has_warm_start:
        axes[-1].set_xlabel("step: each domain's supervised warm-start steps, then its GRPO steps")
        key = f"dotted: warm start → GRPO; {key}"
    else:
        axes[-1].set_xlabel("global step")
    fig.suptitle(f"{run.name}: learning curves\n{key}", fontsize=9)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------- files and the command
