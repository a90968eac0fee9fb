"""A run's results read back from its log_dir: the accuracy matrices, eval, train and sft records.

A run's ground truth is its metrics.jsonl: every stage evaluation is an eval record with `stage` =
its accuracy-matrix row, so the matrix can be rebuilt even when the run stopped half-way.
summary.json is taken as is only when it says every stage was completed; otherwise it only fills
entries that metrics.jsonl lacks. Eval records carry their `split`: those of another split than the
run's --eval_split are a held-out evaluation (--heldout_eval) and fill the held-out matrix, the same
way. A run whose strategy mixes all domains in every stage reports only ACC (cl/measures.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tau2cl.cl.measures import reported_measures
from tau2cl.cl.strategies.registry import STRATEGIES
from tau2cl.errors import UserError
from tau2cl.runs.files import METRICS_FILE, SUMMARY_FILE

MEASURE_NAMES = ("average_performance", "backward_transfer", "forward_transfer", "forgetting")
MEASURE_LABELS = ("ACC", "BWT", "FWT", "forgetting")

Matrix = list[list[float | None]]


@dataclass
class RunData:
    """Everything a report needs from one log dir."""

    log_dir: Path
    domains: list[str]  # training order = matrix columns
    # (T+1, T): row 0 before training, row i after domain i; None where not reached
    reward_matrix: Matrix
    pass_matrix: Matrix
    cl_algorithm: str | None = None
    global_step: int | None = None
    # every eval record (stage and periodic) and every train record, deduplicated, by global_step
    evals: list[dict] = field(default_factory=list)
    trains: list[dict] = field(default_factory=list)
    sfts: list[dict] = field(default_factory=list)  # the warm-start steps, deduplicated, by domain and step
    # steps per domain as configured (None when summary.json does not say): warm start, then GRPO
    sft_steps_per_task: int | None = None
    num_steps_per_task: int | None = None
    eval_split: str = "test"  # the split every evaluation ran on
    floor: dict[str, float] | None = None  # do-nothing reward per domain on the evaluated tasks
    mixes_domains: bool = False  # its strategy trains on all domains mixed in every stage (only ACC)
    # --heldout_eval: the same stages on the held-out split, with its floor; None without one
    heldout_reward_matrix: Matrix | None = None
    heldout_pass_matrix: Matrix | None = None
    heldout_floor: dict[str, float] | None = None
    heldout_split: str = "test"
    heldout_evals: list[dict] = field(default_factory=list)  # the held-out stage eval records

    @property
    def name(self) -> str:
        """The run's label: `<cl_algorithm> (<dir name>)`, or the dir name if no algorithm is known."""
        base = self.log_dir.resolve().name
        return f"{self.cl_algorithm} ({base})" if self.cl_algorithm else base

    @property
    def last_stage(self) -> int | None:
        """Last completed stage k >= 1 (its matrix row fully evaluated), or None before that."""
        return last_full_stage(self.reward_matrix)

    @property
    def has_heldout(self) -> bool:
        """Whether the run evaluated a held-out split beside its own (--heldout_eval)."""
        return self.heldout_reward_matrix is not None

    @property
    def heldout_last_stage(self) -> int | None:
        return last_full_stage(self.heldout_reward_matrix) if self.heldout_reward_matrix is not None else None

    def measures(self) -> dict[str, float | None]:
        """ACC/BWT/FWT/forgetting of the reward matrix after the last completed stage (all None
        before any); a measure needing an entry that is missing is None too, and so are BWT, FWT
        and forgetting of a run whose stages mix all domains."""
        return _measures(self.reward_matrix, self.last_stage, self.mixes_domains)

    def heldout_measures(self) -> dict[str, float | None]:
        """The same measures of the held-out matrix (all None without one)."""
        if self.heldout_reward_matrix is None:
            return dict.fromkeys(MEASURE_NAMES)
        return _measures(self.heldout_reward_matrix, self.heldout_last_stage, self.mixes_domains)

    def boundaries(self) -> list[tuple[int, str]]:
        """(global_step where a domain's training ended, domain) for each finished domain.

        The stage evaluation after domain i carries that step; without it (interrupted during the
        stage evaluation) a later domain's training proves domain i ended at its last train step.
        """
        stage_steps = {r["stage"]: r["global_step"] for r in self.evals if r.get("stage")}
        trained = {r.get("task_idx") for r in self.trains}
        result = []
        for i, name in enumerate(self.domains):
            step = stage_steps.get(i + 1)
            if step is None and any(t is not None and t > i for t in trained):
                steps = [r["global_step"] for r in self.trains if r.get("task_idx") == i]
                step = max(steps) if steps else None
            if step is not None:
                result.append((step, name))
        return result


