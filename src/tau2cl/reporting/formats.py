"""The console's line formats, each a pure function of numbers and names (tests compare strings).

Banners, the step bar's label and figures, compact train lines, `[EVAL]` rows, aligned domain rows,
the transfer block, the accuracy matrix and the final summary, and the blank lines between them; the
tracker (tracker.py) decides when they are written and hands them to its writers.

With a held-out evaluation (--heldout_eval) the stage blocks and the final summary carry a second set
of rows, measures and matrix for the held-out split, each under a "Held-out" heading. A run whose
stages mix all domains names its rows by part ("after part 1/3 (all domains)"), not by domain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tau2cl.evaluation.stats import EvalSummary

RULE = "=" * 80
NAME_WIDTH = 10  # domain column of the transfer rows: "airline    | Reward: ..."
DETAIL_INDENT = " " * 8
# The transfer block prints the measures in this order; any other key follows in the order given.
MEASURE_ORDER = ("backward_transfer", "average_performance", "forgetting", "forward_transfer")
Matrix = Sequence[Sequence[float | None]]


@dataclass(frozen=True)
class HeldoutStage:
    """One stage's held-out evaluation: each domain's figures and the measures after the stage
    (empty for the evaluation before training)."""

    split: str
    summaries: Mapping[str, EvalSummary]
    measures: Mapping[str, float | None]


@dataclass(frozen=True)
class HeldoutResults:
    """The held-out matrix as it stands, for the final summary."""

    split: str
    matrix: Matrix
    measures: Mapping[str, float | None]
    floor: Mapping[str, float] | None


def part_name(stage: int, num_domains: int) -> str:
    """Stage `stage` (1-based) of a run whose every stage trains on all domains mixed."""
    return f"part {stage}/{num_domains} (all domains)"


def stage_row_label(stage: int, domains: Sequence[str], mixes_domains: bool = False) -> str:
    """An accuracy-matrix row's name: "before", "after airline"; "after part 1/3 (all domains)" for
    a run whose stages mix all domains (its rows follow one mixed stream, not a domain order)."""
    if stage == 0:
        return "before"
    if mixes_domains:
        return f"after {part_name(stage, len(domains))}"
    return f"after {domains[stage - 1]}" if stage <= len(domains) else f"after stage {stage}"


def heldout_heading(split: str) -> str:
    return f"Held-out ({split} split):"


# ---------------------------------------------------------------- line formats (pure)


def with_separator(text: str, kind: str, last_kind: str | None) -> str:
    """`text` as printed after output of `last_kind` (None: nothing printed yet).

    A block ("block") and the first [EVAL] line ("eval") after other output get a blank line above
    them; train lines, messages and progress lines follow directly.
    """
    if last_kind is not None and (kind == "block" or (kind == "eval" and last_kind != "eval")):
        return "\n" + text
    return text


def _num(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_banner(domain_idx: int, domain: str, num_train_tasks: int) -> str:
    return "\n".join(
        [
            RULE,
            f"Task {domain_idx}: {domain.upper()}",
            RULE,
            "",
            f"Training on {num_train_tasks} tasks from {domain} domain",
        ]
    )


def format_bar_label(phase: str, domain_idx: int, domain: str) -> str:
    """The step bar's label: "SFT Task 0 (airline)" in the warm start, "GRPO Task 0 (airline)" after."""
    return f"{phase} Task {domain_idx} ({domain})"


def format_sft_postfix(stats: Mapping[str, Any]) -> str:
    """The bar's live figures during the warm start: "loss: 2.3100, token acc: 45.2%"."""
    return f"loss: {_num(stats.get('loss'), '.4f')}, token acc: {_pct(stats.get('token_accuracy'))}"


def format_postfix(stats: Mapping[str, Any]) -> str:
    """The bar's live figures: "loss: 2.1234, reward: 0.456, kl: 0.0123"."""
    return (
        f"loss: {_num(stats.get('loss'), '.4f')}, "
        f"reward: {_num(stats.get('reward_mean'), '.3f')}, "
        f"kl: {_num(stats.get('kl'), '.4f')}"
    )


def format_train_line(
    domain_idx: int, step: int, num_steps: int | None, stats: Mapping[str, Any]
) -> str:
    """Compact line: "[TRAIN] Task 0 Step 10/100 | loss: 2.1234 | reward: 0.456±0.120 | kl: ..."."""
    of_total = f"/{num_steps}" if num_steps else ""
    return (
        f"[TRAIN] Task {domain_idx} Step {step}{of_total}"
        f" | loss: {_num(stats.get('loss'), '.4f')}"
        f" | reward: {_num(stats.get('reward_mean'), '.3f')}±{_num(stats.get('reward_std'), '.3f')}"
        f" | kl: {_num(stats.get('kl'), '.4f')}"
    )


def format_sft_line(domain_idx: int, step: int, num_steps: int, stats: Mapping[str, Any]) -> str:
    """Supervised step: "[SFT] Task 0 Step 3/10 | loss: 2.3100 | token acc: 45.2% | 6.1s"."""
    return (
        f"[SFT] Task {domain_idx} Step {step}/{num_steps}"
        f" | loss: {_num(stats.get('loss'), '.4f')}"
        f" | token acc: {_pct(stats.get('token_accuracy'))}"
        f" | {_num(stats.get('time_step'), '.1f')}s"
    )


def format_train_detail(stats: Mapping[str, Any]) -> str:
    """Verbose line under a [TRAIN] line: where the step's time went and the optimiser's state."""

    def secs(key: str) -> str:
        value = stats.get(key)
        return "n/a" if value is None else f"{value:.2f}s"

    return (
        f"{DETAIL_INDENT}time rollout {secs('time_rollout')} reward {secs('time_reward')}"
        f" ref {secs('time_ref')} update {secs('time_update')}"
        f" | clip {_num(stats.get('clip_frac'), '.3f')}"
        f" | grad_norm {_num(stats.get('grad_norm'), '.3f')}"
        f" | lr {_num(stats.get('lr'), '.1e')}"
        f" | tokens {_num(stats.get('num_tokens'), '.0f')}"
    )


def format_scores(summary: EvalSummary) -> str:
    """Scores of one evaluation: "Reward: 0.456±0.123 | Pass: 45.6% | Tool Acc: 67.8%".

    Tool Acc reads n/a when no episode had golden actions to compare with.
    """
    return (
        f"Reward: {summary.reward_mean:.3f}±{summary.reward_std:.3f}"
        f" | Pass: {_pct(summary.pass_rate)} | Tool Acc: {_pct(summary.tool_accuracy)}"
    )


def format_eval_line(
    domain_idx: int, step: int, summary: EvalSummary, current_domain: str, heldout_split: str | None = None
) -> str:
    """The [EVAL] line; " (<domain>)" is appended only when another domain was evaluated, and
    " [held-out <split> split]" when it is the held-out evaluation of a stage."""
    line = f"[EVAL] Task {domain_idx} Step {step} | {format_scores(summary)}"
    line = line if summary.domain == current_domain else f"{line} ({summary.domain})"
    return line if heldout_split is None else f"{line} [held-out {heldout_split} split]"


def format_eval_detail(summary: EvalSummary) -> str:
    """Verbose line under an [EVAL] line: episodes, tau2's pass^k, the custom reward if any."""
    parts = [f"episodes {summary.num_episodes}"]
    parts += [f"pass^{k} {v:.3f}" for k, v in sorted(summary.pass_hat_k.items())]
    if summary.custom_reward_mean is not None:
        parts.append(f"custom reward {summary.custom_reward_mean:.3f}")
    return DETAIL_INDENT + " | ".join(parts)


def format_measures(measures: Mapping[str, float | None]) -> list[str]:
    """One "  name: 0.1234" line per measure, MEASURE_ORDER first; "n/a" for a missing value."""
    names = [k for k in MEASURE_ORDER if k in measures]
    names += [k for k in measures if k not in MEASURE_ORDER]
    return [f"  {name}: {_num(measures[name], '.4f')}" for name in names]


def format_transfer_block(
    domain_idx: int,
    summaries: Mapping[str, EvalSummary],
    seen: Sequence[str],
    measures: Mapping[str, float | None],
    heldout: HeldoutStage | None = None,
    mixes_domains: bool = False,
) -> str:
    """The "Backward Transfer Evaluation" block: one aligned row per evaluated domain, then the
    measures; with `heldout`, the held-out rows under their heading and the held-out measures after
    the others. A run whose stages mix all domains is named by part: "Evaluation after part 1/3
    (all domains)"."""
    after = part_name(domain_idx + 1, len(summaries)) if mixes_domains else f"Task {domain_idx}"
    title = f"Evaluation after {after}" if mixes_domains else f"Backward Transfer Evaluation (after {after})"
    lines = [RULE, title, RULE, *format_domain_rows(summaries, seen)]
    if heldout is not None:
        lines += format_heldout_rows(heldout.summaries, seen, heldout.split)
    lines += ["", f"=== Transfer Metrics after {after} ===", *format_measures(measures)]
    if heldout is not None:
        lines += [
            f"=== Held-out Transfer Metrics ({heldout.split} split) after {after} ===",
            *format_measures(heldout.measures),
        ]
    return "\n".join(lines)