def last_full_stage(matrix: Matrix) -> int | None:
    """Last stage k >= 1 whose row is fully evaluated, or None before that."""
    done = [k for k in range(1, len(matrix)) if _row_full(matrix[k])]
    return done[-1] if done else None


def _measures(matrix: Matrix, k: int | None, mixes_domains: bool) -> dict[str, float | None]:
    if k is None:
        return dict.fromkeys(MEASURE_NAMES)
    return reported_measures(matrix, k, mixes_domains)


def strategy_mixes_domains(cl_algorithm: Any) -> bool:
    """Whether a run of `cl_algorithm` trains on all domains mixed in every stage (its registry
    entry says so); False for a name the registry does not know."""
    entry = STRATEGIES.get(cl_algorithm) if isinstance(cl_algorithm, str) else None
    return entry is not None and entry.mixes_domains


# ---------------------------------------------------------------- reading a run


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut off by a crash (bad JSON) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _read_summary(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def _row_full(row: Sequence[float | None]) -> bool:
    return bool(row) and all(v is not None for v in row)


def _infer_domains(records: list[dict]) -> list[str]:
    """Training order without summary.json: stage 0 evaluates every domain in order; then training."""
    names: list[str] = []
    stage0 = [
        r.get("eval_domain") for r in records if r.get("type") == "eval" and r.get("stage") == 0
    ]
    trains = sorted(
        (r for r in records if r.get("type") in ("sft", "train")), key=lambda r: r.get("task_idx") or 0
    )
    others = [r.get("eval_domain") or r.get("domain") for r in records]
    for name in [*stage0, *(r.get("domain") for r in trains), *others]:
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names


def _dedupe(records: list[dict], key) -> list[dict]:
    """Last record per key (a resumed run appends repeats of steps), sorted by global_step."""
    latest = {key(r): r for r in records}
    return sorted(latest.values(), key=lambda r: r.get("global_step") or 0)


def rebuild_matrix(evals: list[dict], domains: Sequence[str], key: str) -> Matrix:
    """(T+1, T) matrix of `key` from the stage eval records; None where no record exists."""
    matrix: Matrix = [[None] * len(domains) for _ in range(len(domains) + 1)]
    for r in evals:
        stage, name = r.get("stage"), r.get("eval_domain")
        if isinstance(stage, int) and 0 <= stage <= len(domains) and name in domains:
            matrix[stage][domains.index(name)] = r.get(key)
    return matrix


def _merge(primary: Matrix, fallback: Any) -> Matrix:
    """primary's entries, with fallback's (summary.json) where primary has None."""
    merged = [list(row) for row in primary]
    if not isinstance(fallback, list):
        return merged
    for i, row in enumerate(merged):
        for j, value in enumerate(row):
            if value is None and i < len(fallback) and j < len(fallback[i] or []):
                row[j] = fallback[i][j]
    return merged


def load_run(log_dir: str | os.PathLike) -> RunData:
    """Read a log dir; UserError if it is missing or holds neither metrics.jsonl nor summary.json."""
    path = Path(log_dir)
    if not path.is_dir():
        raise UserError(f"log dir {path} does not exist; pass the log_dir of a training run.")
    metrics_path = path / METRICS_FILE
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    summary = _read_summary(path / SUMMARY_FILE)
    if not records and summary is None:
        raise UserError(
            f"log dir {path} has no {METRICS_FILE} records and no {SUMMARY_FILE}; "
            "pass the log_dir of a training run."
        )
    summary = summary or {}
    config = summary.get("config") or {}
    domains = list(summary.get("task_order") or config.get("task_order") or _infer_domains(records))
    eval_split = summary.get("eval_split") or config.get("eval_split") or _main_split(records)
    all_evals = _dedupe(
        [r for r in records if r.get("type") == "eval"],
        lambda r: (r.get("eval_domain"), r.get("stage"), r.get("task_idx"), r.get("global_step"), r.get("split")),
    )
    evals = [r for r in all_evals if r.get("split") in (None, eval_split)]
    heldout_evals = [r for r in all_evals if r.get("split") not in (None, eval_split)]
    trains = _dedupe(
        [r for r in records if r.get("type") == "train"], lambda r: r.get("global_step")
    )
    sft_latest = {(r.get("task_idx"), r.get("step")): r for r in records if r.get("type") == "sft"}
    sfts = [sft_latest[key] for key in sorted(sft_latest, key=lambda k: (k[0] or 0, k[1] or 0))]
    complete = summary.get("stages_completed") == len(domains)
    rewards, passes = _matrices(evals, domains, summary, complete, "accuracy_matrix", "pass_rate_matrix")
    has_heldout = bool(heldout_evals) or isinstance(summary.get("heldout_accuracy_matrix"), list)
    heldout_rewards, heldout_passes = (
        _matrices(heldout_evals, domains, summary, complete, "heldout_accuracy_matrix", "heldout_pass_rate_matrix")
        if has_heldout else (None, None)
    )
    heldout_split = next((r["split"] for r in heldout_evals if isinstance(r.get("split"), str)), "test")
    steps = [r.get("global_step") for r in [*records, summary]]
    return RunData(
        log_dir=path,
        domains=domains,
        reward_matrix=rewards,
        pass_matrix=passes,
        cl_algorithm=config.get("cl_algorithm"),
        global_step=max((s for s in steps if isinstance(s, int)), default=None),
        evals=evals,
        trains=trains,
        sfts=sfts,
        sft_steps_per_task=_count(config.get("sft_steps_per_task")),
        num_steps_per_task=_count(config.get("num_steps_per_task")),
        eval_split=eval_split,
        floor=_floor(summary.get("do_nothing_floor")),
        mixes_domains=strategy_mixes_domains(config.get("cl_algorithm")),
        heldout_reward_matrix=heldout_rewards,
        heldout_pass_matrix=heldout_passes,
        heldout_floor=_floor(summary.get("heldout_do_nothing_floor")),
        heldout_split=heldout_split,
        heldout_evals=heldout_evals,
    )


def _main_split(records: list[dict]) -> str:
    """The run's --eval_split when no summary says it: a held-out evaluation runs only beside the
    train split, so any train-split record means train."""
    return "train" if any(r.get("type") == "eval" and r.get("split") == "train" for r in records) else "test"


def _floor(value: Any) -> dict[str, float] | None:
    return value if isinstance(value, dict) else None


def _matrices(
    evals: list[dict], domains: list[str], summary: dict, complete: bool, reward_key: str, pass_key: str
) -> tuple[Matrix, Matrix]:
    """The reward and pass-rate matrices of `evals`: a finished run's summary is the trainer's own
    matrix; otherwise the records, with the summary's entries where they have none."""
    rewards = rebuild_matrix(evals, domains, "reward_mean")
    passes = rebuild_matrix(evals, domains, "pass_rate")
    if complete and _shape_ok(summary.get(reward_key), domains):
        rewards = [list(row) for row in summary[reward_key]]
        if _shape_ok(summary.get(pass_key), domains):
            passes = [list(row) for row in summary[pass_key]]
        return rewards, passes
    return _merge(rewards, summary.get(reward_key)), _merge(passes, summary.get(pass_key))


def _count(value: Any) -> int | None:
    """A step count from summary.json's config, or None when it is missing or not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _shape_ok(matrix: Any, domains: Sequence[str]) -> bool:
    return (
        isinstance(matrix, list)
        and len(matrix) == len(domains) + 1
        and all(isinstance(row, list) and len(row) == len(domains) for row in matrix)
    )