def format_heldout_rows(
    summaries: Mapping[str, EvalSummary], seen: Sequence[str] | None, split: str
) -> list[str]:
    """The held-out rows of a stage block: a blank line, their heading, one aligned row per domain."""
    return ["", heldout_heading(split), *format_domain_rows(summaries, seen)]


def format_domain_rows(summaries: Mapping[str, EvalSummary], seen: Sequence[str] | None) -> list[str]:
    """Aligned `name | Reward ... | Pass ... | Tool Acc ...` rows; unseen domains marked."""
    width = max([NAME_WIDTH, *(len(name) for name in summaries)])
    rows = []
    for name, summary in summaries.items():
        unseen = "" if seen is None or name in seen else " (unseen)"
        rows.append(f"{name:<{width}} | {format_scores(summary)}{unseen}")
    return rows


def format_initial_header() -> str:
    """The header of row 0's block, printed before that evaluation starts."""
    return "\n".join([RULE, "Evaluation before training (Task -)", RULE])


def format_initial_block(summaries: Mapping[str, EvalSummary]) -> str:
    """Row 0 of the accuracy matrix: every domain before any training."""
    return "\n".join([format_initial_header(), *format_domain_rows(summaries, None)])


FLOOR_LABEL = "do-nothing"  # the row of the do-nothing floor under an accuracy matrix


def matrix_title(split: str = "test", heldout: bool = False) -> str:
    name = "Held-out accuracy matrix" if heldout else "Accuracy matrix"
    return f"{name} (rows: model after each stage; columns: {split} split of each domain)"


def format_matrix(
    domains: Sequence[str],
    matrix: Matrix,
    floor: Mapping[str, float] | None = None,
    mixes_domains: bool = False,
) -> list[str]:
    """Accuracy matrix R as a table: rows "before", "after <domain>", ... (stage_row_label); "-" if
    not evaluated.

    With `floor`, a last row gives each domain's do-nothing reward, the level any entry is read against.
    """
    labels = [stage_row_label(i, domains, mixes_domains) for i in range(len(matrix))]
    if floor is not None:
        labels.append(FLOOR_LABEL)
        matrix = [*matrix, [floor.get(d) for d in domains]]
    label_width = max(len(label) for label in labels)
    widths = [max(len(d), 5) for d in domains]  # 5 = len("0.456")
    lines = [
        " " * label_width + "".join(f"  {d:>{w}}" for d, w in zip(domains, widths, strict=True))
    ]
    for label, row in zip(labels, matrix, strict=True):
        cells = ("-" if v is None else f"{v:.3f}" for v in row)
        row_text = "".join(f"  {c:>{w}}" for c, w in zip(cells, widths, strict=True))
        lines.append(f"{label:<{label_width}}{row_text}")
    return lines


def format_final_summary(
    domains: Sequence[str],
    matrix: Matrix,
    measures: Mapping[str, float | None],
    split: str = "test",
    floor: Mapping[str, float] | None = None,
    mixes_domains: bool = False,
    heldout: HeldoutResults | None = None,
) -> str:
    """The whole matrix with its floor and the final measures; with `heldout`, the held-out matrix
    under the first and its measures after the first's."""
    lines = [RULE, "Final Summary", RULE, matrix_title(split), *format_matrix(domains, matrix, floor, mixes_domains)]
    if heldout is not None:
        lines += [
            "",
            matrix_title(heldout.split, heldout=True),
            *format_matrix(domains, heldout.matrix, heldout.floor, mixes_domains),
        ]
    lines += ["", "=== Final Transfer Metrics ===", *format_measures(measures)]
    if heldout is not None:
        lines += [f"=== Final Held-out Transfer Metrics ({heldout.split} split) ===", *format_measures(heldout.measures)]
    return "\n".join(lines)

